"""Read-only discovery of fused and defused blocks."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .defused import DefusedExperts
from .layout import ExpertLayout, layout_of


@dataclass(frozen=True)
class FusedBlock:
    path: str
    class_name: str
    layout: ExpertLayout
    defused: bool


def find_fused_blocks(model: nn.Module) -> list[FusedBlock]:
    """Every experts block of ``model``, fused or already defused, with its layout."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, DefusedExperts):
            found.append(FusedBlock(path, module.fused_class.__name__, module.layout, True))
        elif (layout := layout_of(module)) is not None:
            found.append(FusedBlock(path, type(module).__name__, layout, False))
    return found
