"""Dense MLPs with a fused ``gate_up_proj`` ``nn.Linear``: split into ``gate_proj`` / ``up_proj``.

phi3, glm, glm4, glm4v, dia, zamba2, ... compute ``gate_up_proj(x).chunk(2, -1)``. Splitting
happens in place on the MLP module: ``gate_proj`` and ``up_proj`` become ``nn.Linear``
children whose weights are views of the two halves of the fused weight (zero copy), and the
``gate_up_proj`` child is replaced by a plain callable (not a submodule, so it adds nothing to
the state dict) that returns ``cat(gate_proj(x), up_proj(x))`` in the fused order. The family's
own forward runs unchanged, so every variant (zamba2's adapters, phi4's audio MLP that activates
the second half, minimax's clamps) keeps its math; slicing a matmul's output columns equals the
matmul on the weight rows, so the result is bit-identical. ``fuse_dense_mlp`` undoes it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .defused import fast_linear
from .errors import FuseError, LayoutError
from .families import DenseMlpEntry, dense_entry_for

logger = logging.getLogger(__name__)

DENSE_LAYOUT = "dense gate_up [2I,H]"


class FusedGateUp:
    """Stands in for a split MLP's ``gate_up_proj``: the fused projection computed from the halves."""

    def __init__(self, mlp: nn.Module, gate_first: bool, fused: nn.Linear):
        self.mlp = mlp
        self.gate_first = gate_first
        self.in_features = fused.in_features
        self.out_features = fused.out_features
        self.has_bias = fused.bias is not None
        self.requires_grad = fused.weight.requires_grad

    def halves(self) -> tuple[nn.Module, nn.Module]:
        """(first, second) half projections in the fused order."""
        gate, up = self.mlp.gate_proj, self.mlp.up_proj
        return (gate, up) if self.gate_first else (up, gate)

    def __call__(self, hidden_states: torch.Tensor) -> torch.Tensor:
        first, second = self.halves()
        return torch.cat((first(hidden_states), second(hidden_states)), dim=-1)

    @property
    def weight(self) -> torch.Tensor:
        """A ``meta`` tensor of the fused shape, for code that inspects it (no copy)."""
        first = self.mlp.gate_proj.weight
        return torch.empty((self.out_features, self.in_features), dtype=first.dtype, device="meta")

    def __repr__(self) -> str:
        return f"FusedGateUp(split into gate_proj/up_proj, gate_first={self.gate_first})"


def is_split(mlp: nn.Module) -> bool:
    """True for an MLP this module split (``gate_up_proj`` is a ``FusedGateUp``)."""
    return isinstance(mlp.__dict__.get("gate_up_proj"), FusedGateUp)


def dense_entry(mlp: nn.Module) -> DenseMlpEntry | None:
    """The entry of a dense fused MLP that is still fused (``gate_up_proj`` a plain ``nn.Linear``)."""
    entry = dense_entry_for(type(mlp))
    if entry is None or type(mlp._modules.get("gate_up_proj")) is not nn.Linear:
        return None
    return entry


@dataclass(frozen=True)
class DensePlan:
    path: str
    mlp: nn.Module
    entry: DenseMlpEntry


def check_dense(mlp: nn.Module, path: str) -> None:
    """Raise ``LayoutError`` unless ``mlp`` is a splittable fused MLP."""
    fused = mlp._modules["gate_up_proj"]
    if fused.out_features % 2:
        raise LayoutError(f"{path}.gate_up_proj has {fused.out_features} output features, not an even gate/up split")
    if "gate_proj" in mlp._modules or "up_proj" in mlp._modules:
        raise LayoutError(f"{path} already has gate_proj/up_proj children next to gate_up_proj")


