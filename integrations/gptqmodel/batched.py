"""Batched GPTQ solves inside GPTQModel's own flow: the experts of a layer solved together.

GPTQModel 7.6 solves one module at a time (``GPTQProcessor.process`` -> ``GPTQ.quantize``): at
Qwen3-30B-A3B shape that is ~77 ms of mostly per-module bookkeeping, 768 times per two layers.
Here the modules of one subset pass that have equal weight shapes, the same device and the same
GPTQ settings (a layer's expert ``gate_proj``/``up_proj``, then its ``down_proj``) are solved
together, in chunks: one column-block loop over all of them (the Hessian inverses are
GPTQModel's own single-matrix calls, one per shared Hessian). Everything after the solve is
GPTQModel's own: ``GPTQProcessor.process`` receives, from ``GPTQ.quantize``, the same ``(Q, scale, zero, g_idx, duration, loss, damp,
nsamples)`` tuple it would have computed, and logs, streams, packs (its kernels) and saves
(its checkpoint format) as usual.

Exactness, step by step against ``GPTQ.quantize`` (7.6):

* per-row quantizer parameters (``Quantizer.find_params`` on the experts' rows stacked), dead
  columns, ``desc_act`` / ``act_group_aware`` permutations (GPTQModel's own functions, per
  module), the damp (``damp_percent`` x each module's mean Hessian diagonal), ``g_idx`` and the
  scale reordering are the same operations on the same values;
* the column loop is element-wise, so batching it changes nothing; on CUDA, where GPTQModel runs
  its block-update extension, each 128-column block of the whole chunk is one launch of
  :mod:`.rows_kernel`, which computes the extension's steps in its order, each rounded on its own
  (``BatchedSolve.rows_kernel``; without it, or where it cannot be built, the extension itself per
  shared Hessian and block, as GPTQModel calls it); the lazy block updates run one matmul per
  module, like GPTQModel's;
* the Hessian inverse is GPTQModel's own sequence of single-matrix calls, per (shared) Hessian,
  in GPTQModel's order: ``cholesky_ex`` of the damped 2-D Hessian, ``cholesky_inverse`` into the
  factor, upper ``cholesky``. Batched ``torch.linalg`` calls would run other kernels on CUDA
  (cuSOLVER's ``potrfBatched``, MAGMA's batched inverse) that round differently, and the rounding
  spreads through the column loop into scales and codes. With the same calls on the same
  shapes, the results are GPTQModel's bit for bit (CPU: tested; CUDA: the CUDA tests assert
  it). With ``mse`` the quantizer's grid search (row sums) also runs per module. On CUDA a
  chunk's inverses are spread over ``BatchedSolve.inverse_threads`` host threads, each on its own
  stream and so with its own cuSOLVER handle: on an H200 the Cholesky chain alone gave serial's
  bits in every run, where several streams of one thread (one handle) did not
  (``benchmarks/hessian_inverse_gpu.py``), and inside GPTQModel the threads gave stock's checkpoint;
  at Qwen3 shapes the whole inverse (copy, dead columns, order, chain) on four threads with their own
  streams was not byte-equal to one thread's, at rounding level (the same float64 error; on the
  default stream the threads gave the same bytes: ``benchmarks/inverse_streams.py``, round 25), while
  the whole solve run on worker threads, as GPTQModel runs it, gave its bytes without deterministic
  algorithms (``benchmarks/batched_solve_exactness.py --on-worker-threads``). Under deterministic
  algorithms (``BatchedSolve.streams="auto"``) the chunk and its inverse threads run on the solving
  worker's stream instead, as GPTQModel's per-module solve does: there the threads' own streams gave
  another checkpoint than stock's, the worker's stream stock's (docs/performance.md, round 26).
  Otherwise the next chunk's inverses are started while a chunk is solved
  (``BatchedSolve.inverses_ahead``): the same calls on the inverse threads' own streams, earlier.

Whatever is not reproduced goes back to GPTQModel's per-module solve, logged and counted by
reason (:class:`BatchedSolveStats`): GPTAQ/FOEM tasks, non-``Quantizer`` quantizers, ``static_groups``,
``mock_quantization``, tensor-parallel padding, non-``Linear`` modules, modules under the
``Fallback`` sample threshold (GPTQModel quantizes those without a Hessian), modules whose first
Cholesky attempt at ``damp_percent`` fails (GPTQModel's damp recovery then runs for them alone),
a NaN loss (GPTQModel's mock-quantization retry), and whole chunks that run out of memory.
A module is only ever solved by one of the two paths, and the batched path never writes to a
module's GPTQ task until GPTQModel asks that task for its result, so a fallback starts from the
untouched task.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from . import inverse_graphs, kernels, log_rows, loop_graph, packing
from . import rows_kernel as rows_block

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_CHUNK_BYTES",
    "STREAMS",
    "BatchedSolve",
    "BatchedSolveStats",
    "SolveResult",
    "batched_gptq_solve",
    "batched_solves",
    "gptq_first_inverse",
    "solve_streams",
    "why_not_batched",
]

#: Working memory one chunk of a batched solve may use (Hessian copies, inverses, fp32 weights).
DEFAULT_CHUNK_BYTES = 1 << 30
#: ``BatchedSolve.streams`` values.
STREAMS = ("auto", "own", "caller")
BLOCKSIZE = 128


@dataclass(frozen=True)
class BatchedSolve:
    """Settings of the batched solve (``quantize_with_defuser(batched_solve=...)``).

    Attributes:
        min_modules: smallest group of equal-shape modules solved together (smaller: per module).
        chunk_bytes: working memory of the solve; a group larger than that is solved in chunks.
        parallel: chunks solved at the same time per device (each on its own CUDA stream), by
            that many solver threads, or with ``solve_ahead=0`` by GPTQModel's device workers that
            wait for a result; the chunks are ``chunk_bytes / parallel`` large, so the working
            memory stays ``chunk_bytes`` in all. Results do not depend on it. One by default: since
            a chunk syncs with the GPU once, more than one saved nothing on an H200
            (docs/performance.md, round 11).
        solve_ahead: chunks a background solver thread per device may hold (being solved, or
            solved with results GPTQModel has not asked for yet) before any worker asks for
            them, so the next chunks are solved while the workers run GPTQModel's per-module
            processing of the earlier ones; each held chunk's quantized weights take GPU memory
            until asked for, and a worker waiting for a chunk always lets the solver go on.
            0 (the default): no solver thread; a worker whose module's chunk is not solved solves
            it (or the next open one) itself. On one H200, two ahead saved nothing
            (docs/performance.md, round 16): the workers still waited for the solver most of the
            time, so the chunk solves one after another, not GPTQModel's processing, set the pace.
        pack: pack each batched module's quantized weight into GPTQModel's int32 words on the
            solve's device while the chunk is there (:mod:`.packing`); GPTQModel's ``pack_block``
            then takes them in place of its CPU extension's result where its inputs are the ones
            packed. Needs ``host_results`` and 2, 4 or 8 bits. Off by default: on one H200 it gave
            stock's checkpoint with every module's words served, but its ~25 ms per chunk lengthened
            the chunk solves, one after another, more than the finalize workers saved
            (docs/performance.md, round 18).
        log_rows: ``"chunk"`` (the default): one GPTQModel log row per batched chunk, standing for
            its modules (the largest loss, the fewest samples; :mod:`.log_rows`), while each module
            still gets GPTQModel's persisted log record; ``"module"``: GPTQModel's row per module.
        streams: the CUDA streams a chunk's solve runs on. ``"own"``: the solve on the worker's own
            stream and each inverse thread's inverses on that thread's own stream (results complete
            when the solve returns, without waiting for other work on the device); ``"caller"``:
            the solve and every inverse on the stream of the worker that solves it, as GPTQModel's
            per-module solve runs (cuSOLVER's inverses on other streams round differently, at float32
            ulp level: docs/performance.md, round 25); ``"auto"`` (the default): ``"caller"`` while
            torch's deterministic algorithms are on (:func:`solve_streams`), ``"own"`` otherwise.
        inverses_ahead: while a chunk is solved, the Hessians of the device's next open chunk are
            finalized and their inverses started on the inverse threads (:func:`start_inverses`),
            so they are computed beside this chunk's column loop instead of before the next one's.
            The same calls on the same kind of stream: the results do not depend on it. Not with
            ``"caller"`` streams (every inverse on the solving worker's stream, in order).
        pack_ahead: as soon as GPTQModel takes a batched module's result, start its packed words with
            GPTQModel's own CPU extension on :func:`.packing.pack_ahead_threads` threads (a CUDA weight
            copied to the host on a side stream), from the inputs its ``pack_block`` will pass; the
            module's finalize (GPTQModel's ``pack_block``, or a ``block_finalize`` group's worker) then
            takes them instead of packing, where its inputs are those (dtypes included), waiting for a
            pack under way and packing one not started yet itself; else the extension packs it as stock.
            Needs ``host_results`` and 2, 4 or 8 bits; not with ``pack``. Off by default: it moves a
            layer's packing into the layer's own subsets, where the CPU workers are idle, but round 34
            measured it (before ``block_finalize``) no faster on an H200 (docs/performance.md).
        rows_kernel: where GPTQModel would run its CUDA block-update extension, run each 128-column
            block of a whole chunk as one launch of :mod:`.rows_kernel` (one warp per row) instead
            of one extension launch per Hessian: the extension's values, bit for bit. Where the
            kernel cannot be compiled, the extension per Hessian (logged once).
        inverse_graphs: on CUDA with ``"own"`` streams, each inverse thread records GPTQModel's
            inverse calls once per Hessian shape as a CUDA graph and replays it
            (:mod:`.inverse_graphs`): one launch per Hessian instead of about 400, the same
            kernels, so the same bits (each graph is kept only where its replay equals the eager
            calls on the Hessian it was recorded from). On by default since round 61: on an H200 it cut a
            gate/up chunk's inverses 29 -> 23 ms and a down chunk's 39 -> 15 ms and shortened the chunk
            solves of every run, with stock's checkpoint each time (on round 60's H100 the gate/up inverses
            were bound by cuSOLVER's kernels instead; docs/performance.md, rounds 60-61). No effect on the
            CPU or with the solving workers' streams (``--deterministic``).
        loop_graphs: on CUDA with ``"own"`` streams, each chunk's column loop runs on buffers of the
            device's own and is replayed from a CUDA graph recorded once per chunk shape
            (:mod:`.loop_graph`): one launch per chunk instead of about 1,200, the same kernels, so the
            same bits (each graph kept only where its replay equals the eager loop). The buffers (the
            largest chunk's weights, codes, losses and inverses) stay allocated through the run, and a
            device's chunk loops run one at a time. Off by default: on an H100 it gave stock's checkpoint and
            shorter loops, but at two layers no faster end to end and 0.7 GiB more peak GPU memory
            (docs/performance.md, round 60).
        solve_priority: ``"normal"`` (the default) or ``"high"``: the CUDA priority of the worker's own stream
            that runs a chunk's solve (``"own"`` streams), so that the device schedules the column loop's
            kernels ahead of the next chunk's inverses running beside it (round 62's trace: a gate/up loop
            took 38-40 ms beside them against 24 alone). Scheduling only: the same kernels on the same
            inputs, so the same bits. Opt-in: on an H100 (round 63) it took about 3 ms off a gate/up chunk's
            40 and was shorter end to end in six of nine rounds, but not robustly (docs/performance.md, round 63).
        inplace_update: each module's lazy update after a column block (GPTQModel's ``W[:, i2:] -=
            Err1.matmul(Hinv[i1:i2, i2:])``) as one in-place ``addmm_`` with ``alpha=-1`` instead of a matmul
            into a temporary and a subtraction: one kernel and one pass over the weights instead of two. The
            same sum rounded once either way, so the same bits wherever the BLAS runs the same product kernel
            with the output accumulated into (the CPU's does: the tests compare it; on an H100 in round 64 every
            module's results equalled GPTQModel's per-module solve, and in round 65 every run gave stock's
            checkpoint). Opt-in: on an H100 in round 65 it took 15-17% off a chunk's column loops and about
            0.1 s off a run's chunk solves, but the runs were no shorter, and its bits rest on a BLAS
            property shown on H100s alone (docs/performance.md, rounds 64-65).
    """

    min_modules: int = 2
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    parallel: int = 1
    inverse_threads: int = 4
    host_results: bool = True
    solve_ahead: int = 0
    pack: bool = False
    log_rows: str = "chunk"
    streams: str = "auto"
    inverses_ahead: bool = True
    rows_kernel: bool = True
    pack_ahead: bool = False
    inverse_graphs: bool = True
    loop_graphs: bool = False
    solve_priority: str = "normal"
    inplace_update: bool = False

    def __post_init__(self) -> None:
        if self.min_modules < 1:
            raise ValueError(f"BatchedSolve.min_modules must be >= 1, got {self.min_modules}")
        if self.chunk_bytes <= 0:
            raise ValueError(f"BatchedSolve.chunk_bytes must be > 0, got {self.chunk_bytes}")
        if self.parallel < 1:
            raise ValueError(f"BatchedSolve.parallel must be >= 1, got {self.parallel}")
        if self.inverse_threads < 1:
            raise ValueError(f"BatchedSolve.inverse_threads must be >= 1, got {self.inverse_threads}")
        if isinstance(self.solve_ahead, bool) or not isinstance(self.solve_ahead, int) or self.solve_ahead < 0:
            raise ValueError(f"BatchedSolve.solve_ahead must be an integer >= 0, got {self.solve_ahead!r}")
        if not isinstance(self.host_results, bool):
            raise TypeError(f"BatchedSolve.host_results must be True or False, got {self.host_results!r}")
        if not isinstance(self.pack, bool):
            raise TypeError(f"BatchedSolve.pack must be True or False, got {self.pack!r}")
        if not isinstance(self.inverses_ahead, bool):
            raise TypeError(f"BatchedSolve.inverses_ahead must be True or False, got {self.inverses_ahead!r}")
        if not isinstance(self.rows_kernel, bool):
            raise TypeError(f"BatchedSolve.rows_kernel must be True or False, got {self.rows_kernel!r}")
        if not isinstance(self.inverse_graphs, bool):
            raise TypeError(f"BatchedSolve.inverse_graphs must be True or False, got {self.inverse_graphs!r}")
        if not isinstance(self.loop_graphs, bool):
            raise TypeError(f"BatchedSolve.loop_graphs must be True or False, got {self.loop_graphs!r}")
        if not isinstance(self.inplace_update, bool):
            raise TypeError(f"BatchedSolve.inplace_update must be True or False, got {self.inplace_update!r}")
        if not isinstance(self.pack_ahead, bool):
            raise TypeError(f"BatchedSolve.pack_ahead must be True or False, got {self.pack_ahead!r}")
        if self.pack_ahead and (self.pack or not self.host_results):
            raise ValueError("BatchedSolve.pack_ahead needs host_results=True and pack=False (pack packs on the "
                             "solve's device instead)")
        if self.solve_priority not in SOLVE_PRIORITIES:
            raise ValueError(f"BatchedSolve.solve_priority must be one of "
                             f"{', '.join(map(repr, SOLVE_PRIORITIES))}, got {self.solve_priority!r}")
        if self.log_rows not in ("chunk", "module"):
            raise ValueError(f"BatchedSolve.log_rows must be 'chunk' or 'module', got {self.log_rows!r}")
        _check_streams(self.streams, "BatchedSolve.streams")


#: ``BatchedSolve.solve_priority`` -> CUDA stream priority (lower runs first; torch clamps it to the device's range)
SOLVE_PRIORITIES = {"normal": 0, "high": -1}


def _check_streams(streams: str, what: str) -> None:
    if streams not in STREAMS:
        raise ValueError(f"{what} must be one of {', '.join(map(repr, STREAMS))}, got {streams!r}")


def solve_streams(streams: str) -> str:
    """``"own"`` or ``"caller"``: a ``BatchedSolve.streams`` value with ``"auto"`` decided now
    (``"caller"`` while ``torch.are_deterministic_algorithms_enabled()``)."""
    _check_streams(streams, "streams")
    if streams != "auto":
        return streams
    return "caller" if torch.are_deterministic_algorithms_enabled() else "own"


@dataclass
class BatchedSolveStats:
    """What the batched solve did in one ``quantize()`` run."""

    batched_modules: int = 0
    groups: int = 0
    chunks: int = 0
    seconds: float = 0.0  # summed over the chunks (workers solve chunks at the same time)
    paths: Counter = field(default_factory=Counter)  # "batched_cuda_block_update@cuda" -> modules
    per_module: Counter = field(default_factory=Counter)  # reason -> modules left to GPTQModel's own solve
    host_results: int = 0  # batched modules whose scales/zeros/g_idx went to GPTQModel on the CPU
    solved_ahead: int = 0  # chunks a solver thread started while no worker was waiting for them
    inverses_ahead: int = 0  # chunks whose inverses were started while the chunk before was solved
    waited_seconds: float = 0.0  # summed over GPTQModel's workers: waiting for a solver thread (solve_ahead only)
    pack: packing.PackStats | None = None  # words packed on the solve's device (None: ``pack=False``)
    log_rows: log_rows.LogRowStats | None = None  # one log row per chunk (None: ``log_rows="module"``)
    streams: Counter = field(default_factory=Counter)  # "own" / "caller" -> CUDA chunks solved that way
    solve_stream_priorities: Counter = field(default_factory=Counter)  # the device's priority -> chunks ("own")
    block_updates: Counter = field(default_factory=Counter)  # "matmul_sub" / "inplace_addmm" -> chunks solved that way
    inverse_graphs: dict[str, Any] | None = None  # inverse_graphs.GraphStats at the end (None: not on)
    loop_graphs: dict[str, Any] | None = None  # loop_graph.LoopGraphStats at the end (None: not on)

    def as_dict(self) -> dict[str, Any]:
        return {
            "batched_modules": self.batched_modules,
            "host_results": self.host_results,
            "groups": self.groups,
            "chunks": self.chunks,
            "seconds": round(self.seconds, 3),
            "solved_ahead": self.solved_ahead,
            "inverses_ahead": self.inverses_ahead,
            "waited_seconds": round(self.waited_seconds, 3),
            "paths": dict(self.paths),
            "per_module": dict(self.per_module),
            "pack": self.pack.as_dict() if self.pack is not None else None,
            "log_rows": self.log_rows.as_dict() if self.log_rows is not None else None,
            "streams": dict(self.streams),
            "solve_stream_priorities": dict(self.solve_stream_priorities),
            "block_updates": dict(self.block_updates),
            "inverse_graphs": self.inverse_graphs,
            "loop_graphs": self.loop_graphs,
        }


@dataclass
class SolveResult:
    """One module's result, in the order ``GPTQ.quantize`` returns it."""

    values: tuple
    path: str
    device: str
    blocksize: int = BLOCKSIZE
    packed: packing.PackedWords | None = None  # its pack_block words, packed on the solve's device
    rows: log_rows.ChunkRows | None = None  # its chunk's log rows (set by the coordinator)


