"""Which fused tensors a block holds, and which per-expert ``nn.Linear`` leaves their pieces become.

A ``FusedTensor`` names one fused tensor by its attribute path inside the fused module
(``gate_up_proj``, dbrx's ``mlp.w1``, aria's ``fc1.weight``), says how one expert's slab splits
into pieces (``slicing``'s piece functions) and which leaf of which projection each piece is.
Standard ``@use_experts_implementation`` layouts get theirs from ``layout_tensors``; irregular
families declare their own (``defuser_quant.core.irregular``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .layout import ExpertLayout
from .slicing import PiecesFn, down_pieces, in_bias_pieces, in_proj_pieces, whole_slab

Leaf = tuple[str, str]  # (projection role: "gate" | "up" | "down", "weight" | "bias")


@dataclass(frozen=True)
class FusedTensor:
    """One fused tensor of a block and where each expert's pieces go.

    ``slab_shape`` views a tensor stored flattened (dbrx ``[E*I, H]``) as ``[E, *slab_shape]``;
    ``carved_experts`` limits carving to the first N slabs (longcat_flash stores unused slabs for
    its identity experts after the routed ones; they stay in the fused storage).
    """

    path: str
    pieces: PiecesFn
    leaves: tuple[Leaf, ...]
    slab_shape: tuple[int, ...] | None = None
    carved_experts: int | None = None

    def slabs(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` viewed as ``[E, ...]`` slabs (a view; no copy)."""
        return tensor if self.slab_shape is None else tensor.view(-1, *self.slab_shape)


def layout_tensors(layout: ExpertLayout) -> list[FusedTensor]:
    """The fused tensors of a standard layout, in the order ``pieces_fns`` lists them."""
    in_roles = ("gate", "up") if layout.has_gate else ("up",)
    tensors = [
        FusedTensor(layout.in_proj, in_proj_pieces(layout), tuple((r, "weight") for r in in_roles)),
        FusedTensor("down_proj", down_pieces(layout), (("down", "weight"),)),
    ]
    if layout.has_bias:
        tensors += [
            FusedTensor(f"{layout.in_proj}_bias", in_bias_pieces(layout), tuple((r, "bias") for r in in_roles)),
            FusedTensor("down_proj_bias", whole_slab, (("down", "bias"),)),
        ]
    return tensors


def owner_and_leaf(module: nn.Module, path: str) -> tuple[nn.Module, str]:
    """The submodule holding ``path`` and the tensor's own name in it."""
    owner_path, _, leaf = path.rpartition(".")
    return (module.get_submodule(owner_path) if owner_path else module), leaf


def get_tensor(module: nn.Module, path: str) -> torch.Tensor | None:
    """The parameter or buffer at ``path`` (dotted, relative to ``module``), else None."""
    try:
        owner, leaf = owner_and_leaf(module, path)
    except AttributeError:
        return None
    if leaf in owner._parameters:
        return owner._parameters[leaf]
    return owner._buffers.get(leaf)


def pop_tensor(module: nn.Module, path: str) -> tuple[dict, str, torch.Tensor]:
    """Remove the tensor at ``path``; returns ``(store, name, tensor)`` to put it back."""
    owner, leaf = owner_and_leaf(module, path)
    store = owner._parameters if leaf in owner._parameters else owner._buffers
    return store, leaf, store.pop(leaf)


def put_tensor(module: nn.Module, path: str, tensor: torch.Tensor, is_buffer: bool) -> None:
    """Register ``tensor`` at ``path`` as a buffer or a parameter."""
    owner, leaf = owner_and_leaf(module, path)
    if is_buffer:
        owner.register_buffer(leaf, tensor)
    else:
        owner.register_parameter(leaf, tensor)
