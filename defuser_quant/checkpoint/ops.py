"""How each output tensor is produced from the source.

* ``Copy``: a tensor kept as is: its byte range is copied file to file by the kernel.
* ``Merge``: per-expert tensors of one block -> one fused tensor. When the pieces lie one after
  another in an expert slab (concatenated ``[E, out, in]`` layouts) the sources' byte ranges are
  appended in order; otherwise (gpt_oss' interleaved, transposed slabs) each expert slab is
  assembled in memory with the same piece functions ``convert_model`` uses.
* ``Split``: one expert's piece of a fused tensor: a byte range of the source when the piece is
  contiguous in its slab, else cut from the expert slab read into memory (one slab at a time).

Either way the bytes appended to the output are the tensor in row-major order.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..core.slicing import PiecesFn
from .source import SourceReader, TensorInfo, copy_range, write_all

CHUNK_BYTES = 64 << 20


class SlabCache:
    """The last few expert slabs read from fused tensors (gate and up come from the same slab)."""

    def __init__(self, size: int = 4):
        self.size = size
        self._slabs: OrderedDict[tuple[str, int], torch.Tensor] = OrderedDict()

    def slab(
        self, reader: SourceReader, info: TensorInfo, expert: int, transposed: bool, slab_shape: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """Expert ``expert``'s slab of ``info`` (``slab_shape`` views a flattened ``[E*I, H]`` tensor)."""
        key = (info.name, expert)
        if key in self._slabs:
            self._slabs.move_to_end(key)
            return self._slabs[key]
        if transposed or slab_shape is None:
            slab = reader.rows(info, expert, expert + 1)[0]
        else:
            per_slab = torch.Size(slab_shape).numel() // max(torch.Size(info.shape[1:]).numel(), 1)
            slab = reader.rows(info, expert * per_slab, (expert + 1) * per_slab).reshape(slab_shape)
        if transposed:
            slab = slab.transpose(0, 1)  # stored [in, out]-swapped: back to the native orientation
        self._slabs[key] = slab
        while len(self._slabs) > self.size:
            self._slabs.popitem(last=False)
        return slab


def piece_spans(pieces: PiecesFn, slab_shape: tuple[int, ...]) -> list[tuple[int, int] | None]:
    """(element offset, element count) of each piece inside a contiguous slab, None where the
    piece is not contiguous (strided views of interleaved or transposed layouts)."""
    probe = torch.empty(slab_shape, device="meta")
    return [(p.storage_offset(), p.numel()) if p.is_contiguous() else None for p in pieces(probe)]


def pieces_are_packed(pieces: PiecesFn, slab_shape: tuple[int, ...]) -> bool:
    """True when the pieces of a contiguous slab are contiguous and lie one after another."""
    offset = 0
    for span in piece_spans(pieces, slab_shape):
        if span is None or span[0] != offset:
            return False
        offset += span[1]
    return offset == torch.Size(slab_shape).numel()


def _write_tensor(fd: int, chunk: torch.Tensor) -> int:
    data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
    write_all(fd, data)
    return data.nbytes


@dataclass(frozen=True)
class Copy:
    source: TensorInfo

    def write_to(self, fd: int, reader: SourceReader, cache: SlabCache) -> int:
        info = self.source
        copy_range(reader.fd(info.file), fd, info.offset, info.nbytes)
        return info.nbytes


@dataclass(frozen=True)
class Merge:
    sources: tuple[tuple[TensorInfo, ...], ...]  # [expert][piece]
    slab_shape: tuple[int, ...]
    pieces: PiecesFn = field(compare=False)
    packed: bool = False
    padding: int = 0  # zero slabs after the experts' (longcat_flash's unused identity-expert slabs)

    def write_to(self, fd: int, reader: SourceReader, cache: SlabCache) -> int:
        written = 0
        for expert_sources in self.sources:
            if self.packed:
                for info in expert_sources:
                    copy_range(reader.fd(info.file), fd, info.offset, info.nbytes)
                    written += info.nbytes
                continue
            for chunk in self._slabs(expert_sources, reader):
                written += _write_tensor(fd, chunk)
            reader.maybe_release()
        if self.padding:
            dtype = reader.tensor(self.sources[0][0]).dtype
            zeros = torch.zeros(self.slab_shape, dtype=dtype)
            for _ in range(self.padding):
                written += _write_tensor(fd, zeros)
        return written

    def _slabs(self, expert_sources: tuple[TensorInfo, ...], reader: SourceReader) -> Iterator[torch.Tensor]:
        parts = [reader.tensor(info) for info in expert_sources]
        slab = torch.empty(self.slab_shape, dtype=parts[0].dtype)
        for view, part in zip(self.pieces(slab), parts):
            view.copy_(part)
        yield slab


@dataclass(frozen=True)
class Split:
    source: TensorInfo
    expert: int
    piece: int
    pieces: PiecesFn = field(compare=False)
    transposed: bool = False
    span: tuple[int, int] | None = None  # (byte offset in the source file, byte count) when contiguous
    slab_shape: tuple[int, ...] | None = None  # one expert's slab (a flattened source is viewed so)

    def write_to(self, fd: int, reader: SourceReader, cache: SlabCache) -> int:
        if self.span is not None:
            copy_range(reader.fd(self.source.file), fd, *self.span)
            return self.span[1]
        slab = cache.slab(reader, self.source, self.expert, self.transposed, self.slab_shape)
        written = _write_tensor(fd, self.pieces(slab)[self.piece])
        reader.maybe_release()
        return written


Op = Copy | Merge | Split