# ----- what can be batched -------------------------------------------------------------------
def why_not_batched(task: Any) -> str | None:
    """Why GPTQModel's per-module solve must handle ``task`` (None: it can be batched).

    Checked at solve time (after calibration), before anything of the task is touched.
    """
    from gptqmodel.quantization.gptq import GPTQ
    from gptqmodel.quantization.quantizer import Quantizer
    from gptqmodel.utils.fallback import should_use_fallback

    if type(task) is not GPTQ:
        return f"{type(task).__name__} task (GPTAQ/FOEM solve)"
    module = getattr(task, "module", None)
    if not isinstance(module, nn.Linear) or getattr(task, "_tp_pad_cols", 0):
        return "not a plain Linear" if not isinstance(module, nn.Linear) else "tensor-parallel column padding"
    if type(task.quantizer) is not Quantizer:
        return f"{type(task.quantizer).__name__} quantizer"
    qcfg = task.qcfg
    if qcfg.mock_quantization:
        return "mock_quantization"
    if qcfg.static_groups:
        return "static_groups"
    if getattr(task, "module_copy", None) is not None:
        return "module_copy set"
    device = torch.device(getattr(module, "target_device", None) or module.weight.data.device)
    if device.type not in ("cpu", "cuda"):
        return f"{device.type} device (GPTQModel's own Hessian inverse there)"
    if task.nsamples == 0:
        return "no calibration rows"
    if should_use_fallback(task.fallback, float(task.nsamples), task.expected_nsamples):
        return "under the Fallback sample threshold (GPTQModel's weight-only fallback)"
    return None


