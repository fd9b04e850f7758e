"""GPTQModel's Hessian inverse calls replayed from a CUDA graph: one launch per Hessian instead of hundreds.

A batched chunk's inverses are GPTQModel's own single-matrix calls (two cuSOLVER Choleskys and a
``cholesky_inverse``, kept so the checkpoint is stock's bit for bit). At a 2048-column Hessian
they are about 400 kernel launches, and on a GPU the inverse threads spend their time launching:
a chunk's twelve inverses took 26 ms on an H200 with 2, 4 or 8 threads alike, while the GPU was
idle for 43% of the chunks' pipeline (``benchmarks/chunk_pipeline.py``, round 59). Here each
inverse thread records the calls once per Hessian shape and settings as a CUDA graph on its own
stream and then replays it: the same kernels with the same arguments, so the same bits.

Trust: the first Hessian of a shape on a thread is inverted eagerly; the graph is then recorded
and replayed on that same Hessian, and kept only if every output equals the eager one bit for bit
(else that thread inverts that shape eagerly from then on, logged once). Recording uses
``thread_local`` capture, so CUDA calls of other threads are not refused while it runs; where
recording fails (a call that synchronizes, an older torch), the eager calls are used, logged once.
Graphs are dropped by :func:`release` (each holds a private memory pool: the Hessian's copy, the
factor and cuSOLVER's workspace).

torch's caching allocator counts a recording in any thread as a capture under way and asserts that none
is when it empties its cache; GPTQModel empties it from its own threads. So recordings hold a lock that
``torch.cuda.empty_cache`` also takes while the batched solves run (:func:`guarded_empty_cache`), and a
failed recording hands its memory pool back and ends its capture in the allocator, which torch's
``capture_end`` does not do after a failure. The allocator's own release on a failed ``cudaMalloc`` is not
guarded: an out-of-memory during a recording's few milliseconds would still trip it.
On by default since round 61 (``BatchedSolve.inverse_graphs``): on an H200 the replayed inverses of a gate/up chunk took
23 ms instead of 29 and a down chunk's 15 instead of 39, with stock's checkpoint in every run; on round 60's H100 the
gate/up inverses took as long replayed (28 ms), bound by cuSOLVER's kernels themselves (docs/performance.md, rounds
60-61).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

logger = logging.getLogger(__name__)

__all__ = ["GraphStats", "graphed", "guarded_empty_cache", "on_side_stream", "record", "release", "same_bits",
           "same_tensors", "stats"]


@dataclass
class GraphStats:
    """What the graphed inverses (or, in :mod:`.loop_graph`, loops) did since the last ``release()``
    (read by the benchmarks)."""

    recorded: int = 0  # graphs kept
    replays: int = 0  # calls served by a replay
    eager: int = 0  # calls run eagerly (a key's first, or no graph)
    refused: dict[str, int] = field(default_factory=dict)  # why a graph was not kept -> times
    said: set[str] = field(default_factory=set, repr=False, compare=False)  # the reasons logged so far

    def refuse(self, why: str, what: str, log: logging.Logger) -> None:
        """Count a refusal and log its reason on ``log`` the first time (``what`` runs without a graph)."""
        self.refused[why] = self.refused.get(why, 0) + 1
        if why not in self.said:
            self.said.add(why)
            log.warning("%s without a CUDA graph here (%s); results are the same, only slower", what, why)

    def as_dict(self) -> dict[str, Any]:
        return {"recorded": self.recorded, "replays": self.replays, "eager": self.eager, "refused": dict(self.refused)}


def failure(exc: BaseException) -> str:
    """The refusal reason for a recording that raised ``exc``."""
    return f"recording failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def on_side_stream(device: torch.device) -> bool:
    """A CUDA device whose current stream is a side stream (recording is not allowed on the legacy default one)."""
    return device.type == "cuda" and torch.cuda.current_stream(device) != torch.cuda.default_stream(device)


#: Held while a graph is recorded, and by :func:`guarded_empty_cache`'s ``torch.cuda.empty_cache``: torch's
#: caching allocator asserts that no capture is under way when it empties its cache (its event sync), and
#: GPTQModel empties it from its own threads (its device pool's janitor).
_record_lock = threading.Lock()


def _new_graph() -> Any:
    return torch.cuda.CUDAGraph()


def _release_pool(graph: Any, device_index: int) -> None:
    """What ``capture_end`` does not do after a failed capture: the allocator stops counting the capture
    as under way (else every later ``empty_cache`` trips its assertion) and the graph's pool is freed."""
    pool = graph.pool()
    torch._C._cuda_endAllocateToPool(device_index, pool)
    torch._C._cuda_releasePool(device_index, pool)


