"""The batched solve's column loop replayed from a CUDA graph: one launch per chunk instead of about 1,200.

A chunk's column loop (:func:`.batched._column_loop`) is sixteen 128-column blocks at a 2048-column
shape, each a rows-kernel launch plus a quantizer-parameter search and one lazy-update matmul and
subtraction per module: about 1,200 kernel launches for a gate/up chunk of 24 modules, 23 ms on an
H200 of which the GPU computed for a fraction (``benchmarks/chunk_pipeline.py``, round 59). Here the
loop runs on buffers of the device's own (its weights, codes, losses, stacked inverses and per-row
parameters, carved from one arena per device) and is recorded once per chunk shape and settings as a
CUDA graph, then replayed: the same kernels on the same shapes, so the same bits.

Trust: the first chunk of a shape runs the loop eagerly; the graph is then recorded from the same
inputs and replayed, and kept only if every output (codes, scales, zeros, loss sums) equals the eager
loop's bit for bit, else the eager loop serves that shape from then on (logged once). A recording
that fails (a call that synchronizes) leaves the eager results in place. The arena is held by one
chunk at a time (its buffers are what the graph reads and writes), so a device's chunk loops run one
after another; each holder's stream waits for the previous holder's work on the buffers.

Memory: the arena is as large as the largest chunk's working set (weights, codes and losses in fp32,
the stacked inverses), kept from the first chunk until :func:`release`; the graphs of one arena share
one memory pool for their temporaries. Opt-in (``BatchedSolve.loop_graphs``): on an H100 (round 60) its replays gave
stock's checkpoint inside GPTQModel's run and a gate/up chunk's loop took 19 ms instead of 26, but at two layers the
recordings cost what the replays saved, and the arena added 0.7 GiB of peak GPU memory (docs/performance.md, round 60).
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from . import inverse_graphs

logger = logging.getLogger(__name__)

__all__ = ["LoopGraphStats", "arena", "can_record", "layout_key", "release", "stats"]

_ALIGN = 512  # bytes: each buffer of the arena starts on this boundary

Layout = list[tuple[tuple[int, ...], torch.dtype]]


@dataclass
class LoopGraphStats(inverse_graphs.GraphStats):
    """What the graphed column loops did since the last :func:`release`: the counts of
    :class:`.inverse_graphs.GraphStats` (chunk loops) and the largest arena made."""

    arena_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "arena_bytes": self.arena_bytes}


class _LoopGraph:
    """A recorded loop, its output tensors, and what else it reads (kept alive: the graph holds their addresses)."""

    def __init__(self, graph: Any, outputs: tuple[torch.Tensor, ...], kept: Any):
        self.graph, self.outputs, self.kept = graph, outputs, kept


class _Arena:
    """One device's buffers, the graphs recorded on them, and who may use them next."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.buffer: torch.Tensor | None = None
        self.ready: torch.cuda.Event | None = None  # the last holder's work on the buffers, queued
        self.graphs: dict[tuple, _LoopGraph | None] = {}  # key -> graph, or None: that key runs eagerly
        self.pool: Any = None  # the memory pool the graphs share


_lock = threading.Lock()
_arenas: dict[torch.device, _Arena] = {}
_stats = LoopGraphStats()


def _new_pool() -> Any:
    return torch.cuda.graph_pool_handle()


def can_record(device: torch.device) -> bool:
    """Loops on ``device`` may be recorded here (:func:`.inverse_graphs.on_side_stream`)."""
    return inverse_graphs.on_side_stream(device)


def layout_key(layout: Layout) -> tuple:
    """A hashable form of a buffer layout (shapes and dtypes), for graph keys."""
    return tuple((tuple(shape), str(dtype)) for shape, dtype in layout)


