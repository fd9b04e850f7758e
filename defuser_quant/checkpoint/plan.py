"""Conversion plan: which stored tensors belong to which experts block, and what to write.

Disk keys are matched to the fused blocks of the meta model by module path: the text before
``experts.{e}.<proj>.<weight|bias>`` (per-expert) or ``experts.<fused name>`` (fused) is mapped
to a module path with Transformers' own load-time key renaming (mixtral's
``block_sparse_moe`` -> ``mlp``, base-model prefixes), falling back to a unique suffix match. The
output keeps the key prefix found on disk, so every other tensor keeps its name and a round
trip per-expert -> fused -> per-expert gives back the same keys.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from ..core.naming import DEFAULT_NAMES, UNGATED_DEFAULT_NAMES, ProjectionNames
from ..core.slicing import PiecesFn
from ..core.tensors import FusedTensor
from .errors import CheckpointError
from .meta import ExpertBlock
from .ops import Copy, Merge, Op, Split, piece_spans, pieces_are_packed
from .source import DTYPE_SIZES, SizedTensor, TensorInfo

logger = logging.getLogger(__name__)

Target = Literal["fused", "per-expert"]
TARGETS: tuple[str, ...] = ("fused", "per-expert")


@dataclass(frozen=True)
class PlannedTensor(SizedTensor):
    """One tensor of the output checkpoint and how to produce it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    op: Op


@dataclass
class BlockAction:
    """What the conversion does to one experts block."""

    path: str  # module path in the model
    disk_prefix: str  # key prefix on disk (may differ: mixtral's block_sparse_moe)
    class_name: str
    layout: str
    num_experts: int
    found: str  # "per-expert" | "fused" | "missing"
    action: str  # "merged" | "split" | "kept" | "missing"
    tensors_in: int = 0
    tensors_out: int = 0
    nbytes: int = 0  # of the block's tensors in the source
    nbytes_out: int = 0  # of the block's tensors in the output
    stock_loadable: bool = True  # False: per-expert output that stock Transformers does not load
    unused_slabs: int = 0  # fused slabs no expert reads (identity experts) dropped by a split, zero-filled by a merge


@dataclass
class ConversionPlan:
    tensors: list[PlannedTensor]
    blocks: list[BlockAction]
    unmatched: list[str] = field(default_factory=list)  # expert-looking keys no block claimed


@dataclass
class _DiskBlock:
    prefix: str
    per_expert: dict[tuple[int, str, str], TensorInfo] = field(default_factory=dict)
    fused: dict[str, TensorInfo] = field(default_factory=dict)


def _groups(block: ExpertBlock, names: ProjectionNames) -> list[tuple[FusedTensor, list[tuple[str, str]]]]:
    """Each fused tensor of a block with its [(per-expert projection, weight|bias)] pieces."""
    return [(t, [(getattr(names, role), kind) for role, kind in t.leaves]) for t in block.tensors]


def _piece_shapes(pieces: PiecesFn, slab_shape: tuple[int, ...]) -> list[tuple[int, ...]]:
    return [tuple(p.shape) for p in pieces(torch.empty(slab_shape, device="meta"))]


class PathResolver:
    """Maps the block prefix of a disk key to the module path of a fused block."""

    def __init__(self, model: nn.Module, blocks: list[ExpertBlock]):
        self.by_path = {b.path: b for b in blocks}
        self._rename = self._transformers_renamer(model)
        self._cache: dict[str, ExpertBlock | None] = {}

    @staticmethod
    def _transformers_renamer(model: nn.Module) -> Callable[[str], str] | None:
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

            transforms = get_model_conversion_mapping(model)
            renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
            converters = [t for t in transforms if isinstance(t, WeightConverter)]
            meta_state = model.state_dict()
            prefix = getattr(model, "base_model_prefix", None) or None
        except Exception as exc:  # an API change in Transformers: fall back to suffix matching
            logger.debug("no Transformers key renaming (%s); matching blocks by suffix", exc)
            return None
        return lambda key: rename_source_key(key, renamings, converters, prefix, meta_state)[0]

    def resolve(self, disk_prefix: str) -> ExpertBlock | None:
        if disk_prefix not in self._cache:
            self._cache[disk_prefix] = self._resolve(disk_prefix)
        return self._cache[disk_prefix]

    def _resolve(self, disk_prefix: str) -> ExpertBlock | None:
        if disk_prefix in self.by_path:
            return self.by_path[disk_prefix]
        if self._rename is not None:
            probe = self._rename(f"{disk_prefix}.down_proj")
            if probe.endswith(".down_proj") and probe[: -len(".down_proj")] in self.by_path:
                return self.by_path[probe[: -len(".down_proj")]]
        candidates = [p for p in self.by_path if p.endswith(f".{disk_prefix}") or disk_prefix.endswith(f".{p}")]
        return self.by_path[candidates[0]] if len(candidates) == 1 else None


