"""The adapter protocol: how one kind of fused experts module becomes a ``DefusedExperts``.

``convert_model``, ``fuse_model`` and the pre-load patch ask an adapter for everything that
differs between families: the fused tensors and their pieces, the shape checks, the per-expert
names, the gate function and the block class (whose forward keeps the family's call contract).
``StandardAdapter`` serves every class decorated with ``@use_experts_implementation`` from the
layout facts the decorator stamps; irregular families subclass it (see ``families.py``).
"""

from __future__ import annotations

from torch import nn

from ..defused import DefusedExpert, DefusedExperts, GateFunction
from ..errors import LayoutError
from ..layout import ExpertLayout, ExpertShapes, check_shapes, layout_of, refuse_unmodelled
from ..naming import ProjectionNames, projection_names
from ..tensors import FusedTensor, get_tensor, layout_tensors


class StandardAdapter:
    """Decorated experts classes: everything follows from the instance's ``ExpertLayout``."""

    family: str | None = None
    block_class: type[DefusedExperts] = DefusedExperts
    expert_class: type[DefusedExpert] = DefusedExpert
    stock_per_expert = True  # False: stock Transformers cannot load this family's per-expert checkpoints

    def applies(self, module: nn.Module) -> bool:
        """False for instances with nothing to defuse (longcat_flash without routed experts)."""
        return self.layout(module) is not None

    def layout(self, module: nn.Module) -> ExpertLayout | None:
        return layout_of(module)

    def tensors(self, module: nn.Module | None, layout: ExpertLayout) -> list[FusedTensor]:
        """The block's fused tensors; ``module`` None asks for what checkpoint patterns need
        (paths, pieces, leaves), without instance sizes."""
        return layout_tensors(layout)

    def check(self, module: nn.Module, layout: ExpertLayout, path: str) -> ExpertShapes:
        """Validate ``module`` against ``layout``; refuse anything the layout does not model."""
        refuse_unmodelled(module, layout, path)
        return check_shapes(module, layout, path)

    def names(self, layout: ExpertLayout, model_type: str | None, fallback_type: str | None) -> ProjectionNames:
        return projection_names(model_type, layout.has_gate, fallback_type)

    def gate(self, shell: nn.Module, layout: ExpertLayout) -> GateFunction:
        return GateFunction(shell, layout)

    def describe(self, layout: ExpertLayout) -> str:
        return layout.describe()

    def exact(self, layout: ExpertLayout) -> bool:
        """True when the defused forward is bit-identical to the fused eager forward."""
        return not layout.is_transposed


class FixedLayoutAdapter(StandardAdapter):
    """An undecorated class whose storage is a standard layout (declared in ``families.py``)."""

    def __init__(self, layout: ExpertLayout, family: str):
        self.fixed = layout
        self.family = family

    def layout(self, module: nn.Module) -> ExpertLayout | None:
        return self.fixed


def require(module: nn.Module, path: str, name: str, shape: tuple[int, ...]) -> None:
    """Raise ``LayoutError`` unless ``module`` holds a tensor ``name`` of ``shape``."""
    tensor = get_tensor(module, name)
    if tensor is None:
        raise LayoutError(f"{path} ({type(module).__name__}) has no tensor '{name}'; its families.py entry is stale")
    if tuple(tensor.shape) != tuple(shape):
        raise LayoutError(f"{path}: {name} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")


def gated_concat() -> FixedLayoutAdapter:
    """Factory for undecorated classes stored as the default ``[E, 2I, H]`` / ``[E, H, I]`` layout."""
    return FixedLayoutAdapter(ExpertLayout(), family="")