def _offsets(layout: Layout) -> tuple[list[int], int]:
    offsets, end = [], 0
    for shape, dtype in layout:
        offsets.append(end)
        end += -(-_nbytes(shape, dtype) // _ALIGN) * _ALIGN
    return offsets, end


class Held:
    """The arena of a device, held by this chunk: its ``buffers`` (views in the layout asked for) and
    :meth:`run`, the loop on them."""

    def __init__(self, device: torch.device, arena: _Arena, buffers: list[torch.Tensor]):
        self.device, self._arena, self.buffers = device, arena, buffers

    def run(self, key: tuple, loop: Callable[[], tuple[torch.Tensor, ...]], prepare_again: Callable[[], None],
            written: list[torch.Tensor], keep: Callable[[], Any] = lambda: None) -> tuple[torch.Tensor, ...]:
        """``loop()`` on the prepared buffers: a replay of ``key``'s graph (its outputs copied), or the
        loop itself. After a key's first eager loop the graph is recorded (``prepare_again`` puts the
        inputs back first) and replayed, and kept only where its outputs and the buffers in ``written``
        equal the eager loop's bit for bit; the buffers then hold the eager loop's values either way.
        ``keep()``: whatever else the recorded loop reads on the device (not the buffers), held with the
        graph; a key's later loops must read the same values there."""
        arena = self._arena
        graph = arena.graphs.get(key, False)
        if isinstance(graph, _LoopGraph):
            graph.graph.replay()
            with _lock:
                _stats.replays += 1
            return tuple(t.clone() for t in graph.outputs)
        out = loop()
        with _lock:
            _stats.eager += 1
        if graph is None:
            return out
        expected = [t.clone() for t in written]
        try:
            prepare_again()
            if arena.pool is None:
                arena.pool = _new_pool()
            with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
                recorded, outputs = inverse_graphs.record(loop, pool=arena.pool)
            recorded.replay()
            same = inverse_graphs.same_tensors([*outputs, *written], [*out, *expected])
        except Exception as exc:  # a call that cannot be recorded: the eager loop serves this key
            self._refuse(key, inverse_graphs.failure(exc), written, expected)
            return out
        if not same:
            self._refuse(key, "the replay differed from the eager loop", written, expected)
            return out
        arena.graphs[key] = _LoopGraph(recorded, outputs, keep())
        with _lock:
            _stats.recorded += 1
        return out

    def _refuse(self, key: tuple, why: str, written: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
        for buffer, value in zip(written, expected):
            buffer.copy_(value)  # a replay may have written them: the eager loop's values again
        self._arena.graphs[key] = None
        with _lock:
            _stats.refuse(why, "the batched solve's column loop runs", logger)


@contextmanager
def arena(device: torch.device, layout: Layout) -> Iterator[Held]:
    """``device``'s arena held for the block, carved as ``layout`` (``(shape, dtype)`` per buffer) on the
    current stream, which first waits for the previous holder's queued work. An arena too small for the
    layout is made anew (its graphs dropped: they point into the old one)."""
    with _lock:
        owned = _arenas.setdefault(device, _Arena())
    with owned.lock:
        stream = torch.cuda.current_stream(device) if device.type == "cuda" else None  # the CPU: in order anyway
        if owned.ready is not None:
            stream.wait_event(owned.ready)
        offsets, need = _offsets(layout)
        if owned.buffer is None or owned.buffer.numel() < need:
            if owned.buffer is not None and stream is not None:
                stream.synchronize()  # the old graphs' last replays done before their memory goes
            owned.graphs.clear()
            owned.buffer = owned.pool = None
            owned.buffer = torch.empty(need, dtype=torch.uint8, device=device)
            with _lock:
                _stats.arena_bytes = max(_stats.arena_bytes, need)
        if stream is not None:
            owned.buffer.record_stream(stream)  # its memory is not reused before this stream's work on it is done
        buffers = [owned.buffer[o:o + _nbytes(shape, dtype)].view(dtype).view(shape)
                   for o, (shape, dtype) in zip(offsets, layout)]
        try:
            yield Held(device, owned, buffers)
        finally:
            owned.ready = stream.record_event() if stream is not None else None


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    return math.prod(shape) * dtype.itemsize


def stats() -> LoopGraphStats:
    """A copy of the counts since the last :func:`release`."""
    with _lock:
        return LoopGraphStats(_stats.recorded, _stats.replays, _stats.eager, dict(_stats.refused),
                              arena_bytes=_stats.arena_bytes)


def release() -> None:
    """Drop every arena and graph (their memory goes back to the allocator once their work is done) and
    reset the counts."""
    global _stats
    with _lock:
        _arenas.clear()
        _stats = LoopGraphStats()
