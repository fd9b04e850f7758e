"""The ``worker_warmup`` part of :func:`~.overhead.lean_bookkeeping`: GPTQModel's worker threads warm
up while the calibration inputs are captured, instead of inside the first layer's first subset.

GPTQModel 7.6's device pool gives every worker a warm-up (``run_torch_linalg_warmup``: Cholesky, eigh,
SVD and QR in float32 and float64, once per device and once per worker thread, one at a time under a
global lock) that runs before the worker's first task. The CUDA workers' first task is the first
subset's ``process()``, so their warm-ups sit between the first calibration forward and the first
solve (0.25-0.4 s on an H200 host, docs/performance.md round 31), and the CPU workers' first task is
the first layer's first finalize. Here, when the quantization starts, each worker of the CUDA and CPU
groups is handed one empty task (GPTQModel's pool hands tasks out round robin, so one per worker), so
their warm-ups run while the main thread captures the inputs on the CPU. The warm-ups are GPTQModel's
own, run once each as before; nothing waits for them but the workers' own next tasks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

__all__ = ["FAMILIES", "WarmupStats", "internals_refusal", "warm_workers"]

logger = logging.getLogger(__name__)

#: Device families whose workers are warmed (the device workers that solve, the CPU workers that finalize).
FAMILIES = ("cuda", "cpu")


@dataclass
class WarmupStats:
    """What :func:`warm_workers` did."""

    workers: dict[str, int] = field(default_factory=dict)  # pool key -> workers handed an empty task

    def as_dict(self) -> dict:
        return {"workers": dict(self.workers)}


def _pool():
    import gptqmodel

    getter = getattr(gptqmodel, "get_device_thread_pool", None)
    return getter() if callable(getter) else None


def internals_refusal() -> str | None:
    """Why GPTQModel's device pool does not look like what this relies on (None: it does)."""
    pool = _pool()
    groups = getattr(pool, "_worker_groups", None)
    if pool is None or not isinstance(groups, dict) or not callable(getattr(pool, "submit", None)):
        return "expected gptqmodel.get_device_thread_pool() with _worker_groups and submit(device, fn)"
    if not callable(getattr(pool, "_pick_worker", None)) or not isinstance(getattr(pool, "_dispatch_rr", None), dict) \
            or not hasattr(pool, "_dispatch_lock"):
        return "expected the device pool's round-robin dispatch (_pick_worker, _dispatch_rr, _dispatch_lock)"
    return None


def _nothing() -> None:
    return None


def warm_workers(families: tuple[str, ...] = FAMILIES) -> WarmupStats:
    """Hand each worker of GPTQModel's pool groups of ``families`` one empty task (see the module doc)."""
    stats = WarmupStats()
    pool = _pool()
    with pool._dispatch_lock:  # a snapshot: the groups GPTQModel built for this process
        groups = {key: len(workers) for key, workers in pool._worker_groups.items()}
    for key, count in groups.items():
        if key.split(":", 1)[0] not in families:
            continue
        for _ in range(count):
            pool.submit(key, _nothing)
        stats.workers[key] = count
    logger.debug("warming GPTQModel's workers: %s", stats.workers)
    return stats