def _settings_key(task: Any) -> tuple:
    """Everything a batch must share: shape, devices, dtype and the solve-relevant settings."""
    q = task.qcfg
    module = task.module
    device = getattr(module, "target_device", None) or module.weight.data.device
    return (
        task.rows, task.columns, str(torch.device(device)), str(module.weight.data.device), module.weight.dtype,
        int(q.bits), bool(q.sym), float(getattr(q, "mse", 0.0) or 0.0), int(q.group_size), bool(q.desc_act),
        bool(q.act_group_aware), float(q.damp_percent), float(q.damp_auto_increment),
        int(task.quantizer.maxq.item()), float(task.quantizer.grid), float(task.quantizer.maxshrink),
        bool(task.quantizer.perchannel),
    )


# ----- the solve -----------------------------------------------------------------------------
@dataclass
class _Unit:
    """Tasks that share one Hessian (GPTQModel's shared-input dedup: gate/up of one expert)."""

    tasks: list[Any]


def _units(tasks: list[Any]) -> list[_Unit]:
    """Group tasks whose Hessians are GPTQModel's shared copies (verified equal, one device sync)."""
    leader_of: dict[int, Any] = {}  # id(task) -> the first task of its shared-Hessian cache
    first_of_cache: dict[int, Any] = {}  # id(cache) -> its first task
    for task in tasks:
        cache = getattr(task, "_shared_hessian_cache", None)
        if cache is not None and not getattr(task, "_shared_hessian_cache_disabled", False):
            leader_of[id(task)] = first_of_cache.setdefault(id(cache), task)
    # A follower joins its leader's unit when their Hessians are equal (torch.equal's answer).
    pairs = [(leader_of[id(t)], t) for t in tasks if leader_of.get(id(t), t) is not t]
    comparable = [(a, b) for a, b in pairs
                  if a.H.shape == b.H.shape and a.H.dtype == b.H.dtype and a.H.device == b.H.device]
    same: dict[int, bool] = {}  # id(follower) -> equal to its leader's
    if comparable:
        flags = torch.stack([(a.H == b.H).all() for a, b in comparable]).tolist()
        same = {id(b): flag for (_, b), flag in zip(comparable, flags, strict=True)}
    units: list[_Unit] = []
    unit_of_leader: dict[int, _Unit] = {}
    for task in tasks:
        leader = leader_of.get(id(task))
        if leader is not None and leader is not task and same.get(id(task), False):
            unit_of_leader[id(leader)].tasks.append(task)
            continue
        units.append(_Unit([task]))
        if leader is task:
            unit_of_leader[id(task)] = units[-1]
    return units


def _chunks(units: list[_Unit], chunk_bytes: int) -> Iterator[list[_Unit]]:
    chunk: list[_Unit] = []
    used = 0
    for unit in units:
        first = unit.tasks[0]
        # fp32: the Hessian copy, its factor and inverse (3 C x C); per task W, Q and losses (3 R x C)
        cost = 3 * first.columns**2 * 4 + len(unit.tasks) * 3 * first.rows * first.columns * 4
        if chunk and used + cost > chunk_bytes:
            yield chunk
            chunk, used = [], 0
        chunk.append(unit)
        used += cost
    if chunk:
        yield chunk


def _use_extension(first: Any, device: torch.device, blocksize: int) -> bool:
    """GPTQModel's own condition for its CUDA block-update extension (``GPTQ.quantize``)."""
    from gptqmodel.quantization import gptq_cuda
    from gptqmodel.quantization.quantizer import Quantizer
    from gptqmodel.utils.env import env_flag

    qcfg = first.qcfg
    return (
        device.type == "cuda"
        and blocksize == 128
        and qcfg.bits in (2, 3, 4, 5, 6, 7, 8)
        and int(first.quantizer.maxq.item()) == (1 << qcfg.bits) - 1
        and not qcfg.mock_quantization
        and type(first.quantizer) is Quantizer
        and not env_flag("GPTQMODEL_DISABLE_GPTQ_CUDA")
        and bool(gptq_cuda.block_update_available())
    )


def _find_params(
    quantizer: Any, W: torch.Tensor, maxq: torch.Tensor, maxq_value: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Quantizer.find_params`` for every module's rows of ``W`` ([modules, rows, columns]).

    Plain min/max parameters are per row, so one call on the rows stacked gives each module's
    exact values (:func:`_min_max_params`). With ``mse`` the grid search sums each row, and a
    CUDA reduction may split a row differently for another row count or layout: then one call
    per module, as GPTQModel.
    """
    if float(getattr(quantizer.qcfg, "mse", 0.0) or 0.0) > 0.0 or not quantizer.perchannel:
        scales, zeros = [], []
        for w in W:
            quantizer.find_params(w, weight=True)
            scales.append(quantizer.scale)
            zeros.append(quantizer.zero)
        return torch.cat(scales), torch.cat(zeros)
    return _min_max_params(quantizer, W.reshape(-1, W.shape[-1]), maxq, maxq_value)


def _min_max_params(
    quantizer: Any, x: torch.Tensor, maxq: torch.Tensor, maxq_value: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Quantizer.find_params(x, weight=True)`` (7.6, per channel, no ``mse``) without its host syncs.

    GPTQModel's version writes through boolean masks and asks ``torch.any`` and a tensor fill
    value, each a wait for the GPU; called once per group of columns, those waits kept the host
    from queueing ahead. Here the same operations run on the same values with ``torch.where`` in
    place of the masked writes (a selection, no arithmetic), and the division is by the same
    0-dim device tensor (a Python number would take another CUDA kernel: multiply by the
    reciprocal). The CPU and CUDA tests compare it with ``Quantizer.find_params`` bit for bit.
    ``maxq`` is the quantizer's maximum level on ``x``'s device, ``maxq_value`` the same as an int.
    """
    dev = x.device
    sym = bool(quantizer.qcfg.sym)
    tmp = torch.zeros(x.shape[0], device=dev)
    xmin = torch.minimum(x.min(1)[0], tmp)
    xmax = torch.maximum(x.max(1)[0], tmp)
    if sym:
        xmax = torch.maximum(torch.abs(xmin), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    both_zero = (xmin == 0) & (xmax == 0)
    xmin = torch.where(both_zero, -1.0, xmin)
    xmax = torch.where(both_zero, 1.0, xmax)
    if maxq_value < 0:
        scale, zero = xmax, xmin
    elif quantizer.requires_groupwise_processing():
        scale = xmax / maxq
        zero = torch.zeros_like(scale)
    else:
        scale = (xmax - xmin) / maxq
        zero = torch.full_like(scale, (maxq_value + 1) / 2) if sym else torch.round(-xmin / scale)
    return scale.reshape(-1, 1), zero.reshape(-1, 1)


@dataclass
class _Inverse:
    """One shared Hessian prepared as GPTQModel's ``GPTQ.quantize`` prepares it."""

    dead: torch.Tensor  # columns whose Hessian diagonal is 0 (their weights are zeroed)
    perm: torch.Tensor | None  # desc_act / act_group_aware column order
    global_perm: torch.Tensor | None  # act_group_aware's group order
    hinv: torch.Tensor  # upper Cholesky factor of the damped inverse
    info: torch.Tensor  # non-zero: a factorization failed

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.dead, self.perm, self.global_perm, self.hinv, self.info) if isinstance(t, torch.Tensor)]


