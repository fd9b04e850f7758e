"""``inspect``: what a model's fused experts look like and what defuser-quant would do to them.

The model is built on the ``meta`` device from its config (no weights are read or allocated):
fused blocks, their layouts and per-expert names, what ``convert_model`` and
``replace_fused_blocks`` would do, and expert parameter counts against the whole model. For a
local checkpoint directory the shard headers also tell how each block is stored on disk and what
``convert --to fused|per-expert`` would do.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint.meta import ExpertBlock, build_meta_model, config_dtype, load_config, scan_blocks
from ..core.slicing import needs_relayout

logger = logging.getLogger(__name__)


@dataclass
class ExpertLinear:
    """One per-expert ``nn.Linear`` a defused block would hold."""

    name: str
    shape: tuple[int, int]  # [out, in]
    bias: bool


@dataclass
class BlockInfo:
    """One fused experts block."""

    path: str
    class_name: str
    layout: str
    flags: dict[str, bool]
    num_experts: int
    hidden: int
    intermediate: int
    fused_tensors: dict[str, tuple[int, ...]]
    per_expert: list[ExpertLinear]
    expert_params: int
    expert_bytes: int
    convert_model: str  # "defuse (zero copy)" | "defuse (in-place relayout, ...)"
    on_disk: str | None = None  # "per-expert" | "fused" | "missing" (local checkpoints only)


@dataclass
class Inspection:
    """Everything ``inspect`` reports about one model."""

    model: str
    model_type: str
    architecture: str
    dtype: str
    total_params: int
    total_bytes: int
    expert_params: int
    expert_bytes: int
    blocks: list[BlockInfo] = field(default_factory=list)
    irregular: list[dict[str, str]] = field(default_factory=list)  # family-specific layouts (families.py)
    replace_fused_blocks: dict[str, Any] = field(default_factory=dict)
    saving: str = ""
    checkpoint: dict[str, Any] | None = None

    @property
    def expert_fraction(self) -> float:
        return self.expert_params / self.total_params if self.total_params else 0.0

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["expert_fraction"] = self.expert_fraction
        return data


def _count(model: nn.Module) -> tuple[int, int]:
    """Parameters (tied ones once) and their bytes."""
    params = list(model.parameters())
    return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def _block_info(block: ExpertBlock, element_size: int) -> BlockInfo:
    layout, shapes, names = block.layout, block.shapes, block.names
    linears, relayout = [], []
    for tensor in block.tensors:
        slabs = torch.empty((1, *block.slab_shape(tensor)), device="meta")
        for (role, kind), piece in zip(tensor.leaves, tensor.pieces(slabs[0])):
            if kind == "weight":
                linears.append(ExpertLinear(getattr(names, role), tuple(piece.shape), layout.has_bias))
        if needs_relayout(slabs, tensor.pieces):
            relayout.append(tensor.path)
    numel = sum(torch.Size(shape).numel() for shape in block.fused_shapes.values())
    action = "defuse (zero copy: per-expert Linears are views of the fused storage)"
    if relayout:
        action = f"defuse (in-place relayout of {', '.join(relayout)}, one expert at a time; fuse_model undoes it)"
    return BlockInfo(
        path=block.path,
        class_name=block.class_name,
        layout=block.description,
        flags={k: getattr(layout, k) for k in ("has_gate", "has_bias", "is_transposed", "is_concatenated")},
        num_experts=shapes.num_experts,
        hidden=shapes.hidden,
        intermediate=shapes.intermediate,
        fused_tensors=dict(block.fused_shapes),
        per_expert=linears,
        expert_params=numel,
        expert_bytes=numel * element_size,
        convert_model=action,
    )


def _patching(model_type: str) -> dict[str, Any]:
    from ..core.errors import DefuserQuantError
    from ..core.patching import fused_experts_classes, irregular_experts_classes

    try:
        classes = [c.__name__ for c in fused_experts_classes(model_type) + irregular_experts_classes(model_type)]
    except DefuserQuantError as exc:
        return {"model_type": model_type, "patchable": False, "classes": [], "note": str(exc)}
    note = "per-expert Linears are built while from_pretrained loads (fused checkpoints are split on the way in)"
    if not classes:
        note = "no experts class to patch: load, then call convert_model(model)"
    return {"model_type": model_type, "patchable": bool(classes), "classes": classes, "note": note}


def _checkpoint(path: Path, model: nn.Module, blocks: list[ExpertBlock], info: list[BlockInfo]) -> dict[str, Any] | None:
    from ..checkpoint.errors import CheckpointError
    from ..checkpoint.plan import plan_conversion
    from ..checkpoint.source import read_headers, shard_files

    try:
        files = shard_files(path)
        infos = read_headers(path, files)
        plans = {to: plan_conversion(infos, model, blocks, to) for to in ("fused", "per-expert")}
    except CheckpointError as exc:
        return {"files": 0, "note": str(exc)}
    found = {b.path: b.found for b in plans["fused"].blocks}
    for block in info:
        block.on_disk = found.get(block.path)
    formats = sorted(set(found.values()))
    convert = {}
    for to, plan in plans.items():
        changed = [b for b in plan.blocks if b.action in ("merged", "split")]
        if changed:
            convert[to] = (
                f"{changed[0].action} {len(changed)} block(s): "
                f"{sum(b.tensors_in for b in changed)} tensors -> {sum(b.tensors_out for b in changed)}"
            )
        else:
            convert[to] = "nothing to do (already in this layout)"
    return {
        "files": len(files),
        "tensors": len(infos),
        "bytes": sum(i.nbytes for i in infos.values()),
        "format": formats[0] if len(formats) == 1 else "mixed",
        "unmatched_expert_keys": len(plans["fused"].unmatched),
        "convert": convert,
    }


def inspect_model(model: str | Path, filter: Any = None) -> Inspection:
    """Inspect ``model`` (a local directory or a hub id) without loading weights.

    ``filter`` takes ``convert_model``'s rules; blocks it excludes are marked ``skip (...)``.
    Raises ``CheckpointError`` when the config cannot be read (e.g. a hub id while offline).
    """
    config = load_config(model)
    meta = build_meta_model(config)
    scan = scan_blocks(meta)
    blocks = scan.blocks
    filtered = scan_blocks(meta, filter) if filter else scan
    chosen = {b.path for b in filtered.blocks}
    element_size = torch.empty((), dtype=config_dtype(config)).element_size()
    infos = [_block_info(b, element_size) for b in blocks]
    for info in infos:
        if info.path not in chosen:
            reason = next((r.reason for r in filtered.report.skipped if r.path == info.path), "excluded")
            info.convert_model = f"skip ({reason})"
    total_params, total_bytes = _count(meta)
    model_type = getattr(config, "model_type", "?")
    per_expert_ok = all(b.stock_per_expert for b in blocks)
    saving = (
        "save_pretrained of a defused model writes per-expert keys that stock Transformers loads"
        if per_expert_ok
        else "stock Transformers loads these experts only fused: save inside defuser_quant.temporarily_fused(model)"
    )
    result = Inspection(
        model=str(model),
        model_type=model_type,
        architecture=type(meta).__name__,
        dtype=str(config_dtype(config)).replace("torch.", ""),
        total_params=total_params,
        total_bytes=total_bytes,
        expert_params=sum(b.expert_params for b in infos),
        expert_bytes=sum(b.expert_bytes for b in infos),
        blocks=infos,
        irregular=[{"path": p, "class": c} for p, c in scan.irregular],
        replace_fused_blocks=_patching(model_type),
        saving=saving,
    )
    path = Path(model)
    if path.is_dir() and blocks:
        result.checkpoint = _checkpoint(path, meta, blocks, infos)
    return result
