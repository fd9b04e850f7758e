"""A shard's bytes copied into a shared mapping of its file by several threads.

Buffered ``write`` calls to one file take the file's lock one at a time: round 30's 2, 4 and 8 threads
writing their pieces at their offsets were no faster than one thread. Page faults on a shared mapping of
the file do not take that lock, so threads copying into the mapping share the work out. On one thread a
mapping is slower than ``write`` (every page is faulted in and zeroed before it is copied: 0.71-0.92 s
against 0.36-0.42 s for 1.5 GB on this 2-core machine), so it pays only with several threads.

The file's blocks are reserved first (``posix_fallocate``): a full disk then fails that call, with an
``OSError``, instead of a page fault later killing the process with ``SIGBUS``. Where the file system cannot
reserve or map the file, :func:`fill_mapped` returns None before writing a byte and the caller writes in
order. Each piece is at most :data:`PIECE_BYTES`, so one large tensor (the embeddings) is shared out too.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from defuser_quant.checkpoint.errors import CheckpointError

__all__ = ["PIECE_BYTES", "Piece", "fill_mapped", "pieces"]

logger = logging.getLogger(__name__)

#: the most bytes one task copies
PIECE_BYTES = 32 << 20

#: errors that say the file system cannot reserve or map this file (not a full disk): written in order instead
_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.ENODEV, errno.EACCES})


@dataclass(frozen=True)
class Piece:
    """``length`` bytes of the shard at ``offset``, from memory, from a byte range of a file, or read first."""

    offset: int
    length: int
    memory: np.ndarray | None = None  # uint8, ``length`` bytes
    file: tuple[int, int] | None = None  # (descriptor, offset) of the bytes in another file
    read: Callable[[], np.ndarray] | None = None  # gives the bytes (uint8, ``length``) when the piece is copied


def pieces(offset: int, length: int, memory: np.ndarray | None = None, file: tuple[int, int] | None = None) -> list[Piece]:
    """One entry's bytes as pieces of at most :data:`PIECE_BYTES`."""
    out = []
    for start in range(0, length, PIECE_BYTES):
        n = min(PIECE_BYTES, length - start)
        out.append(Piece(offset + start, n, None if memory is None else memory[start:start + n],
                         None if file is None else (file[0], file[1] + start)))
    return out


def _copy(target: np.ndarray, piece: Piece) -> None:
    view = target[piece.offset:piece.offset + piece.length]
    if piece.file is not None:
        fd, at = piece.file
        done = 0
        while done < piece.length:
            n = os.preadv(fd, [view[done:]], at + done)
            if n == 0:
                raise CheckpointError("unexpected end of a source file while writing a shard")
            done += n
        return
    data = piece.memory if piece.memory is not None else piece.read()  # type: ignore[misc]
    if data.nbytes != piece.length:
        raise ValueError(f"save: a piece holds {data.nbytes} bytes where {piece.length} were planned; not written")
    np.copyto(view, data)  # numpy lets the interpreter lock go while it copies


def fill_mapped(fd: int, header: bytes, parts: list[Piece], threads: int) -> int | None:
    """Write ``header`` and then ``parts`` into the empty file ``fd`` (open for reading and writing) through a
    shared mapping, ``threads`` copying at once; returns the file's size. Returns None, with nothing written and the
    file empty, where the file system cannot reserve or map it; raises (the file's content then undefined: the caller
    removes it) else."""
    size = len(header) + sum(p.length for p in parts)
    try:
        os.posix_fallocate(fd, 0, size)
        mapping = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
        logger.debug("save: shard not written through a mapping (%s); written in order", exc)
        os.ftruncate(fd, 0)
        return None
    try:
        mapping[:len(header)] = header
        target = np.frombuffer(mapping, dtype=np.uint8)
        try:
            _run(target, parts, threads)
        finally:
            del target
    finally:
        try:
            mapping.close()
        except BufferError:  # a view still held by an exception's frames: unmapped when that is collected
            logger.debug("save: a shard mapping outlives its write (a view is still referenced)")
    return size


def _run(target: np.ndarray, parts: list[Piece], threads: int) -> None:
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="dq-shard-write")
    futures: list[Future] = []
    try:
        futures = [pool.submit(_copy, target, piece) for piece in parts]
        for future in futures:
            future.result()
    except BaseException:  # an error or Ctrl-C: no piece starts after this, the running ones end before the unmap
        for future in futures:
            future.cancel()
        raise
    finally:
        pool.shutdown(wait=True)