def _key_patterns(blocks: list[ExpertBlock]) -> tuple[re.Pattern, re.Pattern]:
    leaves = "|".join(sorted({re.escape(b.leaf) for b in blocks}))
    fused = "|".join(sorted({re.escape(t.path) for b in blocks for t in b.tensors}, key=len, reverse=True))
    per_expert = re.compile(rf"^(?P<block>(?:.*\.)?(?:{leaves}))\.(?P<expert>\d+)\.(?P<proj>[^.]+)\.(?P<kind>[^.]+)$")
    fused_re = re.compile(rf"^(?P<block>(?:.*\.)?(?:{leaves}))\.(?P<name>{fused})$")
    return per_expert, fused_re


def _classify(
    infos: dict[str, TensorInfo], resolver: PathResolver, blocks: list[ExpertBlock]
) -> tuple[dict[str, _DiskBlock], list[TensorInfo], list[str]]:
    """(module path -> disk block, tensors kept as they are, expert-looking keys no block claimed)."""
    per_expert_re, fused_re = _key_patterns(blocks)
    found: dict[str, _DiskBlock] = {}
    others: list[TensorInfo] = []
    unmatched: list[str] = []
    for info in infos.values():
        m = per_expert_re.match(info.name) or fused_re.match(info.name)
        block = resolver.resolve(m.group("block")) if m else None
        if block is None:
            others.append(info)
            if m:
                unmatched.append(info.name)
            continue
        disk = found.setdefault(block.path, _DiskBlock(m.group("block")))
        if disk.prefix != m.group("block"):
            raise CheckpointError(
                f"{block.path} is stored under two key prefixes ({disk.prefix} and {m.group('block')}); "
                "the checkpoint is inconsistent"
            )
        if "expert" in m.groupdict():
            disk.per_expert[(int(m.group("expert")), m.group("proj"), m.group("kind"))] = info
        else:
            disk.fused[m.group("name")] = info
    return found, others, unmatched


def _names_on_disk(block: ExpertBlock, disk: _DiskBlock) -> ProjectionNames:
    projs = {p for _, p, _ in disk.per_expert}
    default = DEFAULT_NAMES if block.layout.has_gate else UNGATED_DEFAULT_NAMES
    for names in (block.names, default):
        if projs == set(names.as_tuple()):
            return names
    raise CheckpointError(
        f"{disk.prefix}: per-expert projections {sorted(projs)} match neither {list(block.names.as_tuple())} "
        f"nor {list(default.as_tuple())}"
    )


def _has_slab(disk: _DiskBlock, expert: int, roles: list[tuple[str, str]]) -> bool:
    """True when the checkpoint stores slab ``expert`` per expert (stock longcat_flash saves the
    identity experts' unused ``gate_up_proj`` slabs as ``experts.<e>.gate_proj``/``up_proj`` too)."""
    return any((expert, proj, kind) in disk.per_expert for proj, kind in roles)


def _plan_merge(block: ExpertBlock, disk: _DiskBlock) -> list[PlannedTensor]:
    kinds = sorted({k for _, _, k in disk.per_expert} - {"weight", "bias"})
    if kinds:
        raise CheckpointError(
            f"{disk.prefix}: per-expert tensors named '{kinds[0]}' (a quantized checkpoint?); convert handles "
            "unquantized weights and biases only"
        )
    names = _names_on_disk(block, disk)
    out = []
    seen = set()
    for tensor, roles in _groups(block, names):
        slab_shape = block.slab_shape(tensor)
        expected = _piece_shapes(tensor.pieces, slab_shape)
        rows = []
        for e in range(block.slab_count(tensor)):
            if e >= block.experts_in(tensor) and not _has_slab(disk, e, roles):
                break  # unused slabs (identity experts) not stored per expert: written as zeros
            row = []
            for (proj, kind), shape in zip(roles, expected):
                key = (e, proj, kind)
                info = disk.per_expert.get(key)
                if info is None:
                    raise CheckpointError(
                        f"{disk.prefix}.{e}.{proj}.{kind} is missing ({block.experts_in(tensor)} experts expected)"
                    )
                if info.shape != shape:
                    raise CheckpointError(f"{info.name} has shape {list(info.shape)}, expected {list(shape)}")
                seen.add(key)
                row.append(info)
            rows.append(tuple(row))
        dtypes = {info.dtype for row in rows for info in row}
        if len(dtypes) != 1:
            raise CheckpointError(f"{disk.prefix}: per-expert {tensor.path} pieces mix dtypes {sorted(dtypes)}")
        padding = block.slab_count(tensor) - len(rows)  # unused slabs (longcat_flash's identity experts): zeros
        op = Merge(tuple(rows), slab_shape, tensor.pieces, pieces_are_packed(tensor.pieces, slab_shape), padding)
        out.append(PlannedTensor(f"{disk.prefix}.{tensor.path}", dtypes.pop(), block.fused_shapes[tensor.path], op))
    extra = sorted(set(disk.per_expert) - seen)
    if extra:
        e, proj, kind = extra[0]
        raise CheckpointError(
            f"{disk.prefix}.{e}.{proj}.{kind} does not belong to {block.class_name} ({block.description})"
        )
    return out