def _invert_unit(hessian: torch.Tensor, qcfg: Any, columns: int, group: int, damp: float) -> _Inverse:
    """Dead columns, permutation and GPTQModel's first inverse attempt (``GPTQ.hessian_inverse``:
    ``damp_percent`` x the mean of the untouched diagonal, lower Cholesky, ``cholesky_inverse``
    into the factor, upper Cholesky) of one Hessian, on a private copy."""
    from gptqmodel.quantization.gar import (
        compose_final_perm,
        compute_global_perm,
        compute_local_perms,
        extend_perm_with_tail,
    )

    H = hessian.to(dtype=torch.float32, copy=True)
    dead = torch.diag(H) == 0
    H.diagonal().masked_fill_(dead, 1)  # GPTQModel's H[dead, dead] = 1 (the same entries), without its host sync
    perm = global_perm = None
    if qcfg.desc_act:
        perm = torch.argsort(torch.diag(H), descending=True)
        H = H[perm][:, perm]
    elif qcfg.act_group_aware:
        diag_h = torch.diag(H)
        local_perms, local_values = compute_local_perms(diag_h, group, return_values=True)
        global_perm = compute_global_perm(diag_h, group, precomputed_values=local_values)
        perm = extend_perm_with_tail(compose_final_perm(local_perms, global_perm, group), columns)
        H = H[perm][:, perm]
    hinv, info = gptq_first_inverse(H, damp)
    return _Inverse(dead, perm, global_perm, hinv, info)


