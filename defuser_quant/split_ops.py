"""Checkpoint conversion ops for the pre-load path: split fused expert tensors per expert.

A fused checkpoint (``experts.gate_up_proj`` ``[E, 2I, H]``) loaded into a patched model is
split into the per-expert weights the ``DefusedExperts`` children hold. The op follows any
transform Transformers applies to that tensor first (qwen3_vl_moe's transpose), then slices with
the same piece functions ``convert_model`` uses, so both paths agree by construction.
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn

from .layout import ExpertLayout, declared_flags_of_class
from .naming import projection_names
from .slicing import PiecesFn, down_pieces, in_bias_pieces, in_proj_pieces, whole_slab


class SplitFusedExperts:
    """Conversion op: one fused expert tensor -> per-expert tensors named by the target patterns."""

    def __init__(self, pieces: PiecesFn, kind: str):
        self.pieces = pieces
        self.kind = kind

    def __repr__(self) -> str:
        return f"SplitFusedExperts({self.kind})"

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str], **kwargs):
        (tensors,) = input_dict.values()
        fused = self._orient(tensors[0] if isinstance(tensors, list) else tensors, target_patterns, kwargs)
        out = {}
        for e in range(fused.shape[0]):
            for pattern, piece in zip(target_patterns, self.pieces(fused[e])):
                out[pattern.replace("experts.0.", f"experts.{e}.", 1)] = piece.contiguous()
        return out

    def _orient(self, fused: torch.Tensor, target_patterns: list[str], kwargs: dict) -> torch.Tensor:
        """Checkpoints may store a fused tensor with its last two dims swapped (original Qwen3-VL-MoE
        releases); like Transformers' ``Transpose(check_dims=True)``, take whichever orientation
        yields the per-expert shapes the model holds, preferring the tensor as stored."""
        model, name = kwargs.get("model"), kwargs.get("full_layer_name")
        if model is None or not name or fused.dim() != 3:
            return fused
        prefix = name[: name.rfind(target_patterns[0])] if target_patterns[0] in name else None
        if prefix is None:
            return fused
        try:
            expected = [tuple(model.get_parameter(prefix + p).shape) for p in target_patterns]
        except AttributeError:
            return fused
        for candidate in (fused, fused.transpose(1, 2)):
            if [tuple(p.shape) for p in self.pieces(candidate[0])] == expected:
                return candidate
        raise ValueError(
            f"{name}: fused checkpoint tensor of shape {tuple(fused.shape)} matches none of the per-expert "
            f"shapes {expected} in either orientation"
        )

    @property
    def reverse_op(self):
        return MergeFusedExperts(self.pieces, self.kind)


class MergeFusedExperts:
    """Reverse of ``SplitFusedExperts`` (used by ``save_pretrained(save_original_format=True)``)."""

    def __init__(self, pieces: PiecesFn, kind: str):
        self.pieces = pieces
        self.kind = kind

    def __repr__(self) -> str:
        return f"MergeFusedExperts({self.kind})"

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str], **kwargs):
        per_pattern = [input_dict[p] for p in source_patterns]
        num = len(per_pattern[0])
        first = per_pattern[0][0]
        probe_slab = [t.shape for t in (lst[0] for lst in per_pattern)]
        del probe_slab
        slab_numel = sum(lst[0].numel() for lst in per_pattern)
        fused = torch.empty((num, slab_numel), dtype=first.dtype, device=first.device)
        shape = self._slab_shape(per_pattern)
        fused = fused.view(num, *shape)
        for e in range(num):
            for dst, lst in zip(self.pieces(fused[e]), per_pattern):
                dst.copy_(lst[e])
        return {target_patterns[0]: fused}

    def _slab_shape(self, per_pattern) -> tuple[int, ...]:
        for candidate in _candidate_shapes(per_pattern):
            probe = torch.empty(candidate, device="meta")
            if [tuple(p.shape) for p in self.pieces(probe)] == [tuple(lst[0].shape) for lst in per_pattern]:
                return candidate
        raise ValueError(f"cannot infer the fused slab shape for {self.kind}")

    @property
    def reverse_op(self):
        return SplitFusedExperts(self.pieces, self.kind)


def _candidate_shapes(per_pattern) -> list[tuple[int, ...]]:
    shapes = [tuple(lst[0].shape) for lst in per_pattern]
    n = len(shapes)
    if len(shapes[0]) == 1:
        return [(shapes[0][0] * n,)]
    out_dim, in_dim = shapes[0]
    return [(out_dim * n, in_dim), (in_dim, out_dim * n)]


def is_expert_merge(transform: Any) -> bool:
    """True for converters that build a fused experts tensor (merges, transposes) from a checkpoint."""
    targets = list(getattr(transform, "target_patterns", []) or [])
    if not hasattr(transform, "operations"):
        return False
    return any(re.search(r"experts\.(gate_up_proj|up_proj|down_proj)(_bias)?$", t) for t in targets)


def _existing_ops(existing: list, fused_name: str) -> tuple[str | None, list]:
    """(checkpoint-side source pattern, ops) of an existing fused->fused transform for ``fused_name``."""
    for transform in existing:
        targets = list(getattr(transform, "_original_target_patterns", []) or [])
        sources = list(getattr(transform, "_original_source_patterns", []) or [])
        if len(targets) == 1 and len(sources) == 1 and targets[0].endswith(f"experts.{fused_name}") and sources[0].endswith(
            f"experts.{fused_name}"
        ):
            # Orientation is decided by SplitFusedExperts itself from the per-expert shapes;
            # Transformers' Transpose(check_dims=True) would compare against the fused shape.
            return sources[0], [op for op in transform.operations if type(op).__name__ != "Transpose"]
    return None, []


_NEVER_MATCHES = r"(?!)"


def _split_converter_class():
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    class SplitExpertsConverter(WeightConverter):
        """Splits a fused checkpoint tensor on load; saving keeps the per-expert names.

        A defused model is saved as what it is (per-expert Linears, possibly quantized), so the
        reverse transform is a renaming that matches nothing.
        """

        def reverse_transform(self):
            return WeightRenaming(_NEVER_MATCHES, _NEVER_MATCHES)

    return SplitExpertsConverter


def fused_split_converters(model_type: str, classes: list[type[nn.Module]], existing: list) -> list:
    """WeightConverters that split fused checkpoint tensors into the patched per-expert names."""
    converter_cls = _split_converter_class()
    converters = []
    seen: set[tuple[str, ...]] = set()
    for cls in classes:
        layout = ExpertLayout.from_flags(declared_flags_of_class(cls))
        names = projection_names(model_type, layout.has_gate)  # the type whose mapping is patched
        in_roles = [names.gate, names.up] if layout.has_gate else [names.up]
        plan = []
        if layout.has_bias:  # bias first: "gate_up_proj" would also match "gate_up_proj_bias"
            plan += [(f"{layout.in_proj}_bias", in_bias_pieces(layout), [f"{r}.bias" for r in in_roles])]
            plan += [("down_proj_bias", whole_slab, [f"{names.down}.bias"])]
        plan += [(layout.in_proj, in_proj_pieces(layout), [f"{r}.weight" for r in in_roles])]
        plan += [("down_proj", down_pieces(layout), [f"{names.down}.weight"])]
        for fused_name, pieces, leaves in plan:
            key = (fused_name, *leaves)
            if key in seen:
                continue
            seen.add(key)
            source, ops = _existing_ops(existing, fused_name)
            source = source or f"experts.{fused_name}$"
            # The renaming replaces the matched source text, so targets repeat its prefix
            # (qwen3_vl_moe matches "mlp.experts..."). Concrete expert 0 names: the loader checks the
            # renamed key exists in the model; the op emits every expert and they are re-prefixed.
            prefix = source[: source.index(f"experts.{fused_name}")]
            converters.append(
                converter_cls(
                    source_patterns=source,
                    target_patterns=[f"{prefix}experts.0.{leaf}" for leaf in leaves],
                    operations=[*ops, SplitFusedExperts(pieces, fused_name)],
                )
            )
    return converters
