"""Checkpoint conversion ops for the pre-load path: split fused expert tensors per expert.

A fused checkpoint (``experts.gate_up_proj`` ``[E, 2I, H]``) loaded into a patched model is
split into the per-expert weights the ``DefusedExperts`` children hold. The op follows any
transform Transformers applies to that tensor first (qwen3_vl_moe's transpose), then slices with
the same piece functions ``convert_model`` uses, so both paths agree by construction.
"""

from __future__ import annotations

import functools
import math
import re
from typing import Any

import torch
from torch import nn

from .layout import ExpertLayout, declared_flags_of_class
from .slicing import PiecesFn


class SplitFusedExperts:
    """Conversion op: one fused expert tensor -> per-expert tensors named by the target patterns.

    ``attr`` is the block's attribute name in its parent (``experts``; jetmoe's
    ``input_linear``): targets read ``<attr>.0.<leaf>`` and expert ``e`` replaces the ``0``. When
    the model's defused block is found, a flattened tensor (dbrx ``[E*I, H]``) is viewed as the
    block's slabs and only the experts it holds are emitted (longcat_flash's identity slabs are
    dropped).
    """

    def __init__(self, pieces: PiecesFn, kind: str, attr: str = "experts", targets: list[str] | None = None):
        self.pieces = pieces
        self.kind = kind
        self.attr = attr
        self.targets = targets  # expert-0 names of every piece, when the converter names only the first

    def __repr__(self) -> str:
        return f"SplitFusedExperts({self.kind})"

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str], **kwargs):
        (tensors,) = input_dict.values()
        fused = tensors[0] if isinstance(tensors, list) else tensors
        block = self._block(target_patterns, kwargs)
        count = None
        if block is not None:
            spec = block.specs.get(self.kind)
            if spec is not None and tuple(fused.shape) != spec.shape and fused.numel() == math.prod(spec.shape):
                fused = fused.reshape(spec.shape)
            count = len(block)
        fused = self._orient(fused, self.targets or target_patterns, kwargs)
        out = {}
        marker = f"{self.attr}.0."
        for e in range(fused.shape[0] if count is None else min(count, fused.shape[0])):
            for pattern, piece in zip(self.targets or target_patterns, self.pieces(fused[e])):
                out[pattern.replace(marker, f"{self.attr}.{e}.", 1)] = piece.contiguous()
        return out

    def _block(self, target_patterns: list[str], kwargs: dict) -> nn.Module | None:
        """The model's defused block this tensor loads into, when it can be found."""
        model, name = kwargs.get("model"), kwargs.get("full_layer_name")
        if model is None or not name or target_patterns[0] not in name:
            return None
        path = name[: name.rfind(target_patterns[0])] + self.attr
        try:
            block = model.get_submodule(path)
        except AttributeError:
            return None
        return block if hasattr(block, "specs") else None

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
        raise NotImplementedError(
            "SplitFusedExperts is load-only: its converter saves defused models under their per-expert names"
        )


class SplitDenseGateUp:
    """Conversion op: a dense MLP's fused ``gate_up_proj`` weight or bias -> ``gate_proj``/``up_proj``.

    The half that is the gate is read from the (split) MLP the tensor loads into; without a
    model, the first half is the gate.
    """

    def __repr__(self) -> str:
        return "SplitDenseGateUp()"

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str], **kwargs):
        (tensors,) = input_dict.values()
        fused = tensors[0] if isinstance(tensors, list) else tensors
        first, second = (t.contiguous() for t in fused.chunk(2, dim=0))
        gate_first = True
        model, name = kwargs.get("model"), kwargs.get("full_layer_name")
        if model is not None and name and target_patterns[0] in name:
            try:
                mlp = model.get_submodule(name[: name.rfind(target_patterns[0])].rstrip("."))
                gate_first = getattr(mlp.__dict__.get("gate_up_proj"), "gate_first", True)
            except AttributeError:
                pass
        gate, up = (first, second) if gate_first else (second, first)
        return {target_patterns[0]: gate, target_patterns[1]: up}


def is_dense_merge(transform: Any) -> bool:
    """True for converters that build a dense MLP's fused ``gate_up_proj`` weight or bias."""
    targets = list(getattr(transform, "target_patterns", []) or [])
    if not hasattr(transform, "operations") or len(targets) != 1:
        return False
    return re.search(r"gate_up_proj\.(weight|bias)$", targets[0]) is not None and "experts" not in targets[0]


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