def _orientation(info: TensorInfo, native: tuple[int, ...]) -> bool:
    """True when ``info`` stores the native tensor with its last two dims swapped."""
    if info.shape == native:
        return False
    if len(native) == 3 and info.shape == (native[0], native[2], native[1]):
        return True
    raise CheckpointError(
        f"{info.name} has shape {list(info.shape)}, expected {list(native)} (or its last two dims swapped)"
    )


def _plan_split(block: ExpertBlock, disk: _DiskBlock) -> list[PlannedTensor]:
    extra = sorted(set(disk.fused) - {t.path for t in block.tensors})
    if extra:
        raise CheckpointError(f"{disk.prefix}.{extra[0]} does not belong to {block.class_name} ({block.description})")
    out = []
    for tensor, roles in _groups(block, block.names):
        info = disk.fused.get(tensor.path)
        if info is None:
            raise CheckpointError(f"{disk.prefix}.{tensor.path} is missing")
        transposed = _orientation(info, block.fused_shapes[tensor.path])
        slab_shape = block.slab_shape(tensor)
        shapes = _piece_shapes(tensor.pieces, slab_shape)
        spans = piece_spans(tensor.pieces, slab_shape) if not transposed else [None] * len(roles)
        itemsize = DTYPE_SIZES[info.dtype]
        slab_bytes = torch.Size(slab_shape).numel() * itemsize
        for e in range(block.experts_in(tensor)):
            for k, ((proj, kind), shape) in enumerate(zip(roles, shapes)):
                span = spans[k]
                where = None if span is None else (info.offset + e * slab_bytes + span[0] * itemsize, span[1] * itemsize)
                op = Split(info, e, k, tensor.pieces, transposed, where, slab_shape)
                out.append(PlannedTensor(f"{disk.prefix}.{e}.{proj}.{kind}", info.dtype, shape, op))
    return out


def _copies(infos: list[TensorInfo]) -> list[PlannedTensor]:
    return [PlannedTensor(i.name, i.dtype, i.shape, Copy(i)) for i in infos]


def natural_key(name: str) -> tuple[Any, ...]:
    """Sort key ordering ``layers.2`` before ``layers.10``."""
    return tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))


def plan_conversion(
    infos: dict[str, TensorInfo], model: nn.Module, blocks: list[ExpertBlock], to: Target
) -> ConversionPlan:
    """Every output tensor (sorted by natural key) and what happens to each experts block."""
    if to not in TARGETS:
        raise CheckpointError(f"unknown target layout {to!r}; choose one of {', '.join(TARGETS)}")
    if not blocks:
        return ConversionPlan(_copies(list(infos.values())), [])
    found, others, unmatched = _classify(infos, PathResolver(model, blocks), blocks)
    tensors = _copies(others)
    actions = []
    for block in blocks:
        disk = found.get(block.path)
        action = BlockAction(block.path, disk.prefix if disk else "", block.class_name, block.description,
                             block.shapes.num_experts, "missing", "missing")
        actions.append(action)
        if disk is None:
            continue
        if disk.per_expert and disk.fused:
            raise CheckpointError(
                f"{disk.prefix} holds both per-expert and fused expert tensors; the checkpoint is inconsistent"
            )
        action.found = "per-expert" if disk.per_expert else "fused"
        sources = list((disk.per_expert or disk.fused).values())
        action.tensors_in = len(sources)
        action.nbytes = sum(i.nbytes for i in sources)
        if action.found == to:
            produced, action.action = _copies(sources), "kept"
        elif to == "fused":
            produced, action.action = _plan_merge(block, disk), "merged"
        else:
            produced, action.action = _plan_split(block, disk), "split"
        if action.action == "split":
            action.unused_slabs = sum(block.slab_count(t) - block.experts_in(t) for t in block.tensors)
        elif action.action == "merged":
            action.unused_slabs = sum(t.op.padding for t in produced)
        action.tensors_out = len(produced)
        action.nbytes_out = sum(t.nbytes for t in produced)
        if to == "per-expert":
            action.stock_loadable = block.stock_per_expert
        tensors += produced
    names = [t.name for t in tensors]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise CheckpointError(f"two output tensors would be named {dup}; the checkpoint mixes layouts for one block")
    tensors.sort(key=lambda t: natural_key(t.name))
    return ConversionPlan(tensors, actions, unmatched)
