"""How a fused experts block stores its experts, read from what Transformers declares.

Every experts class decorated with ``@use_experts_implementation`` carries four layout facts
(``has_gate``, ``has_bias``, ``is_transposed``, ``is_concatenated``): on the instance after
``__init__`` and in the closure of the wrapped ``__init__`` on the class. Parameter names follow
the contract of Transformers' generic experts forwards (``gate_up_proj`` or ``up_proj``,
``down_proj``, ``<name>_bias``), so no list of model names is needed here.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import LayoutError, UnmodelledStructureError

LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")


@dataclass(frozen=True)
class ExpertLayout:
    """Storage layout of one fused experts block.

    Shapes (E experts, H hidden, I intermediate): the first projection is ``[E, 2I, H]``
    (gated) or ``[E, I, H]`` (not gated) and ``down_proj`` is ``[E, H, I]``; transposed layouts
    swap the last two dims. Gated layouts hold gate and up either concatenated (``[gate; up]``)
    or interleaved (even rows gate, odd rows up, as gpt_oss).
    """

    has_gate: bool = True
    has_bias: bool = False
    is_transposed: bool = False
    is_concatenated: bool = True

    @property
    def in_proj(self) -> str:
        """Name of the fused input projection parameter."""
        return "gate_up_proj" if self.has_gate else "up_proj"

    @property
    def fused_names(self) -> tuple[str, ...]:
        """Every fused tensor name this layout owns."""
        names = (self.in_proj, "down_proj")
        if self.has_bias:
            names += (f"{self.in_proj}_bias", "down_proj_bias")
        return names

    def describe(self) -> str:
        """Short human-readable description, e.g. ``gated/concat/[E,out,in]``."""
        kind = "gated" if self.has_gate else "ungated"
        if self.has_gate:
            kind += "/concat" if self.is_concatenated else "/interleaved"
        kind += "/[E,in,out]" if self.is_transposed else "/[E,out,in]"
        if self.has_bias:
            kind += "/bias"
        return kind

    @classmethod
    def from_flags(cls, flags: dict[str, Any]) -> ExpertLayout:
        return cls(**{k: bool(flags[k]) for k in LAYOUT_FLAGS})


def _decorated_class(cls: type) -> type | None:
    """The class in ``cls``'s MRO (``cls`` itself or a base) that ``use_experts_implementation`` decorated:
    the first whose own ``__init__`` is the decorator's wrapper, closing over the layout flags."""
    for klass in getattr(cls, "__mro__", ()):
        init = klass.__dict__.get("__init__")
        if getattr(init, "__closure__", None) and all(flag in init.__code__.co_freevars for flag in LAYOUT_FLAGS):
            return klass
    return None


def _declared_closure(cls: type) -> dict[str, Any] | None:
    """Every value the ``use_experts_implementation`` wrapper of ``cls`` (or a base) closes over."""
    decorated = _decorated_class(cls)
    if decorated is None:
        return None
    init = decorated.__dict__["__init__"]
    return {name: cell.cell_contents for name, cell in zip(init.__code__.co_freevars, init.__closure__)}


def forward_overrides_of_class(cls: type) -> list[str]:
    """Classes from ``cls`` down to (not including) the class ``use_experts_implementation`` decorated
    that define their own ``forward``, nearest first. A defused block computes the decorated class's
    experts forward, so what such a ``forward`` adds around it (Transformers 5.25's ``ErgoExperts``:
    a per-expert norm of each route's output) would be lost. Empty for an undecorated ``cls``."""
    decorated = _decorated_class(cls)
    if decorated is None:
        return []
    overrides = []
    for klass in cls.__mro__:
        if klass is decorated:
            break
        if "forward" in klass.__dict__:
            overrides.append(klass.__name__)
    return overrides


def unmodelled_class_structure(cls: type) -> list[str]:
    """What a decorated experts class declares beyond the standard layout, before any instance exists:
    decorator flags off their default and ``forward`` overrides below the decorated class (each item
    names the thing; empty when there is none)."""
    extras = [f"decorator flag {n}={v!r}" for n, v in unmodelled_flags_of_class(cls).items()]
    decorated = _decorated_class(cls)
    extras += [f"its own forward ({name}.forward, around the decorated {decorated.__name__}'s)"
               for name in forward_overrides_of_class(cls)]
    return extras


def declared_flags_of_class(cls: type) -> dict[str, Any] | None:
    """Layout flags stamped by ``use_experts_implementation`` on ``cls`` (or a base), else None."""
    cells = _declared_closure(cls)
    return None if cells is None else {flag: cells[flag] for flag in LAYOUT_FLAGS}


# What the decorator's wrapper closes over besides flags: the wrapped constructor.
_WRAPPER_INTERNALS = frozenset({"original_init"})
# Decorator arguments that are not layout facts of one instance.
_NOT_FLAGS = frozenset({"experts_class", "experts_interface"})


@functools.lru_cache(maxsize=1)
def decorator_defaults() -> dict[str, Any]:
    """Keyword defaults of the installed ``use_experts_implementation``, other than the layout
    flags: at its default a flag leaves the generic experts forward as the standard layout's
    (``has_post_expert_norm=False`` in Transformers 5.24)."""
    try:
        from transformers.integrations.moe import use_experts_implementation
    except ImportError:  # pragma: no cover - transformers without the decorator
        return {}
    params = inspect.signature(use_experts_implementation).parameters.values()
    return {
        p.name: p.default
        for p in params
        if p.default is not p.empty and p.name not in _NOT_FLAGS and p.name not in LAYOUT_FLAGS
    }