def _stacked_sources(existing: list, fused_name: str) -> list[tuple[list[str], list, str]]:
    """(sources, ops, target prefix) of existing transforms that build ``experts.<fused_name>`` from
    other checkpoint tensors than per-expert ones (step3p7 concatenates stacked ``moe.gate_proj``
    and ``moe.up_proj``): the split is chained after their ops."""
    found = []
    for transform in existing:
        targets = list(getattr(transform, "_original_target_patterns", []) or [])
        sources = list(getattr(transform, "_original_source_patterns", []) or [])
        if not hasattr(transform, "operations") or len(targets) != 1 or not targets[0].endswith(f"experts.{fused_name}"):
            continue
        if any("*" in src for src in sources) or (len(sources) == 1 and sources[0].endswith(f"experts.{fused_name}")):
            continue  # per-expert merges are dropped; fused->fused transforms are handled by _existing_ops
        found.append((sources, list(transform.operations), targets[0][: targets[0].rindex("experts.")]))
    return found


class MergeThenSplit:
    """Runs an existing merge (e.g. ``Concatenate``) on the checkpoint tensors, then splits the
    fused result per expert."""

    _FUSED = "__fused__"

    def __init__(self, ops: list, split: SplitFusedExperts):
        self.ops = ops
        self.split = split

    def __repr__(self) -> str:
        return f"MergeThenSplit({self.ops}, {self.split})"

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str], **kwargs):
        for op in self.ops:
            input_dict = op.convert(input_dict, source_patterns=source_patterns, target_patterns=[self._FUSED], **kwargs)
        return self.split.convert(input_dict, source_patterns, target_patterns, **kwargs)


class SplitExpertList:
    """Conversion op: one per-expert list numbered across several blocks (ernie4_5_vl_moe's
    ``experts.{i}``: text experts, then vision experts) -> each block's own per-expert names.

    The list is cut into equal consecutive runs, one per group, as Transformers'
    ``ErnieFuseAndSplitTextVisionExperts`` does."""

    def __init__(self, groups: tuple[str, ...], leaf: str):
        self.groups = groups
        self.leaf = leaf

    def __repr__(self) -> str:
        return f"SplitExpertList({self.groups}, {self.leaf})"

    @torch.no_grad()
    def convert(self, input_dict: dict[str, Any], source_patterns: list[str], target_patterns: list[str], **kwargs):
        (tensors,) = input_dict.values()
        tensors = tensors if isinstance(tensors, list) else [tensors]
        per_group = math.ceil(len(tensors) / len(self.groups))
        return {
            f"{self.groups[i // per_group]}.experts.{i % per_group}.{self.leaf}": t.contiguous()
            for i, t in enumerate(tensors)
        }


def expert_list_converters(groups: tuple[str, ...], names: Any) -> list:
    """WeightConverters loading a shared per-expert list into each group's per-expert Linears."""
    converter_cls = _split_converter_class()
    leaves = [f"{getattr(names, role)}.weight" for role in ("gate", "up", "down") if getattr(names, role) is not None]
    return [
        converter_cls(
            # "mlp." keeps the pattern off the groups' own per-expert keys (mlp.text_moe.experts.0...)
            source_patterns=f"mlp.experts.*.{leaf}",
            target_patterns=f"mlp.{groups[0]}.experts.0.{leaf}",
            operations=[SplitExpertList(groups, leaf)],
        )
        for leaf in leaves
    ]


_NEVER_MATCHES = r"(?!)"


@functools.cache
def _split_converter_class():
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    class SplitExpertsConverter(WeightConverter):
        """Splits a fused checkpoint tensor on load; saving keeps the per-expert names.

        A defused model is saved as what it is (per-expert Linears, possibly quantized), so the
        reverse transform is a renaming that matches nothing.
        """

        def reverse_transform(self):
            return WeightRenaming(_NEVER_MATCHES, _NEVER_MATCHES)

    SplitExpertsConverter.__qualname__ = SplitExpertsConverter.__name__  # pickled by reference: see __getattr__
    return SplitExpertsConverter


def dense_split_converters() -> list:
    """WeightConverters splitting a dense MLP's fused ``gate_up_proj.weight``/``.bias`` on load."""
    converter_cls = _split_converter_class()
    return [
        converter_cls(
            source_patterns=rf"gate_up_proj\.{leaf}$",
            target_patterns=[f"gate_proj.{leaf}", f"up_proj.{leaf}"],
            operations=[SplitDenseGateUp()],
        )
        for leaf in ("weight", "bias")
    ]


@functools.cache
def _never_reversed_renaming_class():
    from transformers.core_model_loading import WeightRenaming

    class LoadOnlyRenaming(WeightRenaming):
        """A renaming applied on load only (saving keeps the names the model has)."""

        def reverse_transform(self):
            return WeightRenaming(_NEVER_MATCHES, _NEVER_MATCHES)

    LoadOnlyRenaming.__qualname__ = LoadOnlyRenaming.__name__
    return LoadOnlyRenaming


