"""The ``tail_workers`` part of :func:`~.overhead.lean_bookkeeping` (opt-in, not in ``DEFAULT_PARTS``): the last
decoder layer's finalizes (GPTQModel's per-module pack and offload) run on as many CPU workers as the process has
cores (at most :data:`MAX_WORKERS`), instead of GPTQModel's ``min(12, (cores + 1) // 2)``.

The last layer's finalizes are the tail of a run: GPTQModel submits all of them after the layer's last subset and
``quantize()`` returns when they are done. On an H200 host (16 cores, GPTQModel's 8 CPU workers) the last layer's
388 finalizes took 1.0 s, most of the run's last 1.3 s, median 13-14 ms a module of packing
(``gptqmodel_cuda_2layers_round40a_h200x1.json``), and GPTQModel's CPU pack went from 2.08 ms a module with 8
callers to 1.22 ms with 16 on that host (``pack_scaling_h200host_round40.json``). More workers for the whole run
contend for the interpreter lock during the layers (rounds 25-30's ``GPTQMODEL_CPU_WORKERS=14``); here they are
added only when the last layer starts (its ``pre_quantize``), and take part only in its finalizes: GPTQModel's pool
hands each task to a worker round robin when it is submitted, so the earlier layers' finalizes, already queued, stay
where they are. Each added worker gets one empty task at once, so GPTQModel's per-thread warm-up runs during the
layer's subsets, not in the finalize burst.

Measured on an H100 host (round 42, ``gptqmodel_cuda_2layers_round42a_h100x1.json``): the last layer's finalizes
took 0.83-0.93 s on 16 workers against 0.86-1.10 s on 8, each pack slower with 16 callers, and whole runs stayed
within their spread, so the part stays opt-in.

At the end of the block (also on an exception or Ctrl-C) the added workers leave the pool's group first (nothing
new reaches them), then finish what they were handed and stop. Every finalize is computed as before, by the same
function, on another thread: the checkpoint is the same.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from torch import nn

from .layer_ahead import decoder_layers, layers_lookup_refusal
from .worker_warmup import _nothing, _pool
from .worker_warmup import internals_refusal as pool_refusal

__all__ = ["MAX_WORKERS", "TailWorkerStats", "cores", "internals_refusal", "tail_workers", "threads_beside"]

logger = logging.getLogger(__name__)

KEY = "cpu"  # the pool group GPTQModel submits finalizes to (stage_layer: ``target_dev = CPU``)
#: At most this many CPU workers for the last layer: GPTQModel's pack was measured to scale up to 16 callers
#: (``pack_scaling_h200host_round40.json``), not beyond.
MAX_WORKERS = 16


@dataclass
class TailWorkerStats:
    """What :func:`tail_workers` did."""

    before: int = 0  # CPU workers when the last layer started
    added: int = 0  # workers added for its finalizes
    retired: int = 0  # added workers stopped at the end
    layer: int | None = None  # the layer they were added at

    def as_dict(self) -> dict[str, Any]:
        return {"before": self.before, "added": self.added, "retired": self.retired, "layer": self.layer}


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def threads_beside(most: int, spare: int) -> int:
    """Threads for a pool that runs beside other work: the :func:`cores` this process may run on but ``spare``, at
    most ``most``, at least one."""
    return max(1, min(most, cores() - spare))


def internals_refusal() -> str | None:
    """Why GPTQModel's device pool or layer loop does not look like what this relies on (None: it does).
    Reads classes only: no pool is built to answer."""
    from gptqmodel.utils import threadx

    from .recopy import pre_quantize_refusal

    why = pool_refusal() or pre_quantize_refusal()
    if why is not None:
        return why
    pool_cls, worker_cls = threadx.DeviceThreadPool, getattr(threadx, "_DeviceWorker", None)
    missing = [name for name in ("_spawn_worker", "_mark_scheduled") if not callable(getattr(pool_cls, name, None))]
    if worker_cls is None or not all(callable(getattr(worker_cls, name, None)) for name in ("submit", "stop", "join")):
        missing.append("_DeviceWorker.submit/stop/join")
    if missing:
        return f"expected threadx.DeviceThreadPool with {', '.join(missing)}"
    if "_q" not in getattr(worker_cls.__init__, "__code__", None).co_names:
        return "expected threadx._DeviceWorker to keep its tasks in a queue (_q)"
    return layers_lookup_refusal()


class _Tail:
    def __init__(self, gptq_model: Any, holds_experts: Callable[[nn.Module], bool], target: int,
                 stats: TailWorkerStats) -> None:
        self.gptq_model, self.holds_experts, self.target, self.stats = gptq_model, holds_experts, target, stats
        self.added: list[Any] = []
        self._last: nn.Module | None = None
        self._layer: int | None = None

    def _last_layer(self) -> nn.Module | None:
        if self._last is None:
            layers, _ = decoder_layers(self.gptq_model)
            if layers:
                self._last, self._layer = layers[-1], len(layers) - 1
        return self._last

    def patch_pre_quantize(self, original: Callable) -> Callable:
        tail = self

        def pre_quantize(self, module):
            out = original(self, module)
            if not tail.added and tail.stats.layer is None and module is tail._last_layer() and tail.holds_experts(module):
                tail.grow()
            return out

        return pre_quantize

    def grow(self) -> None:
        pool = _pool()
        with pool._dispatch_lock:
            group = pool._worker_groups.get(KEY)
            self.stats.layer = self._layer
            self.stats.before = len(group or ())
            if not group or len(group) >= self.target:
                return
            device = pool._devices_by_key[KEY]
            for index in range(len(group), self.target):
                worker = pool._spawn_worker(device, KEY, name=f"DPWorker-{KEY}#{index}")
                group.append(worker)
                self.added.append(worker)
            pool._dispatch_rr[KEY] %= len(group)
        for worker in self.added:  # GPTQModel's warm-up of the thread, now, not before its first finalize
            pool._mark_scheduled(KEY)
            worker.submit(_nothing)
        self.stats.added = len(self.added)
        logger.debug("tail_workers: %d CPU workers added for layer %s's finalizes (%d before)",
                     self.stats.added, self._layer, self.stats.before)

    def retire(self) -> None:
        if not self.added:
            return
        pool = _pool()
        with pool._dispatch_lock:  # first: nothing new is handed to them
            group = pool._worker_groups.get(KEY, [])
            for worker in self.added:
                if worker in group:
                    group.remove(worker)
            if group:
                pool._dispatch_rr[KEY] %= len(group)
        for worker in self.added:
            worker._q.join()  # what they were handed runs, as on GPTQModel's own workers
            worker.stop()
            worker.join()
            self.stats.retired += 1
        self.added.clear()


@contextmanager
def tail_workers(gptq_model: Any, holds_experts: Callable[[nn.Module], bool],
                 target: int | None = None) -> Iterator[TailWorkerStats]:
    """Inside the block, when ``BaseQModel.pre_quantize`` gets the model's last decoder layer (and it holds
    experts, ``holds_experts``), GPTQModel's CPU worker group grows to ``target`` workers (default: the
    process's cores, :func:`cores`, at most :data:`MAX_WORKERS`); the added workers are stopped on exit. See the
    module docstring."""
    from gptqmodel.models.base import BaseQModel

    from .compat import patched

    stats = TailWorkerStats()
    tail = _Tail(gptq_model, holds_experts, target if target is not None else min(cores(), MAX_WORKERS), stats)
    try:
        with patched(BaseQModel, "pre_quantize", tail.patch_pre_quantize(BaseQModel.pre_quantize)):
            yield stats
    finally:
        tail.retire()
