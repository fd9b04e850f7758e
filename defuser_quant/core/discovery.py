"""Read-only discovery of fused and defused blocks."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .defused import DefusedExperts
from .dense import DENSE_LAYOUT, dense_entry, is_split
from .layout import ExpertLayout

_DENSE = ExpertLayout()  # two halves of one [2I, H] weight, gate first or second


@dataclass(frozen=True)
class FusedBlock:
    """One experts block or fused dense MLP, fused or already converted.

    ``exact``: the converted forward is bit-identical to the fused one (else within 1e-6
    relative in fp32: transposed storage computes ``x @ W`` where a Linear computes ``x @ W.T``).
    """

    path: str
    class_name: str
    layout: ExpertLayout
    defused: bool
    kind: str = "experts"  # "experts" | "dense_mlp"
    family: str | None = None  # explicit entry in families.py, None for decorated classes
    description: str = ""
    exact: bool = True


def find_fused_blocks(model: nn.Module, *, dense: bool = True) -> list[FusedBlock]:
    """Every experts block of ``model`` (and fused dense MLP, unless ``dense=False``), fused or
    already converted, with its layout."""
    from .defuse import adapter_for, adapter_for_class

    found = []
    for path, module in model.named_modules():
        if isinstance(module, DefusedExperts):
            adapter = adapter_for_class(module.fused_class)
            desc, exact = adapter.describe(module.layout), adapter.exact(module.layout)
            found.append(
                FusedBlock(path, module.fused_class.__name__, module.layout, True, "experts", module.family, desc, exact)
            )
        elif (adapter := adapter_for(module)) is not None:
            layout = adapter.layout(module)
            found.append(
                FusedBlock(
                    path, type(module).__name__, layout, False, "experts", adapter.family, adapter.describe(layout),
                    adapter.exact(layout),
                )
            )
        elif dense and (is_split(module) or dense_entry(module) is not None):
            found.append(FusedBlock(path, type(module).__name__, _DENSE, is_split(module), "dense_mlp", None, DENSE_LAYOUT))
    return found