def __getattr__(name: str) -> type:
    """The converter classes, built on first use (importing Transformers' loading code costs ~1 s).

    A loaded model keeps its conversion mapping, so these must be reachable by name for
    ``torch.save(model)``/``pickle`` and for loading such a pickle in a fresh process.
    """
    lazy = {"SplitExpertsConverter": _split_converter_class, "LoadOnlyRenaming": _never_reversed_renaming_class}
    if name in lazy:
        return lazy[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def doubled_expert_segments(renamings: list) -> list[str]:
    r"""Segments a renaming inserts before ``experts.`` (mistral_large4_text's ``\.experts\.`` ->
    ``\.mlp.experts\.``, for checkpoints holding experts beside the MLP): it also fires on keys
    that already have the segment, doubling it."""
    found = []
    for transform in renamings:
        sources = getattr(transform, "_original_source_patterns", None) or transform.source_patterns
        targets = getattr(transform, "_original_target_patterns", None) or transform.target_patterns
        for source, target in zip(sources, targets):
            plain_source, plain_target = source.replace("\\", ""), target.replace("\\", "")
            if plain_source == ".experts." and plain_target.endswith(".experts.") and plain_target != plain_source:
                segment = plain_target[1 : -len(".experts.")]
                if re.fullmatch(r"\w+", segment):
                    found.append(segment)
    return found


def collapse_doubled_prefix(segment: str = "language_model", before: str = "") -> Any:
    r"""A load-only renaming ``<segment>.<segment>.`` -> ``<segment>.``.

    Renamings such as deepseek_ocr2's ``(^|model\.)layers\.`` -> ``\1language_model.layers.``
    also fire on keys that already carry the prefix; Transformers then retries such a key
    unrenamed when the model has it, which never happens for a fused key the patched model holds
    per expert. Collapsing the doubled segment gives the split converter the right name.
    """
    if before:  # only where ``before`` follows (``mlp.mlp.experts.`` -> ``mlp.experts.``)
        return _never_reversed_renaming_class()(rf"{segment}\.{segment}\.{before}\.", f"{segment}.{before}.")
    return _never_reversed_renaming_class()(rf"{segment}\.{segment}\.", f"{segment}.")


def fused_split_converters(model_type: str, classes: list[type[nn.Module]], existing: list) -> list:
    """WeightConverters that split fused checkpoint tensors into the patched per-expert names."""
    from .defuse import adapter_for_class
    from .families import experts_entry_for

    converter_cls = _split_converter_class()
    converters = []
    seen: set[tuple[str, ...]] = set()
    for cls in classes:
        adapter = adapter_for_class(cls)
        entry = experts_entry_for(cls)
        flags = declared_flags_of_class(cls)
        layout = ExpertLayout.from_flags(flags) if flags is not None else adapter.layout(None)
        names = adapter.names(layout, model_type, None)  # the type whose mapping is patched
        tensors = adapter.tensors(None, layout)
        # Longer paths first: "gate_up_proj" would also match "gate_up_proj_bias".
        tensors = sorted(tensors, key=lambda t: -len(t.path))
        for attr in entry.attrs if entry is not None else ("experts",):
            for plan in tensors:
                leaves = [f"{getattr(names, role)}.{kind}" for role, kind in plan.leaves]
                key = (attr, plan.path, *leaves)
                if key in seen:
                    continue
                seen.add(key)
                source, ops = _existing_ops(existing, plan.path) if attr == "experts" else (None, [])
                source = source or f"{attr}.{plan.path}$"
                # The renaming replaces the matched source text, so targets repeat its prefix
                # (qwen3_vl_moe matches "mlp.experts..."). Concrete expert 0 names: the loader checks the
                # renamed key exists in the model; the op emits every expert and they are re-prefixed.
                prefix = source[: source.index(f"{attr}.{plan.path}")]
                converters.append(
                    converter_cls(
                        source_patterns=source,
                        target_patterns=[f"{prefix}{attr}.0.{leaf}" for leaf in leaves],
                        operations=[*ops, SplitFusedExperts(plan.pieces, plan.path, attr)],
                    )
                )
                if attr != "experts":
                    continue
                for sources, merge_ops, target_prefix in _stacked_sources(existing, plan.path):
                    # Many sources may map to one target only: name the first piece, the op emits all.
                    targets = [f"{target_prefix}experts.0.{leaf}" for leaf in leaves]
                    split = SplitFusedExperts(plan.pieces, plan.path, attr, targets=targets)
                    converters.append(
                        converter_cls(
                            source_patterns=sources,
                            target_patterns=targets[:1],
                            operations=[MergeThenSplit(merge_ops, split)],
                        )
                    )
    return converters