def record(fn: Callable[[], Any], pool: Any = None) -> tuple[Any, Any]:
    """``fn()`` recorded as a CUDA graph on the current stream (``thread_local`` capture, holding the
    lock :func:`guarded_empty_cache` waits for; ``pool``: a memory pool shared with other graphs that
    never replay at the same time); returns the graph and ``fn``'s output (the tensors its replays
    write). A failed recording is ended in the allocator and its memory pool freed, then raised."""
    index = torch.cuda.current_device()  # the capture's device (the caller's current one)
    graph = _new_graph()
    with _record_lock:
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            output = fn()
        except BaseException:
            try:
                graph.capture_end()  # the capture itself may still be whole (a Python error)
            except BaseException:
                _release_pool(graph, index)
            raise
        try:
            graph.capture_end()
        except BaseException:
            _release_pool(graph, index)
            raise
    return graph, output


class _Graph:
    """One recorded inverse: a static input, the graph, and the static outputs it writes."""

    def __init__(self, example: torch.Tensor, invert: Callable[[torch.Tensor], Any]):
        self.input = example.clone()
        self.graph, self.output = record(lambda: invert(self.input))  # on the inverse thread's device

    def replay(self, hessian: torch.Tensor) -> Any:
        self.input.copy_(hessian)
        self.graph.replay()
        return self.output


@contextmanager
def guarded_empty_cache() -> Iterator[None]:
    """Inside the block ``torch.cuda.empty_cache`` waits for a recording under way to end (put back after,
    where it is still ours)."""
    original = torch.cuda.empty_cache

    def empty_cache() -> None:
        with _record_lock:
            original()

    torch.cuda.empty_cache = empty_cache
    try:
        yield
    finally:
        if torch.cuda.empty_cache is empty_cache:
            torch.cuda.empty_cache = original


_lock = threading.Lock()
_graphs: dict[tuple, _Graph | None] = {}  # (thread, key) -> graph, or None: this thread inverts that key eagerly
_stats = GraphStats()
_generation = 0  # bumped by release(): a graph recorded across a release is not kept


def _refuse(slot: tuple, why: str, generation: int) -> None:
    with _lock:
        if generation == _generation:
            _graphs[slot] = None
        _stats.refuse(why, "Hessian inverses run", logger)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8) if t.dtype.is_floating_point else t


def same_tensors(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Two lists of tensors equal bit for bit (shapes, dtypes and every byte)."""
    return len(a) == len(b) and all(
        x.shape == y.shape and x.dtype == y.dtype and torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b)
    )


def same_bits(a: Any, b: Any) -> bool:
    """Every tensor of two inverse results (their ``tensors()``) equal bit for bit."""
    return same_tensors(a.tensors(), b.tensors())


def _can_record(hessian: torch.Tensor) -> bool:
    """A CUDA Hessian on a side stream (recording is not allowed on the legacy default stream)."""
    return on_side_stream(hessian.device)


def graphed(invert: Callable[[torch.Tensor], Any], key: tuple, copy: Callable[[Any], Any]) -> Callable[[torch.Tensor], Any]:
    """``invert`` served from this thread's CUDA graph for ``key`` (the Hessian's shape, dtype and
    the settings ``invert`` reads, which the caller puts in the key). ``copy`` turns the graph's
    static outputs into a result of the caller's own (called right after each replay, on the same
    stream, so the next replay cannot overwrite what it returns). Call on a side stream: recording
    is not allowed on the legacy default stream."""

    def run(hessian: torch.Tensor) -> Any:
        slot = (threading.get_ident(), hessian.device, tuple(hessian.shape), hessian.dtype, key)
        with _lock:
            known = slot in _graphs
            graph = _graphs.get(slot)
            generation = _generation
        if graph is not None:
            out = copy(graph.replay(hessian))
            with _lock:
                _stats.replays += 1
            return out
        result = invert(hessian)
        with _lock:
            _stats.eager += 1
        if known or not _can_record(hessian):
            return result
        try:
            graph = _Graph(hessian, invert)
            replayed = graph.replay(hessian)
            same = same_bits(replayed, result)
        except Exception as exc:  # a call that cannot be recorded: the eager calls serve this key
            _refuse(slot, failure(exc), generation)
            return result
        if not same:
            _refuse(slot, "the replay differed from the eager calls", generation)
            return result
        with _lock:
            if generation == _generation:
                _graphs[slot] = graph
                _stats.recorded += 1
        return result

    return run


def stats() -> GraphStats:
    """A copy of the counts since the last :func:`release`."""
    with _lock:
        return GraphStats(_stats.recorded, _stats.replays, _stats.eager, dict(_stats.refused))


def release() -> None:
    """Drop every recorded graph (their memory pools go back to the allocator) and reset the counts."""
    global _stats, _generation
    with _lock:
        _generation += 1
        _graphs.clear()
        _stats = GraphStats()
