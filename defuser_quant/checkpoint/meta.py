"""A model built on the ``meta`` device from its config: module paths and layouts, no weights.

The converter and ``inspect`` learn where fused experts blocks live (``model.language_model.
layers.0.mlp.experts``), how they store their experts and what their per-expert projections
are called from the same planning code ``convert_model`` uses, without reading a single weight.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.defused import DefusedExperts
from ..core.layout import ExpertLayout, ExpertShapes
from ..core.naming import ProjectionNames
from ..core.tensors import FusedTensor
from .errors import CheckpointError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExpertBlock:
    """One fused experts block of a meta model."""

    path: str  # module path in the model, e.g. "model.layers.0.mlp.experts"
    class_name: str
    layout: ExpertLayout
    shapes: ExpertShapes
    names: ProjectionNames
    model_type: str | None
    top_model_type: str | None
    tensors: tuple[FusedTensor, ...]  # the block's fused tensors and their per-expert pieces
    fused_shapes: dict[str, tuple[int, ...]]  # fused tensor path -> stored shape
    description: str = ""  # the layout in words (the adapter's)
    family: str | None = None  # an irregular family's name (families.py); None for standard layouts
    stock_per_expert: bool = True  # stock Transformers loads this block's per-expert checkpoint

    @property
    def leaf(self) -> str:
        """Attribute name of the block in its parent (usually ``experts``)."""
        return self.path.rpartition(".")[2]

    def slab_shape(self, tensor: FusedTensor) -> tuple[int, ...]:
        """One expert's slab of ``tensor`` (``[2I, H]``; dbrx's flattened ``[E*I, H]`` -> ``[I, H]``)."""
        return tuple(tensor.slab_shape) if tensor.slab_shape is not None else self.fused_shapes[tensor.path][1:]

    def slab_count(self, tensor: FusedTensor) -> int:
        """Slabs stored in ``tensor`` (longcat_flash: routed plus identity experts)."""
        return torch.Size(self.fused_shapes[tensor.path]).numel() // max(torch.Size(self.slab_shape(tensor)).numel(), 1)

    def experts_in(self, tensor: FusedTensor) -> int:
        """Slabs of ``tensor`` that hold an expert's weights (the rest are unused padding)."""
        return tensor.carved_experts if tensor.carved_experts is not None else self.slab_count(tensor)


def load_config(model: str | Path, *, local_only: bool = False) -> Any:
    """The ``PretrainedConfig`` of a local model directory or a hub id.

    Raises ``CheckpointError`` with a clear message when the config cannot be read (a hub id
    while offline, a directory without ``config.json``).
    """
    from transformers import AutoConfig

    path = Path(model)
    if path.exists():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json; pass a model directory saved by save_pretrained")
        return AutoConfig.from_pretrained(str(path))
    if local_only or str(model).startswith((".", "/", "~")):
        raise CheckpointError(f"{model}: no such local directory")
    try:
        return AutoConfig.from_pretrained(str(model))
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise CheckpointError(
            f"cannot fetch the config of {model!r} from the model hub ({type(exc).__name__}: {exc}). "
            "Pass a local model directory, or check the hub id and your network (HF_HUB_OFFLINE)."
        ) from exc


def _model_class(config: Any) -> type[nn.Module]:
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type):
            return cls
    for auto_name in ("AutoModelForCausalLM", "AutoModelForImageTextToText", "AutoModel"):
        auto = getattr(transformers, auto_name)
        if type(config) in auto._model_mapping:
            return auto._model_mapping[type(config)]
    raise CheckpointError(f"no Transformers model class for {type(config).__name__} (architectures={config.architectures})")


def config_dtype(config: Any) -> torch.dtype:
    """The dtype the config declares for its weights (float32 when it declares none)."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def build_meta_model(config: Any) -> nn.Module:
    """The model of ``config`` with every tensor on ``meta`` (no memory, no initialisation)."""
    cls = _model_class(config)
    with torch.device("meta"):
        model = cls._from_config(config, dtype=config_dtype(config))
    defused = [p for p, m in model.named_modules() if isinstance(m, DefusedExperts)]
    if defused:
        raise CheckpointError(
            f"{type(model).__name__} was built with defused experts ({defused[0]}): pre-load patching is active. "
            "Call defuser_quant.restore_fused_blocks() first."
        )
    return model


@dataclass
class BlockScan:
    """Fused experts blocks of a meta model, as ``convert_model`` would plan them."""

    blocks: list[ExpertBlock]
    report: Any  # the ConversionReport of the planning (``skipped`` says what a filter excludes)

    @property
    def irregular(self) -> list[tuple[str, str]]:
        """(path, class name) of the blocks with a family-specific storage (families.py)."""
        return [(b.path, b.class_name) for b in self.blocks if b.family]


def scan_blocks(model: nn.Module, filter: Any = None) -> BlockScan:
    """Fused experts blocks ``convert_model(model, filter)`` would defuse, from the core's planner."""
    from ..core.defuse import plan_conversion
    from ..core.filters import FilterRules
    from ..core.naming import stock_loads_per_expert
    from ..core.report import ConversionReport
    from ..core.tensors import get_tensor

    report = ConversionReport()
    plans = plan_conversion(model, FilterRules.parse(filter), None, report)
    blocks = []
    for plan in plans:
        adapter = plan.adapter
        tensors = tuple(adapter.tensors(plan.module, plan.layout))
        blocks.append(
            ExpertBlock(
                path=plan.path,
                class_name=type(plan.module).__name__,
                layout=plan.layout,
                shapes=plan.shapes,
                names=plan.names,
                model_type=plan.model_type,
                top_model_type=plan.top_model_type,
                tensors=tensors,
                fused_shapes={t.path: tuple(get_tensor(plan.module, t.path).shape) for t in tensors},
                description=adapter.describe(plan.layout),
                family=adapter.family or None,
                stock_per_expert=adapter.stock_per_expert
                and stock_loads_per_expert(plan.model_type, plan.top_model_type),
            )
        )
    return BlockScan(blocks, report)


def read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