def gptq_first_inverse(H: torch.Tensor, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQModel's first inverse attempt (``GPTQ.hessian_inverse``) on the 2-D Hessian ``H``:
    ``damp`` x the mean of the untouched diagonal added to it (in place), lower Cholesky,
    ``cholesky_inverse`` into the factor, upper Cholesky. Returns the upper factor and a status
    that is non-zero when a factorization failed."""
    diag_view = H.diagonal()
    mean = torch.mean(diag_view.clone())
    diag_view.add_(damp * mean)
    factor, info = torch.linalg.cholesky_ex(H, check_errors=False)
    try:
        torch.cholesky_inverse(factor, out=factor)
        hinv, info_upper = torch.linalg.cholesky_ex(factor, upper=True, check_errors=False)
    except torch.linalg.LinAlgError:  # CPU: a failed factor cannot be inverted
        hinv, info_upper = factor, torch.ones_like(info)
    return hinv, info.abs() + info_upper.abs()


_inverse_pool: tuple[ThreadPoolExecutor, int] | None = None  # (pool, its threads), shared by every solve
_inverse_pool_lock = threading.Lock()
_inverse_streams = threading.local()
_linalg_loaded: set[torch.device] = set()  # CUDA devices whose linear-algebra library this process loaded


def _load_cuda_linalg(device: torch.device) -> None:
    """Load torch's CUDA linear-algebra library with one small call on this thread, once.

    torch loads it lazily at the first CUDA ``linalg`` call, and that loading is not safe when
    threads race to it ("lazy wrapper should be called at most once"): the inverse threads'
    first calls could all be the process's first. GPTQModel's device workers warm it up on their
    own; a solve called outside GPTQModel did not."""
    with _inverse_pool_lock:
        if device in _linalg_loaded:
            return
        with torch.cuda.device(device):
            eye = torch.eye(2, device=device)
            factor, _ = torch.linalg.cholesky_ex(eye, check_errors=False)
            torch.cholesky_inverse(factor)
        _linalg_loaded.add(device)


def _submit(fn: Callable[[Any], Any], items: list[Any], threads: int) -> list[Future]:
    """``fn`` of each item submitted, in order, to the shared pool of inverse threads (grown to at
    least ``threads``; an outgrown pool finishes what it was given and ends)."""
    global _inverse_pool
    with _inverse_pool_lock:  # submitted under the lock: no other solve can shut this pool down first
        if _inverse_pool is None or _inverse_pool[1] < threads:
            if _inverse_pool is not None:
                _inverse_pool[0].shutdown(wait=False)
            _inverse_pool = (ThreadPoolExecutor(max_workers=threads, thread_name_prefix="defuser-quant-hinv"), threads)
        return [_inverse_pool[0].submit(fn, x) for x in items]


def _spread(fn: Callable[[Any], Any], items: list[Any], threads: int) -> list[Any]:
    """``[fn(x) for x in items]`` on the shared pool of inverse threads."""
    return [f.result() for f in _submit(fn, items, threads)]


def _submit_inverses(hessians: list[torch.Tensor], invert: Callable[[torch.Tensor], _Inverse],
                     threads: int) -> list[Future]:
    """``invert`` of each Hessian started on the inverse threads; :func:`_collect_inverses` waits.

    On CUDA each thread works on a stream of its own, ordered after what the caller's stream had
    queued when this was called (not what it queues later: so the caller's next work, a chunk's
    column loop, runs beside these inverses)."""
    device = hessians[0].device
    if device.type != "cuda":
        return _submit(invert, hessians, max(1, threads))
    _load_cuda_linalg(device)
    queued = torch.cuda.current_stream(device).record_event()

    def job(hessian: torch.Tensor) -> tuple[_Inverse, torch.cuda.Event, torch.device]:
        streams = _inverse_streams.__dict__.setdefault("by_device", {})
        stream = streams.get(device)
        if stream is None:
            stream = streams[device] = torch.cuda.Stream(device)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            stream.wait_event(queued)
            inverse = invert(hessian)
            return inverse, stream.record_event(), device

    return _submit(job, hessians, max(1, threads))


def _collect_inverses(jobs: list[Future]) -> list[_Inverse]:
    """The inverses of :func:`_submit_inverses`, in order, ready on the calling thread's stream
    (raises what a job raised)."""
    done = [job.result() for job in jobs]
    if not done or not isinstance(done[0], tuple):  # the CPU: the inverses themselves
        return done
    origin = torch.cuda.current_stream(done[0][2])
    for inverse, finished, _ in done:
        origin.wait_event(finished)
        tensors = inverse.tensors() if isinstance(inverse, _Inverse) else []
        for t in tensors:
            if t.is_cuda:  # made on a helper stream, read on the caller's: keep its memory until then
                t.record_stream(origin)
    return [inverse for inverse, _, _ in done]


def _unit_inverses(hessians: list[torch.Tensor], invert: Callable[[torch.Tensor], _Inverse],
                   threads: int, own_streams: bool = True) -> list[_Inverse]:
    """``invert`` of each Hessian, in order: one after another, or spread over ``threads`` host
    threads (on CUDA each on its own stream, ordered after the caller's and waited for by it, or
    with ``own_streams=False`` all on the caller's stream)."""
    if threads <= 1 or len(hessians) < 2:
        return [invert(h) for h in hessians]
    device = hessians[0].device
    if device.type != "cuda":
        return _spread(invert, hessians, threads)
    if not own_streams:
        _load_cuda_linalg(device)
        origin = torch.cuda.current_stream(device)

        def on_caller_stream(hessian: torch.Tensor) -> _Inverse:
            with torch.cuda.device(device), torch.cuda.stream(origin):
                return invert(hessian)

        return _spread(on_caller_stream, hessians, threads)
    return _collect_inverses(_submit_inverses(hessians, invert, threads))


class InversesAhead:
    """A chunk's Hessians finalized, grouped into units and their inverses started: on the inverse
    threads (CUDA with ``"own"`` streams, or the CPU: running beside whatever the caller does next),
    or, where they must run on the caller's stream, computed when :meth:`collect` is called."""

    def __init__(self, units: list[_Unit], jobs: list[Future] | None, compute: Callable[[], list[_Inverse]]):
        self.units = units
        self._jobs = jobs
        self._compute = compute

    @property
    def background(self) -> bool:
        """True when the inverses are being computed on the inverse threads."""
        return self._jobs is not None

    def collect(self) -> list[_Inverse]:
        """Each unit's inverse, in order, ready on the calling thread's stream (raises what its
        computation raised)."""
        return _collect_inverses(self._jobs) if self._jobs is not None else self._compute()


def _copy_inverse(inverse: _Inverse) -> _Inverse:
    """A graph's static outputs copied into tensors of the caller's own."""
    return _Inverse(*(t.clone() if isinstance(t, torch.Tensor) else t
                      for t in (inverse.dead, inverse.perm, inverse.global_perm, inverse.hinv, inverse.info)))


def start_inverses(tasks: list[Any], inverse_threads: int, streams: str = "auto", background: bool = False,
                   graphs: bool = False) -> InversesAhead:
    """Finalize ``tasks``' Hessians (GPTQModel's calls, on the current stream), group them into
    units and start the units' inverses: GPTQModel's own calls per (shared) Hessian on a private
    copy (the task's H is only read), on the same 2-D shapes and in the same order. Batched
    ``torch.linalg`` calls would use other kernels on CUDA (cuSOLVER ``potrfBatched``, MAGMA's
    batched ``cholesky_inverse``) that round differently from the single-matrix ones GPTQModel calls.

    On CUDA ``inverse_threads`` > 1 threads with ``"own"`` streams start at once; ``background``
    also starts them at once on the CPU, or on CUDA with one thread (never with ``"caller"``
    streams, whose inverses must run on the caller's stream). Otherwise they are computed when
    collected, on the collecting thread (spread over the threads first with ``"caller"`` streams).
    ``graphs``: on CUDA with ``"own"`` streams, each thread replays its recording of the calls
    (:mod:`.inverse_graphs`: kept only where the replay gave the eager calls' bits)."""
    for task in tasks:
        task.finalize_hessian(target_device=getattr(task.module, "target_device", None))
        task._release_deferred_hessian_sources()
    units = _units(tasks)
    first = units[0].tasks[0]
    qcfg, columns, device = first.qcfg, first.columns, first.H.device
    damp = float(qcfg.damp_percent)

    def invert(H: torch.Tensor) -> _Inverse:
        return _invert_unit(H, qcfg, columns, qcfg.group_size, damp)

    hessians = [u.tasks[0].H for u in units]
    threads = inverse_threads if device.type == "cuda" else 1
    own = device.type != "cuda" or solve_streams(streams) == "own"
    if graphs and own and device.type == "cuda":
        key = (bool(qcfg.desc_act), bool(qcfg.act_group_aware), qcfg.group_size, columns, damp)
        invert = inverse_graphs.graphed(invert, key, _copy_inverse)
    if own and (background or (device.type == "cuda" and threads > 1 and len(hessians) > 1)):
        return InversesAhead(units, _submit_inverses(hessians, invert, threads), lambda: [])
    return InversesAhead(units, None, lambda: _unit_inverses(hessians, invert, threads, own_streams=own))


_constants: dict[tuple, torch.Tensor] = {}


def _device_constant(values: list[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A small integer tensor the solve only reads (column groups, task units, ``g_idx``), made once per
    device: each ``torch.tensor(..., device=cuda)`` is a copy from pageable memory, which waits for
    the stream's queued work first, so made per block it kept the host from queueing ahead."""
    key = (tuple(values), dtype, device)
    tensor = _constants.get(key)
    if tensor is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("a device constant was not made before the CUDA graph recording (a host copy "
                               "cannot be recorded)")
        if len(_constants) > 256:  # shapes and settings vary little within a run; never grow without bound
            _constants.clear()
        tensor = _constants[key] = torch.tensor(values, dtype=dtype, device=device)
    return tensor


def batched_gptq_solve(tasks: list[Any], blocksize: int = BLOCKSIZE, inverse_threads: int = 1,
                       host_results: bool = False, pack: bool = False,
                       streams: str = "auto", ahead: InversesAhead | None = None,
                       inverses_started: Callable[[], None] | None = None,
                       rows_kernel: bool = False, inverse_graphs: bool = False,
                       loop_graphs: bool = False, inplace_update: bool = False) -> list[SolveResult | None]:
    """Solve ``tasks`` (GPTQModel ``GPTQ`` tasks of one settings key) together.

    Returns one entry per task: its :class:`SolveResult`, or None when GPTQModel's per-module
    solve must handle it (its first Cholesky failed, or its loss is NaN). Task state is only read.
    ``inverse_threads``: on CUDA, host threads computing the Hessian inverses, each on its own
    stream, or with ``streams`` ``"caller"`` (``"auto"``: under deterministic algorithms) all on
    the calling thread's stream.
    ``host_results``: scales, zeros and ``g_idx`` come back on the CPU, moved there together.
    ``pack``: with ``host_results``, 2, 4 or 8 bits and feature counts that are multiples of 32,
    each result also carries its ``pack_block`` words (:attr:`SolveResult.packed`), packed here.
    ``ahead``: these tasks' inverses, already started by :func:`start_inverses` (their Hessians
    finalized there); ``inverses_started``: called once this call's own inverses are under way
    and before its column loop is queued (the coordinator starts the next chunk's inverses there).
    ``rows_kernel``: where GPTQModel's block-update extension applies, each 128-column block of the
    whole chunk is one launch of :mod:`.rows_kernel` (the extension's values; falls back to the
    extension per Hessian where that kernel cannot be built).
    ``inverse_graphs``: the inverses this call starts itself are replayed from CUDA graphs
    (:func:`start_inverses`' ``graphs``).
    ``loop_graphs``: on a CUDA side stream, the column loop runs on the device's buffers of
    :mod:`.loop_graph` and is replayed from a CUDA graph per chunk shape (kept only where its replay
    gave the eager loop's bits); the device's chunk loops then run one at a time.
    ``inplace_update``: each module's update after a column block as one in-place ``addmm_``
    (:attr:`BatchedSolve.inplace_update`).
    """
    start = time.time()
    if ahead is None:
        ahead = start_inverses(tasks, inverse_threads, streams, graphs=inverse_graphs)
    units = ahead.units
    first = units[0].tasks[0]
    qcfg = first.qcfg
    device = first.H.device
    if inverses_started is not None:
        inverses_started()
    order = [t for u in units for t in u.tasks]
    hlist = [i for i, u in enumerate(units) for _ in u.tasks]  # task -> its unit (shared Hessian)
    # A unit's tasks are adjacent in ``order``: their rows form one [members x R] span of W.
    spans: list[tuple[int, int, int]] = []  # (first task, end, unit)
    for u, unit in enumerate(units):
        first_b = spans[-1][1] if spans else 0
        spans.append((first_b, first_b + len(unit.tasks), u))
    B, U, R, C = len(order), len(units), first.rows, first.columns
    group = qcfg.group_size

    quantizer = copy.deepcopy(first.quantizer)
    maxq_value = int(quantizer.maxq.item())  # read once per chunk, not once per group of columns
    maxq = quantizer.maxq.to(device)
    extension = _use_extension(first, device, blocksize)
    one_launch = extension and rows_kernel and rows_block.available()
    plan = _LoopPlan(hlist, spans, _device_constant(hlist, torch.int32, device) if one_launch else None,
                     quantizer, maxq, maxq_value, group, blocksize, int(qcfg.bits), extension, one_launch,
                     inplace_update)
    graphed = loop_graphs and loop_graph.can_record(device)
    layout = [((B, R, C), torch.float32)] * 3 + [((U, C, C), torch.float32)] + [((B * R, 1), torch.float32)] * 2

    def load(W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The chunk's weights into ``W``; returns GPTQModel's per-row parameters of them."""
        for b, task in enumerate(order):
            W[b].copy_(task.module.weight.data)
        return _find_params(quantizer, W, maxq, maxq_value)

    def mask(W: torch.Tensor) -> None:
        for b, u in enumerate(hlist):
            W[b].masked_fill_(inverses[u].dead, 0)  # GPTQModel's W[:, dead] = 0, without its host sync
            if perms is not None:
                W[b] = W[b][:, perms[u]]

    with loop_graph.arena(device, layout) if graphed else contextlib.nullcontext() as held:
        W = held.buffers[0] if graphed else torch.empty((B, R, C), dtype=torch.float32, device=device)
        row_scale, row_zero = load(W)
        inverses = ahead.collect()
        damp = float(qcfg.damp_percent)
        hinvs = [inv.hinv for inv in inverses]
        infos = [inv.info for inv in inverses]
        perms = [inv.perm for inv in inverses] if (qcfg.desc_act or qcfg.act_group_aware) else None
        global_perms = [inv.global_perm for inv in inverses]
        mask(W)
        if graphed:  # the loop on the arena's buffers, replayed from its graph where there is one
            _, Q, Losses, H, static_scale, static_zero = held.buffers

            def to_buffers(scale: torch.Tensor, zero: torch.Tensor) -> None:
                static_scale.copy_(scale)
                static_zero.copy_(zero)
                for u, hinv in enumerate(hinvs):
                    H[u].copy_(hinv)

            def prepare_again() -> None:
                to_buffers(*load(W))
                mask(W)

            to_buffers(row_scale, row_zero)
            key = (loop_graph.layout_key(layout), tuple(hlist), int(qcfg.bits), bool(qcfg.sym), group, maxq_value,
                   float(getattr(qcfg, "mse", 0.0) or 0.0), bool(quantizer.perchannel), blocksize, extension,
                   one_launch, inplace_update)
            # a recording reads this chunk's plan (maxq, the task units) and the device constants made by
            # its eager loop: kept alive with the graph
            S, Z, loss_sums = held.run(
                key, lambda: _column_loop(plan, W, H, Q, Losses, static_scale, static_zero), prepare_again, [Q],
                keep=lambda: (plan, tuple(_constants.values())),
            )
        else:
            Q = torch.empty_like(W)
            S, Z, loss_sums = _column_loop(plan, W, hinvs, Q, torch.empty_like(W), row_scale, row_zero)
            del W
        del hinvs, inverses
        by_task = _task_results(tasks, order, plan, qcfg, Q, S, Z, loss_sums, infos, perms, global_perms,
                                (time.time() - start) / B, damp, host_results, pack, borrowed=graphed)
    return [by_task[id(task)] for task in tasks]


@dataclass
class _LoopPlan:
    """What a chunk's column loop reads besides its buffers."""

    hlist: list[int]  # task -> its unit (shared Hessian)
    spans: list[tuple[int, int, int]]  # (first task, end, unit): a unit's rows of W
    task_unit: torch.Tensor | None  # ``hlist`` on the device, for the rows kernel
    quantizer: Any
    maxq: torch.Tensor
    maxq_value: int
    group: int
    blocksize: int
    bits: int
    extension: bool  # GPTQModel's block-update extension applies
    one_launch: bool  # ... and each block is one launch of the rows kernel
    inplace_update: bool = False  # a module's update after a block as one addmm_ (BatchedSolve.inplace_update)


def _column_loop(plan: _LoopPlan, W: torch.Tensor, hinvs: torch.Tensor | list[torch.Tensor], Q: torch.Tensor,
                 Losses: torch.Tensor, row_scale: torch.Tensor,
                 row_zero: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQModel's column-block loop over a whole chunk: ``W`` ([tasks, rows, columns], prepared) is
    worked on in place, ``Q`` and ``Losses`` (its shape) are written; ``hinvs[u]`` is unit ``u``'s
    inverse. Returns the scales and zeros ([tasks, rows, groups]) and each task's summed loss. Reads
    nothing back to the host, so it can be recorded as a CUDA graph (:mod:`.loop_graph`)."""
    from gptqmodel.quantization import gptq_cuda
    from gptqmodel.quantization.quantizer import quantize as quantize_values

    hlist, group, blocksize, quantizer = plan.hlist, plan.group, plan.blocksize, plan.quantizer
    maxq, maxq_value = plan.maxq, plan.maxq_value
    B, R, C = W.shape
    device = W.device
    Q.zero_()
    Losses.zero_()
    scales: list[torch.Tensor] = []
    zeros: list[torch.Tensor] = []
    cur_scale, cur_zero = row_scale, row_zero
    now_idx = 1
    for i1 in range(0, C, blocksize):
        i2 = min(i1 + blocksize, C)
        count = i2 - i1
        W1 = W[:, :, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        block_params: list[tuple[torch.Tensor, torch.Tensor]] = []
        column_groups: list[int] = []
        if group == -1 or (i1 % group == 0 and count <= group):
            # the block is one group, or inside the one set of parameters: what the loop below gives,
            # without its 128 Python steps (at a group start: new parameters, appended once)
            if group != -1:
                cur_scale, cur_zero = _find_params(quantizer, W[:, :, i1 : i1 + group], maxq, maxq_value)
                scales.append(cur_scale)
                zeros.append(cur_zero)
                now_idx += 1
            block_params.append((cur_scale, cur_zero))
            column_groups = [0] * count
        for i in range(count if not column_groups else 0):
            column = i1 + i
            if group != -1:
                if column % group == 0:
                    cur_scale, cur_zero = _find_params(quantizer, W[:, :, column : column + group], maxq, maxq_value)
                if (column // group) - now_idx == -1:
                    scales.append(cur_scale)
                    zeros.append(cur_zero)
                    now_idx += 1
            if not block_params or block_params[-1][0] is not cur_scale:
                block_params.append((cur_scale, cur_zero))
            column_groups.append(len(block_params) - 1)
        if plan.extension and count == 128:
            block_scale = torch.stack([s.flatten() for s, _ in block_params])
            block_zero = torch.stack([z.flatten() for _, z in block_params])
            column_group = _device_constant(column_groups, torch.int32, device)
            if plan.one_launch:  # every row of the chunk, each with its unit's inverse
                rows_block.block_update(
                    W1.view(-1, count), torch.stack([h[i1:i2, i1:i2] for h in hinvs]), plan.task_unit, block_scale,
                    block_zero, column_group, Q[:, :, i1:i2].view(-1, count), Err1.view(-1, count),
                    Losses[:, :, i1:i2].view(-1, count), R, (1 << plan.bits) - 1,
                )
                spans_left: list[tuple[int, int, int]] = []
            else:
                spans_left = plan.spans
            # One launch per unit: the kernel runs one block per row, each row on its own (its
            # scale, zero and the shared Hinv), so stacking a unit's rows gives each row's values.
            for b0, b1, u in spans_left:
                rows = slice(b0 * R, b1 * R)
                gptq_cuda.gptq_block_update(
                    W1[b0:b1].view(-1, count), hinvs[u][i1:i2, i1:i2], block_scale[:, rows], block_zero[:, rows],
                    column_group, Q[b0:b1, :, i1:i2].view(-1, count), Err1[b0:b1].view(-1, count),
                    Losses[b0:b1, :, i1:i2].view(-1, count), (1 << plan.bits) - 1,
                )
        else:
            Hinv1 = torch.stack([h[i1:i2, i1:i2] for h in hinvs])[hlist]
            d = Hinv1.diagonal(dim1=-2, dim2=-1)
            for i in range(count):
                scale, zero = block_params[column_groups[i]]
                w = W1[:, :, i]
                q = quantize_values(w, scale.view(B, R), zero.view(B, R), maxq, False)
                Q[:, :, i1 + i] = q
                delta = Err1[:, :, i]
                torch.sub(w, q, out=delta)
                di = d[:, i].unsqueeze(1)
                Losses[:, :, i1 + i] = delta.square() / di.square()
                delta.div_(di)
                W1[:, :, i:] -= delta.unsqueeze(2) * Hinv1[:, i, i:].unsqueeze(1)
        Losses[:, :, i1:i2].div_(2)
        if i2 < C:
            tails = [h[i1:i2, i2:] for h in hinvs]
            # per task: a stacked matmul may take another kernel, rounding differently; the views made
            # once per block (``W[b, :, i2:] -= ...`` also indexed W again to assign the result back)
            for w, err, u in zip(W[:, :, i2:].unbind(0), Err1.unbind(0), hlist):
                if plan.inplace_update:
                    w.addmm_(err, tails[u], alpha=-1)
                else:
                    w.sub_(err.matmul(tails[u]))
        del W1, Err1
    if not scales:
        scales, zeros = [row_scale], [row_zero]
    S = torch.cat(scales, dim=1).view(B, R, -1)
    Z = torch.cat(zeros, dim=1).view(B, R, -1)
    return S, Z, torch.stack([torch.sum(Losses[b]) for b in range(B)])


def _task_results(tasks: list[Any], order: list[Any], plan: _LoopPlan, qcfg: Any, Q: torch.Tensor, S: torch.Tensor,
                  Z: torch.Tensor, loss_sums: torch.Tensor, infos: list[torch.Tensor],
                  perms: list[torch.Tensor] | None, global_perms: list[Any], duration: float, damp: float,
                  host_results: bool, pack: bool, borrowed: bool) -> dict[int, SolveResult | None]:
    """Each task's :class:`SolveResult` (None: GPTQModel's own solve handles it) from the chunk's loop
    outputs (``order``: the tasks in ``Q``'s order), by ``id(task)``. ``borrowed``: ``Q`` is a buffer the
    caller reuses, so no result may keep a view of it."""
    from gptqmodel.quantization.gar import invert_perm

    B, R, C = Q.shape
    device, hlist, group, blocksize = Q.device, plan.hlist, plan.group, plan.blocksize
    width = group if group != -1 else C
    base_g_idx = _device_constant([i // width for i in range(C)], torch.int32, device)
    kind = "batched_rows_block_update" if plan.one_launch else "batched_cuda_block_update"
    path = (kind if plan.extension and C % 128 == 0 else "batched_torch") + f"@{device.type}"
    by_task: dict[int, SolveResult | None] = {}
    # Read once the whole chunk is queued (the first read waits for it): the factorizations'
    # status and every task's summed loss.
    failed = (torch.stack(infos) != 0).tolist()
    loss_sums = loss_sums.tolist()
    for b, task in enumerate(order):
        u = hlist[b]
        if failed[u]:
            by_task[id(task)] = None
            continue
        avg_loss = loss_sums[b] / task.nsamples
        if avg_loss != avg_loss:  # NaN: GPTQModel's own retry handles it
            by_task[id(task)] = None
            continue
        q, scale, zero, g_idx = Q[b], S[b], Z[b], base_g_idx
        if qcfg.desc_act:
            invperm = torch.argsort(perms[u]).to(device)
            q = q[:, invperm]
            g_idx = g_idx[invperm]
        elif qcfg.act_group_aware:
            q = q[:, invert_perm(perms[u]).to(device)]
            inv_global = invert_perm(global_perms[u])  # then the groups past the permuted ones, in order
            index = torch.cat((inv_global, torch.arange(inv_global.numel(), scale.shape[1], device=device,
                                                        dtype=inv_global.dtype)))
            scale, zero = scale[:, index], zero[:, index]
        else:
            scale, zero = scale.contiguous(), zero.contiguous()
        weight = task.module.weight
        q = q.reshape(weight.shape).to(weight.dtype).to(device=weight.data.device)
        if borrowed and q.untyped_storage().data_ptr() == Q.untyped_storage().data_ptr():
            q = q.clone()  # float32 weights on the solve's device: still a view of the buffer
        by_task[id(task)] = SolveResult(
            (q, scale, zero, g_idx.clone(), duration, avg_loss, damp, task.nsamples), path, device.type, blocksize
        )
    if host_results:
        solved = [r for r in by_task.values() if r is not None]
        values = [r.values for r in solved]
        packs = packing.pack_stack(*([v[i] for v in values] for i in range(4)), bits=int(qcfg.bits),
                                   shared_g_idx=not qcfg.desc_act) if pack and packing.packable(qcfg.bits, R, C) else []
        moved = iter(packing.host_copies([t for v in values for t in v[1:4]] + packs))
        for r in solved:
            r.values = (r.values[0], next(moved), next(moved), next(moved), *r.values[4:])
        if packs:
            for r in solved:
                qweight, qzeros, fingerprint = next(moved), next(moved), next(moved)
                r.packed = packing.PackedWords(int(qcfg.bits), qweight, qzeros, *r.values[1:4], fingerprint)
    return by_task


# ----- inside GPTQModel: the coordinator -------------------------------------------------------
class _Coordinator:
    """Groups a subset's tasks at the first ``process()`` call and splits each group into chunks.

    GPTQModel runs ``process()`` for a subset's modules on several device workers at once (each
    worker is handed every n-th module). With ``settings.solve_ahead`` > 0, background solver
    threads (``settings.parallel`` per device, each on its own CUDA stream) solve the device's
    chunks in subset order as soon as they are grouped, at most ``solve_ahead`` held at a time
    unless a worker waits; a worker waits only while its module's chunk is not solved, so the
    next chunks are solved while the workers run GPTQModel's own processing of the earlier ones.
    With ``solve_ahead=0`` a worker whose module's chunk is not solved solves the next open chunk
    of its device itself (its own chunk first), at most ``settings.parallel`` at a time per
    device, on the worker's own CUDA stream. Every task gets its result when GPTQModel's
    ``process()`` asks ``GPTQ.quantize`` for it; a solve that fails with anything but running
    out of memory fails every worker waiting for that chunk."""

    def __init__(self, settings: BatchedSolve):
        self.settings = settings
        self.stats = BatchedSolveStats()
        self.cond = threading.Condition()
        self.results: dict[int, tuple[Any, SolveResult, _Chunk]] = {}  # id(task) -> (task, result, its chunk)
        self.chunk_of: dict[int, _Chunk] = {}  # id(task) -> its chunk, until the chunk is solved (failed: kept)
        self.open: list[_Chunk] = []  # chunks nobody has started, in subset order
        self.running: Counter = Counter()  # device -> chunks being solved there
        self.held: Counter = Counter()  # device -> chunks being solved or with results not yet asked for
        self.seen: dict[int, Any] = {}  # id(task) -> task, every task grouped or refused once
        self.solvers: dict[str, list[threading.Thread]] = {}  # device -> its solver threads
        self.broken: dict[str, BaseException] = {}  # device -> what ended its solver threads
        self.closed = False
        self.streams = threading.local()

    def prepare(self, processor: Any, module: Any, subset: dict | None) -> None:
        tasks = getattr(processor, "tasks", None) or {}
        task = tasks.get(getattr(module, "name", None))
        if task is None:
            return
        with self.cond:
            mine = self.chunk_of.get(id(task))
            if mine is None:
                if id(task) in self.seen:
                    return
                group = self._group_for(task, tasks, subset)
                if group is None:
                    return
                mine = self._open_chunks(group)[id(task)]
        if self.settings.solve_ahead:
            self._wait_for(mine)
            return
        while True:
            with self.cond:
                while True:
                    if mine.done:
                        return
                    # Only chunks of the worker's own device: GPTQModel keeps its workers per device.
                    same = self._open_on(mine.device)
                    if self.running[mine.device] < self.settings.parallel and same:
                        chunk = mine if mine in same else same[0]
                        self._start(chunk)
                        break
                    self.cond.wait()
            self._run(chunk)

    def _wait_for(self, chunk: _Chunk) -> None:
        """Block until a solver thread has solved ``chunk``; raise what its solve raised."""
        with self.cond:
            if not chunk.done:
                t0 = time.perf_counter()
                chunk.waiters += 1
                self.cond.notify_all()  # a held-back solver may go on: a worker needs this chunk
                try:
                    while not chunk.done:
                        self.cond.wait()
                finally:
                    chunk.waiters -= 1
                    self.stats.waited_seconds += time.perf_counter() - t0
            error = chunk.error
        if error is not None:
            raise RuntimeError(f"the batched GPTQ solve of {len(chunk.tasks)} modules failed: {error}") from error

    def _open_on(self, device: str) -> list[_Chunk]:
        """Under the lock: ``device``'s chunks nobody has started, in subset order."""
        return [c for c in self.open if c.device == device]

    def _start(self, chunk: _Chunk) -> None:
        """Under the lock: ``chunk`` taken off the open list to be solved now."""
        self.open.remove(chunk)
        self.running[chunk.device] += 1
        self.held[chunk.device] += 1

    def _run(self, chunk: _Chunk) -> None:
        """Solve ``chunk`` and mark it done; on a solver thread its error is kept for the workers."""
        try:
            self._solve(chunk)
        except BaseException as exc:
            if not self.settings.solve_ahead:
                raise
            chunk.error = exc
        finally:
            with self.cond:
                self.running[chunk.device] -= 1
                chunk.done = True
                if not chunk.untaken:
                    self.held[chunk.device] -= 1
                if chunk.error is None:  # a failed chunk stays findable: a worker coming later raises its error
                    for member in chunk.tasks:
                        self.chunk_of.pop(id(member), None)
                self.cond.notify_all()

    def _solver(self, device: str) -> None:
        """A solver thread of ``device``: its open chunks in order, ``solve_ahead`` held at most
        unless a worker waits for one of them, until the coordinator closes."""
        try:
            with self._device_context(device), torch.inference_mode():  # as GPTQModel's workers run process()
                self._solve_open_chunks(device)
        except BaseException as exc:  # (a solve's own errors are the chunk's): no worker may wait forever
            with self.cond:
                self.broken[device] = exc
                self._fail_open(device, exc)

    @staticmethod
    def _device_context(device: str) -> contextlib.AbstractContextManager:
        """``device`` made the solver thread's current CUDA device (nothing on the CPU)."""
        if device.startswith("cuda") and torch.cuda.is_available():
            return torch.cuda.device(torch.device(device))
        return contextlib.nullcontext()

    def _fail_open(self, device: str, error: BaseException) -> None:
        """Under the lock: ``device``'s chunks nobody started, given up with ``error``."""
        for chunk in self._open_on(device):  # (kept in chunk_of: a worker coming later raises the error)
            self.open.remove(chunk)
            chunk.done, chunk.error = True, error
        self.cond.notify_all()

    def _solve_open_chunks(self, device: str) -> None:
        """The solver thread's loop (see :meth:`_solver`)."""
        while True:
            with self.cond:
                while True:
                    if self.closed:
                        return
                    same = self._open_on(device)
                    wanted = any(c.waiters for c in same)
                    if same and self.running[device] < self.settings.parallel and (
                            wanted or self.held[device] < self.settings.solve_ahead):
                        chunk = same[0]
                        self.stats.solved_ahead += not chunk.waiters
                        self._start(chunk)
                        break
                    self.cond.wait()
            self._run(chunk)

    def _ensure_solvers(self, device: str) -> None:
        """Under the lock: ``device``'s solver threads, started once."""
        if device in self.solvers:
            return
        self.solvers[device] = [
            threading.Thread(target=self._solver, args=(device,), name=f"defuser-quant-solve-{device}-{i}", daemon=True)
            for i in range(self.settings.parallel)
        ]
        for thread in self.solvers[device]:
            thread.start()

    def close(self) -> None:
        """Stop the solver threads (each finishes the chunk it is solving); chunks nobody started
        are given up, so no worker waits for them."""
        with self.cond:
            self.closed = True
            for device in {c.device for c in self.open}:
                self._fail_open(device, RuntimeError("GPTQModel's quantization ended before this chunk was solved"))
            self.cond.notify_all()
        for threads in self.solvers.values():
            for thread in threads:
                thread.join()

    def _open_chunks(self, group: list[Any]) -> dict[int, _Chunk]:
        """Under the lock: ``group``'s chunks, open for a solver (or a waiting worker) to solve;
        returns each task's chunk by ``id``."""
        size = max(1, self.settings.chunk_bytes // self.settings.parallel)
        device = _settings_key(group[0])[2]  # a group shares one settings key, so one device
        chunk_of: dict[int, _Chunk] = {}
        for units in _chunks(_units_for_chunking(group), size):
            chunk = _Chunk([t for u in units for t in u.tasks], device=device)
            self.open.append(chunk)
            for member in chunk.tasks:
                chunk_of[id(member)] = chunk
        self.chunk_of.update(chunk_of)
        self.stats.groups += 1
        if self.settings.solve_ahead:
            self._ensure_solvers(device)
            if device in self.broken:
                self._fail_open(device, self.broken[device])
            self.cond.notify_all()
        return chunk_of

    def _group_for(self, task: Any, tasks: dict, subset: dict | None) -> list[Any] | None:
        """Under the lock: the not yet handled tasks of ``subset`` batched with ``task`` (or None)."""
        names = list(subset) if subset else [getattr(task, "name", None)]
        members = [tasks[n] for n in names if n in tasks and tasks[n] is not None and id(tasks[n]) not in self.seen]
        if task not in members:
            members.append(task)
        candidates: dict[tuple, list[Any]] = {}
        for member in members:
            reason = why_not_batched(member)
            if reason is not None:
                self.seen[id(member)] = member
                self.stats.per_module[reason] += 1
                continue
            candidates.setdefault(_settings_key(member), []).append(member)
        for group in candidates.values():
            if len(group) < self.settings.min_modules:
                for member in group:
                    self.seen[id(member)] = member
                    self.stats.per_module["no equal-shape sibling in the subset"] += 1
        group = next((g for g in candidates.values() if task in g and len(g) >= self.settings.min_modules), None)
        if group is not None:
            for member in group:
                self.seen[id(member)] = member
        return group

    def _stream(self, device: torch.device) -> torch.cuda.Stream:
        """This worker's own stream on ``device`` (kept for the run), at ``settings.solve_priority``."""
        streams = self.streams.__dict__.setdefault("by_device", {})
        if device not in streams:
            streams[device] = torch.cuda.Stream(device, priority=SOLVE_PRIORITIES[self.settings.solve_priority])
        return streams[device]

    def _solve(self, chunk: _Chunk) -> None:
        tasks = chunk.tasks
        t0 = time.perf_counter()
        try:
            with kernels.stage("solve"):
                # GPTQModel's Hessian finalization (and the release of its sources, which waits on
                # their events) on the worker's current stream, as GPTQModel does it; the solve then
                # runs on the worker's private stream ordered after that one ("own"), or on the
                # current stream itself ("caller").
                for task in tasks:
                    task.finalize_hessian(target_device=getattr(task.module, "target_device", None))
                    task._release_deferred_hessian_sources()
                device = tasks[0].H.device
                streams = solve_streams(self.settings.streams)
                ahead_on = self.settings.inverses_ahead and (device.type != "cuda" or streams == "own")
                # inverse_threads only acts on CUDA: the CPU inverts one Hessian after another
                solve = functools.partial(batched_gptq_solve, tasks, inverse_threads=self.settings.inverse_threads,
                                          host_results=self.settings.host_results,
                                          pack=self.settings.pack, streams=streams, ahead=self._ahead_of(chunk),
                                          rows_kernel=self.settings.rows_kernel,
                                          inverse_graphs=self.settings.inverse_graphs,
                                          loop_graphs=self.settings.loop_graphs and streams == "own",
                                          inplace_update=self.settings.inplace_update,
                                          inverses_started=functools.partial(self._start_next_inverses, chunk)
                                          if ahead_on else None)
                priority = None
                if device.type == "cuda":
                    stream = torch.cuda.current_stream(device)
                    if streams == "own":
                        stream = self._stream(device)
                        stream.wait_stream(torch.cuda.current_stream(device))
                        priority = stream.priority
                    with torch.cuda.stream(stream):
                        outcome = solve()
                    stream.synchronize()  # results complete before another worker's stream reads them
                else:
                    outcome = solve()
        except torch.OutOfMemoryError:
            logger.warning(
                "batched GPTQ solve of %d modules ran out of memory; GPTQModel solves them one by one", len(tasks)
            )
            with self.cond:
                self.stats.per_module["chunk ran out of memory"] += len(tasks)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            return
        rows = log_rows.ChunkRows(expected=sum(result is not None for result in outcome))
        with self.cond:
            self.stats.chunks += 1
            self.stats.seconds += time.perf_counter() - t0
            self.stats.block_updates["inplace_addmm" if self.settings.inplace_update else "matmul_sub"] += 1
            if device.type == "cuda":
                self.stats.streams[streams] += 1
                if priority is not None:
                    self.stats.solve_stream_priorities[priority] += 1
            for task, result in zip(tasks, outcome, strict=True):
                if result is None:
                    self.stats.per_module["first Cholesky failed or NaN loss (GPTQModel's recovery)"] += 1
                    continue
                result.rows = rows
                self.results[id(task)] = (task, result, chunk)
                chunk.untaken += 1
                self.stats.batched_modules += 1
                self.stats.host_results += self.settings.host_results
                self.stats.paths[f"{result.path}"] += 1

    @staticmethod
    def _ahead_of(chunk: _Chunk) -> InversesAhead | None:
        """``chunk``'s inverses started ahead (waiting until they are), or None."""
        if chunk.ahead_started is None:
            return None
        chunk.ahead_started.wait()
        return chunk.ahead

    def _start_next_inverses(self, solving: _Chunk) -> None:
        """Start the inverses of the device's next open chunk (called while ``solving``'s own are
        under way); on failure that chunk computes them itself when solved."""
        with self.cond:
            chunk = next((c for c in self.open if c.device == solving.device and c.ahead_started is None), None)
            if chunk is None:
                return
            chunk.ahead_started = threading.Event()
        try:
            chunk.ahead = start_inverses(chunk.tasks, self.settings.inverse_threads,
                                         solve_streams(self.settings.streams), background=True,
                                         graphs=self.settings.inverse_graphs)
            with self.cond:
                self.stats.inverses_ahead += 1
        except Exception as exc:  # out of memory, say: its own solve tries again, as without this
            logger.debug("could not start the next chunk's inverses ahead (%s); its solve computes them", exc)
        finally:
            chunk.ahead_started.set()

    def take(self, task: Any, blocksize: int) -> SolveResult | None:
        with self.cond:
            entry = self.results.get(id(task))
            if entry is None or entry[0] is not task or entry[1].blocksize != blocksize:
                return None
            del self.results[id(task)]
            _, result, chunk = entry
            chunk.untaken -= 1
            if not chunk.untaken and chunk.done:  # (not done yet: _run's end counts it)
                self.held[chunk.device] -= 1  # its results all asked for: a held-back solver may go on
                self.cond.notify_all()
        if result.device == "cuda":
            # Made on another worker's stream: keep the allocator from handing their memory to
            # that stream while this worker's stream may still read them.
            for value in result.values:
                if isinstance(value, torch.Tensor) and value.is_cuda:
                    value.record_stream(torch.cuda.current_stream(value.device))
        return result


@dataclass(eq=False)
class _Chunk:
    """Tasks solved in one ``batched_gptq_solve`` call; ``done`` once solved (or given up)."""

    tasks: list[Any]
    device: str  # where its tasks are solved (a group's settings key: one device)
    done: bool = False
    error: BaseException | None = None  # what its solve raised on a solver thread
    waiters: int = 0  # workers waiting for it
    untaken: int = 0  # its results GPTQModel has not asked for yet
    ahead: InversesAhead | None = None  # its inverses, started while the chunk before it was solved
    ahead_started: threading.Event | None = None  # set once ``ahead`` is there (or failed to start)


def _units_for_chunking(group: list[Any]) -> list[_Unit]:
    """Units before Hessians are final: shared-cache members next to each other (verified later)."""
    units: list[_Unit] = []
    by_cache: dict[int, _Unit] = {}
    for task in group:
        cache = getattr(task, "_shared_hessian_cache", None)
        if cache is not None:
            unit = by_cache.get(id(cache))
            if unit is not None:
                unit.tasks.append(task)
                continue
            by_cache[id(cache)] = unit = _Unit([task])
            units.append(unit)
        else:
            units.append(_Unit([task]))
    return units


@contextmanager
def batched_solves(settings: BatchedSolve | None = None) -> Iterator[BatchedSolveStats]:
    """Inside the block, GPTQModel's GPTQ processor solves equal-shape modules together.

    Patches ``GPTQProcessor.process`` (groups a subset's tasks before GPTQModel's own processing)
    and ``GPTQ.quantize`` (returns a batched result where there is one), restored after.
    """
    from gptqmodel.looper.gptq_processor import GPTQProcessor
    from gptqmodel.quantization.gptq import GPTQ

    settings = settings or BatchedSolve()
    if settings.rows_kernel and torch.cuda.is_available():
        rows_block.load_ahead()  # a cached build loads beside the input capture, not on the run's start
    coordinator = _Coordinator(settings)
    process, quantize = GPTQProcessor.process, GPTQ.quantize

    def batched_process(self, module, *args, **kwargs):
        subset = kwargs.get("subset", args[1] if len(args) > 1 else None)
        log_rows.mark_batched(None)
        try:
            if type(self) is GPTQProcessor:
                coordinator.prepare(self, module, subset)
            return process(self, module, *args, **kwargs)
        finally:  # a mark process() did not use (it raised before its log row) never reaches another row
            log_rows.mark_batched(None)

    def batched_quantize(self, blocksize=BLOCKSIZE):
        result = coordinator.take(self, blocksize)
        if result is None:
            return quantize(self, blocksize=blocksize)
        kernels.note_solve(result.path.split("@")[0], result.device)
        log_rows.mark_batched(result.rows)
        if result.packed is not None:
            packing.offer_pack_words(self.module, result.packed)
        elif settings.pack_ahead and packing.packable(self.qcfg.bits, self.rows, self.columns):
            packing.pack_ahead(self.module, *result.values[:4], bits=int(self.qcfg.bits))
        self.H = None  # as GPTQModel's solve leaves it: the Hessian is consumed
        return result.values

    with contextlib.ExitStack() as stack:
        if settings.pack or settings.pack_ahead:
            coordinator.stats.pack = stack.enter_context(packing.served_pack_words())
        if settings.log_rows == "chunk":
            coordinator.stats.log_rows = stack.enter_context(log_rows.chunk_log_rows())
        if settings.inverse_graphs or settings.loop_graphs:
            stack.enter_context(inverse_graphs.guarded_empty_cache())
        GPTQProcessor.process, GPTQ.quantize = batched_process, batched_quantize
        try:
            yield coordinator.stats
        finally:
            GPTQProcessor.process, GPTQ.quantize = process, quantize
            coordinator.close()
            if settings.inverse_graphs:
                coordinator.stats.inverse_graphs = inverse_graphs.stats().as_dict()
                inverse_graphs.release()
            if settings.loop_graphs:
                coordinator.stats.loop_graphs = loop_graph.stats().as_dict()
                loop_graph.release()
            leftover = len(coordinator.results)
            coordinator.results.clear()
            if leftover:
                logger.debug("%d batched GPTQ result(s) were never asked for", leftover)
