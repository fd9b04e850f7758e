"""How each output tensor is produced from the source, as a stream of contiguous chunks.

* ``Copy``: a tensor kept as is (read in row chunks when large).
* ``Merge``: per-expert tensors of one block -> one fused tensor, built one expert slab at a time
  with the same piece functions ``convert_model`` uses (gpt_oss' interleaved, transposed slabs
  included); when the pieces lie one after another in a slab, the sources are streamed as is.
* ``Split``: one expert's piece of a fused tensor, read one expert slab at a time.

The bytes of the chunks, concatenated, are the output tensor in row-major order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..slicing import PiecesFn
from .source import SourceReader, TensorInfo

CHUNK_BYTES = 64 << 20


class SlabCache:
    """The last few expert slabs read from fused tensors (gate and up come from the same slab)."""

    def __init__(self, size: int = 4):
        self.size = size
        self._slabs: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()

    def slab(self, reader: SourceReader, info: TensorInfo, expert: int, transposed: bool) -> torch.Tensor:
        key = (info.name, expert)
        if key in self._slabs:
            self._slabs.move_to_end(key)
            return self._slabs[key]
        slab = reader.rows(info, expert, expert + 1)[0]
        if transposed:
            slab = slab.transpose(0, 1)  # stored [in, out]-swapped: back to the native orientation
        self._slabs[key] = slab
        while len(self._slabs) > self.size:
            self._slabs.popitem(last=False)
        return slab


def pieces_are_packed(pieces: PiecesFn, slab_shape: tuple[int, ...]) -> bool:
    """True when the pieces of a contiguous slab are contiguous and lie one after another."""
    probe = torch.empty(slab_shape, device="meta")
    offset = 0
    for piece in pieces(probe):
        if not piece.is_contiguous() or piece.storage_offset() != offset:
            return False
        offset += piece.numel()
    return offset == probe.numel()


@dataclass(frozen=True)
class Copy:
    source: TensorInfo

    def chunks(self, reader: SourceReader, cache: SlabCache) -> Iterator[torch.Tensor]:
        info = self.source
        if info.nbytes <= CHUNK_BYTES or len(info.shape) == 0 or info.shape[0] <= 1:
            yield reader.tensor(info)
            return
        step = max(1, CHUNK_BYTES // max(info.nbytes // info.shape[0], 1))
        for start in range(0, info.shape[0], step):
            yield reader.rows(info, start, min(start + step, info.shape[0]))

    @property
    def reads(self) -> tuple[TensorInfo, ...]:
        return (self.source,)


@dataclass(frozen=True)
class Merge:
    sources: tuple[tuple[TensorInfo, ...], ...]  # [expert][piece]
    slab_shape: tuple[int, ...]
    pieces: PiecesFn = field(compare=False)
    packed: bool = False

    def chunks(self, reader: SourceReader, cache: SlabCache) -> Iterator[torch.Tensor]:
        for expert_sources in self.sources:
            if self.packed:
                for info in expert_sources:
                    yield reader.tensor(info)
                continue
            parts = [reader.tensor(info) for info in expert_sources]
            slab = torch.empty(self.slab_shape, dtype=parts[0].dtype)
            for view, part in zip(self.pieces(slab), parts):
                view.copy_(part)
            yield slab

    @property
    def reads(self) -> tuple[TensorInfo, ...]:
        return tuple(info for row in self.sources for info in row)


@dataclass(frozen=True)
class Split:
    source: TensorInfo
    expert: int
    piece: int
    pieces: PiecesFn = field(compare=False)
    transposed: bool = False

    def chunks(self, reader: SourceReader, cache: SlabCache) -> Iterator[torch.Tensor]:
        slab = cache.slab(reader, self.source, self.expert, self.transposed)
        yield self.pieces(slab)[self.piece].contiguous()

    @property
    def reads(self) -> tuple[TensorInfo, ...]:
        return (self.source,)


Op = Copy | Merge | Split