def unmodelled_flags_of_class(cls: type) -> dict[str, Any]:
    """Decorator flags of ``cls`` that ``ExpertLayout`` does not model and that are not at the
    decorator's default (a flag the installed decorator does not even have counts as unmodelled)."""
    cells = _declared_closure(cls) or {}
    defaults = decorator_defaults()
    return {
        name: value
        for name, value in cells.items()
        if name not in LAYOUT_FLAGS and name not in _WRAPPER_INTERNALS
        and (name not in defaults or value != defaults[name])
    }


def unmodelled_structure(module: nn.Module, layout: ExpertLayout) -> list[str]:
    """What ``module`` holds beyond the standard layout: decorator flags off their default, a ``forward``
    of its own below the decorated class, parameters or buffers other than the layout's fused tensors,
    child modules other than a parameterless ``act_fn``. Each item names the thing; empty when the
    layout says everything."""
    extras = unmodelled_class_structure(type(module))
    for name, default in decorator_defaults().items():
        value = getattr(module, name, default)
        if value != default and not any(e.startswith(f"decorator flag {name}=") for e in extras):
            extras.append(f"decorator flag {name}={value!r}")
    own = set(layout.fused_names)
    extras += [f"parameter '{n}'" for n, _ in module.named_parameters(recurse=False) if n not in own]
    extras += [f"buffer '{n}'" for n, _ in module.named_buffers(recurse=False) if n not in own]
    for name, child in module.named_children():
        stateless = next(iter(child.parameters()), None) is None and next(iter(child.buffers()), None) is None
        if name != "act_fn" or not stateless:
            extras.append(f"child module '{name}' ({type(child).__name__})")
    return extras


def refuse_unmodelled(module: nn.Module, layout: ExpertLayout, path: str) -> None:
    """Raise ``UnmodelledStructureError`` when ``module`` holds anything the standard layout does not model:
    a defused block would drop it and compute something else."""
    extras = unmodelled_structure(module, layout)
    if extras:
        raise UnmodelledStructureError(
            f"{path} ({type(module).__name__}) has {', '.join(extras)}, which the standard fused-experts layout "
            f"does not model: defusing it would drop that and change the output, so it is refused. Exclude the block "
            f"with a '-:' filter rule, or add an explicit entry in defuser_quant/core/families.py that models it."
        )


def is_fused_experts_class(cls: type) -> bool:
    """True for classes decorated with ``@use_experts_implementation``."""
    return isinstance(cls, type) and issubclass(cls, nn.Module) and declared_flags_of_class(cls) is not None


def layout_of(module: nn.Module) -> ExpertLayout | None:
    """Layout of a fused experts instance, or None when ``module`` is not one.

    Instance attributes win over the class declaration: Transformers stamps them in
    ``__init__`` and a model may legitimately override them.
    """
    if all(hasattr(module, flag) for flag in LAYOUT_FLAGS):
        return ExpertLayout.from_flags({flag: getattr(module, flag) for flag in LAYOUT_FLAGS})
    flags = declared_flags_of_class(type(module))
    return ExpertLayout.from_flags(flags) if flags is not None else None


def fused_tensor(module: nn.Module, name: str) -> torch.Tensor | None:
    """A fused tensor held as parameter or buffer, else None."""
    if name in module._parameters:
        return module._parameters[name]
    if name in module._buffers:
        return module._buffers[name]
    return None


@dataclass(frozen=True)
class ExpertShapes:
    num_experts: int
    hidden: int
    intermediate: int


def check_shapes(module: nn.Module, layout: ExpertLayout, path: str) -> ExpertShapes:
    """Validate the fused tensors against ``layout`` and return E, H, I. Raises LayoutError."""
    tensors = {}
    for name in layout.fused_names:
        t = fused_tensor(module, name)
        if t is None:
            raise LayoutError(
                f"{path} ({type(module).__name__}) declares layout {layout.describe()} but has no "
                f"tensor '{name}'. Add an explicit layout entry for this family in defuser_quant/core/families.py."
            )
        tensors[name] = t
    w_in, w_down = tensors[layout.in_proj], tensors["down_proj"]
    if w_in.dim() != 3 or w_down.dim() != 3:
        raise LayoutError(
            f"{path}: expected 3-D fused expert tensors, got {layout.in_proj} {tuple(w_in.shape)} and "
            f"down_proj {tuple(w_down.shape)}."
        )
    num_experts = w_in.shape[0]
    if layout.is_transposed:
        hidden, in_out = w_in.shape[1], w_in.shape[2]
        down_in, down_out = w_down.shape[1], w_down.shape[2]
    else:
        in_out, hidden = w_in.shape[1], w_in.shape[2]
        down_out, down_in = w_down.shape[1], w_down.shape[2]
    intermediate = in_out // 2 if layout.has_gate else in_out
    expected_down = (num_experts, down_in, down_out)
    if (layout.has_gate and in_out % 2) or expected_down != (w_down.shape[0], intermediate, hidden):
        raise LayoutError(
            f"{path}: {layout.in_proj} {tuple(w_in.shape)} and down_proj {tuple(w_down.shape)} are inconsistent "
            f"with layout {layout.describe()} (E={num_experts}, H={hidden}, I={intermediate})."
        )
    if layout.has_bias:
        for name, width in ((f"{layout.in_proj}_bias", in_out), ("down_proj_bias", hidden)):
            if tuple(tensors[name].shape) != (num_experts, width):
                raise LayoutError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, expected {(num_experts, width)}.")
    return ExpertShapes(num_experts, hidden, intermediate)
