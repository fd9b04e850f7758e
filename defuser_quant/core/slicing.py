"""Where each expert's pieces live inside a fused tensor, and moving them without a full copy.

A *piece* is one per-expert tensor as ``nn.Linear`` wants it: weights ``[out, in]``, biases
``[out]``. ``pieces_of(slab)`` returns views of one expert's slab (``fused[e]``) in the native
layout. When every piece is already contiguous, per-expert parameters are plain views of the
fused storage (zero copy). Otherwise (transposed or interleaved layouts) each slab is rewritten
in place so its pieces lie one after another, using a temporary the size of one expert; the
inverse rewrite restores the native layout bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .layout import ExpertLayout

PiecesFn = Callable[[torch.Tensor], list[torch.Tensor]]


def _split_gate_up(rows: torch.Tensor, layout: ExpertLayout, dim: int) -> list[torch.Tensor]:
    """Split the gate/up axis ``dim`` of ``rows`` into [gate, up] views."""
    width = rows.shape[dim] // 2
    if layout.is_concatenated:
        return [rows.narrow(dim, 0, width), rows.narrow(dim, width, width)]
    index = [slice(None)] * rows.dim()
    gate, up = list(index), list(index)
    gate[dim], up[dim] = slice(0, None, 2), slice(1, None, 2)
    return [rows[tuple(gate)], rows[tuple(up)]]


def in_proj_pieces(layout: ExpertLayout) -> PiecesFn:
    """Pieces of the fused input projection slab: [gate, up] or [up], each ``[I, H]``."""

    def pieces(slab: torch.Tensor) -> list[torch.Tensor]:
        weight = slab.transpose(0, 1) if layout.is_transposed else slab
        return _split_gate_up(weight, layout, 0) if layout.has_gate else [weight]

    return pieces


def down_pieces(layout: ExpertLayout) -> PiecesFn:
    """Pieces of the fused down projection slab: [down] as ``[H, I]``."""
    return lambda slab: [slab.transpose(0, 1) if layout.is_transposed else slab]


def in_bias_pieces(layout: ExpertLayout) -> PiecesFn:
    """Pieces of the fused input projection bias slab: [gate, up] or [up], each ``[I]``."""
    return lambda slab: _split_gate_up(slab, layout, 0) if layout.has_gate else [slab]


def whole_slab(slab: torch.Tensor) -> list[torch.Tensor]:
    """The slab itself is the one piece (down projection bias)."""
    return [slab]


def needs_relayout(fused: torch.Tensor, pieces: PiecesFn) -> bool:
    """True when some per-expert piece is not a contiguous view of the fused storage."""
    return not all(p.is_contiguous() for p in pieces(fused[0]))


def _packed_views(flat: torch.Tensor, templates: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    views, offset = [], 0
    for t in templates:
        views.append(flat[offset : offset + t.numel()].view(t.shape))
        offset += t.numel()
    return views


def carve(fused: torch.Tensor, pieces: PiecesFn, relayout: bool) -> list[list[torch.Tensor]]:
    """Per-expert pieces of ``fused``: views of its storage, rewritten in place when ``relayout``.

    On ``meta`` tensors nothing is read or written; the pieces are fresh meta tensors.
    """
    if fused.device.type == "meta":
        return [[p.contiguous() for p in pieces(fused[e])] for e in range(fused.shape[0])]
    if not relayout:
        return [pieces(fused[e]) for e in range(fused.shape[0])]
    out = []
    for e in range(fused.shape[0]):
        slab = fused[e]
        scratch = slab.clone()
        views = _packed_views(slab.view(-1), pieces(scratch))
        for dst, src in zip(views, pieces(scratch)):
            dst.copy_(src)
        out.append(views)
    return out


def restore_slab(slab: torch.Tensor, pieces: PiecesFn) -> None:
    """Inverse of the in-place relayout of one slab: back to the native layout."""
    scratch = slab.clone()
    for dst, src in zip(pieces(slab), _packed_views(scratch.view(-1), pieces(slab))):
        dst.copy_(src)


def expected_views(
    base: torch.Tensor, pieces: PiecesFn, relayout: bool
) -> list[list[tuple[int, tuple[int, ...], tuple[int, ...]]]]:
    """(storage offset, shape, stride) each piece has when carved from ``base`` (any device)."""
    probe = torch.empty_strided(base.shape, base.stride(), dtype=base.dtype, device="meta")
    out = []
    for e in range(base.shape[0]):
        slab = probe[e]
        views = _packed_views(slab.view(-1), pieces(slab)) if relayout else pieces(slab)
        out.append([(base.storage_offset() + v.storage_offset(), tuple(v.shape), tuple(v.stride())) for v in views])
    return out