def _halves(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    width = t.shape[0] // 2
    return t.narrow(0, 0, width), t.narrow(0, width, width)


def split_dense_mlp(mlp: nn.Module, gate_first: bool, undo: list[Callable[[], None]] | None = None) -> None:
    """Split ``mlp.gate_up_proj`` into ``gate_proj`` / ``up_proj`` views in place (see module doc)."""
    fused = mlp._modules["gate_up_proj"]
    weight, bias = fused.weight, fused.bias
    first_w, second_w = _halves(weight.data if weight.device.type != "meta" else weight.detach())
    first_b, second_b = _halves(bias.detach()) if bias is not None else (None, None)
    if weight.device.type == "meta":
        first_w, second_w = first_w.contiguous(), second_w.contiguous()
    first = fast_linear(first_w, first_b, weight.requires_grad)
    second = fast_linear(second_w, second_b, weight.requires_grad)
    for name in ("weight", "bias"):  # gradients go with their halves (views, no copy)
        grad = getattr(getattr(fused, name), "grad", None)
        if grad is not None:
            getattr(first, name).grad, getattr(second, name).grad = _halves(grad)
    gate, up = (first, second) if gate_first else (second, first)
    _replace_children(mlp, ("gate_up_proj",), {"gate_proj": gate, "up_proj": up})
    mlp.__dict__["gate_up_proj"] = FusedGateUp(mlp, gate_first, fused)
    if undo is not None:
        undo.append(lambda: _unsplit(mlp, fused))


def _replace_children(mlp: nn.Module, old: tuple[str, ...], new: dict[str, nn.Module]) -> None:
    """Replace the children ``old`` by ``new`` where the first of ``old`` was (state dict order)."""
    items = []
    for name, child in mlp._modules.items():
        if name == old[0]:
            items.extend(new.items())
        elif name not in old:
            items.append((name, child))
    mlp._modules.clear()
    mlp._modules.update(items)


def _unsplit(mlp: nn.Module, fused: nn.Linear) -> None:
    mlp.__dict__.pop("gate_up_proj", None)
    _replace_children(mlp, ("gate_proj", "up_proj"), {"gate_up_proj": fused})


def _adjacent(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``cat((a, b))`` as a view of their shared storage when they lie back to back, else None."""
    if a.device.type == "meta" or a.dtype != b.dtype or not (a.is_contiguous() and b.is_contiguous()):
        return None
    if a.shape[1:] != b.shape[1:] or a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return None
    if a.storage_offset() + a.numel() != b.storage_offset():
        return None
    shape = (a.shape[0] + b.shape[0], *a.shape[1:])
    probe = torch.empty(shape, dtype=a.dtype, device="meta")
    return torch.empty(0, dtype=a.dtype, device=a.device).set_(a.untyped_storage(), a.storage_offset(), shape, probe.stride())


def _joined(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, bool]:
    view = _adjacent(a, b)
    return (view, True) if view is not None else (torch.cat((a.detach(), b.detach())), False)


def check_fusable_dense(mlp: nn.Module, path: str = "") -> None:
    """Raise ``FuseError`` (naming the module and the difference) unless ``mlp``'s halves can be
    joined into one ``gate_up_proj`` exactly: plain ``nn.Linear`` halves of the split's shapes,
    one dtype and device, both with a bias or neither."""
    stand_in: FusedGateUp = mlp.__dict__["gate_up_proj"]
    first, second = stand_in.halves()
    half = stand_in.out_features // 2
    for linear in (first, second):
        name = "gate_proj" if linear is mlp.gate_proj else "up_proj"
        if type(linear) is not nn.Linear:
            raise FuseError(
                f"{path}.{name} is a {type(linear).__name__}, not nn.Linear: quantized dense MLPs are re-fused "
                "by the quantizer integrations"
            )
        if tuple(linear.weight.shape) != (half, stand_in.in_features):
            raise FuseError(
                f"{path}.{name}.weight has shape {list(linear.weight.shape)}; gate_up_proj needs halves of "
                f"[{half}, {stand_in.in_features}] (resized projections cannot be re-fused)"
            )
    if (first.bias is None) != (second.bias is None):
        with_bias = "gate_proj" if mlp.gate_proj.bias is not None else "up_proj"
        raise FuseError(f"{path}.{with_bias} has a bias and its other half has none: gate_up_proj cannot store that")
    for a, b, what in ((first.weight, second.weight, "weights"), (first.bias, second.bias, "biases")):
        if a is not None and (a.dtype != b.dtype or a.device != b.device):
            raise FuseError(
                f"{path}: gate_proj/up_proj {what} are {mlp.gate_proj.weight.dtype}/{mlp.up_proj.weight.dtype} on "
                f"{mlp.gate_proj.weight.device}/{mlp.up_proj.weight.device}: move the model to one dtype and device"
            )


def fuse_dense_mlp(mlp: nn.Module, path: str = "", undo: list[Callable[[], None]] | None = None) -> bool:
    """Undo ``split_dense_mlp``: one ``gate_up_proj`` ``nn.Linear`` again. Returns True when zero-copy.

    Raises ``FuseError`` (``check_fusable_dense``) when the halves cannot be joined exactly.
    ``undo`` gets the step that splits the MLP back as it was.
    """
    check_fusable_dense(mlp, path)
    stand_in: FusedGateUp = mlp.__dict__["gate_up_proj"]
    first, second = stand_in.halves()
    weight, zero_copy = _joined(first.weight, second.weight)
    bias = None
    if first.bias is not None:
        bias, bias_zero_copy = _joined(first.bias, second.bias)
        zero_copy = zero_copy and bias_zero_copy
    fused = fast_linear(weight, bias, stand_in.requires_grad)
    for name in ("weight", "bias"):
        halves = [getattr(getattr(h, name), "grad", None) for h in (first, second)]
        if any(g is not None for g in halves):
            params = [getattr(h, name) for h in (first, second)]
            getattr(fused, name).grad = torch.cat([g if g is not None else torch.zeros_like(p) for g, p in zip(halves, params)])
    if undo is not None:
        children, cls = dict(mlp._modules), mlp.__class__
        undo.append(lambda: _resplit(mlp, children, stand_in, cls))
    _unsplit(mlp, fused)
    native = type(mlp).__dict__.get("_defuser_quant_split_of")
    if native is not None:  # built split by the pre-load patch: back to the family's own class
        mlp.__class__ = native
    return zero_copy


def _resplit(mlp: nn.Module, children: dict[str, nn.Module], stand_in: FusedGateUp, cls: type) -> None:
    mlp.__class__ = cls
    mlp._modules.clear()
    mlp._modules.update(children)
    mlp.__dict__["gate_up_proj"] = stand_in
