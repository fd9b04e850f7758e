"""The ``worker_warmup`` part of :func:`~.overhead.lean_bookkeeping`: GPTQModel's worker threads warm
up while the calibration inputs are captured, instead of inside the first layer's first subset.

GPTQModel 7.6's device pool gives every worker a warm-up (``run_torch_linalg_warmup``: Cholesky, eigh,
SVD and QR in float32 and float64, once per device and once per worker thread, one at a time under a
global lock) that runs before the worker's first task. The CUDA workers' first task is the first
subset's ``process()``, so their warm-ups sit between the first calibration forward and the first
solve (0.25-0.4 s on an H200 host, docs/performance.md round 31), and the CPU workers' first task is
the first layer's first finalize. Here, when the quantization starts, each worker of the quantize
device's CUDA group and of the CPU group is handed one empty task (GPTQModel's pool hands tasks out
round robin, so one per worker), so their warm-ups run while the main thread captures the inputs on
the CPU. The warm-ups are GPTQModel's own, run once each as before; nothing waits for them but the
workers' own next tasks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["WarmupStats", "cuda_key", "hand_each_worker", "internals_refusal", "warm_workers"]

logger = logging.getLogger(__name__)


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
    """Why GPTQModel's device pool does not look like what this relies on (None: it does). Reads the
    pool's class only: no pool (and none of its threads) is built to answer."""
    import gptqmodel
    from gptqmodel.utils import threadx

    cls = getattr(threadx, "DeviceThreadPool", None)
    if not callable(getattr(gptqmodel, "get_device_thread_pool", None)) or cls is None \
            or not callable(getattr(cls, "submit", None)) or not callable(getattr(cls, "_pick_worker", None)):
        return "expected gptqmodel.get_device_thread_pool() building a threadx.DeviceThreadPool with submit and _pick_worker"
    stored = set(getattr(getattr(cls.__init__, "__code__", None), "co_names", ()))
    if not {"_worker_groups", "_dispatch_rr", "_dispatch_lock"} <= stored:
        return "expected the device pool's round-robin dispatch (_worker_groups, _dispatch_rr, _dispatch_lock)"
    return None


def cuda_key(device: object) -> str | None:
    """The pool key of the CUDA device a quantization runs on: the index ``device`` names (a
    ``torch.device``, ``"cuda:1"``, GPTQModel's ``DEVICE``), else the current CUDA device; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    text = str(getattr(device, "value", device) or "")
    if text.startswith("cuda:") and text[5:].isdigit():
        return text
    return f"cuda:{torch.cuda.current_device()}"


def _nothing() -> None:
    return None


def hand_each_worker(key: str, task: Callable[[], None]) -> int:
    """``task`` handed once to each worker of GPTQModel's pool group ``key`` (the pool deals tasks out round
    robin as they are submitted, so one each); returns how many (0 for a group the pool does not have)."""
    pool = _pool()
    with pool._dispatch_lock:  # a snapshot: the group GPTQModel built for this process
        count = len(pool._worker_groups.get(key, ()))
    for _ in range(count):
        pool.submit(key, task)
    return count


def warm_workers(cuda: str | None, families: tuple[str, ...] = ("cpu",)) -> WarmupStats:
    """Hand each worker of the pool group ``cuda`` (a key such as ``"cuda:0"``, or None) and of the
    groups of ``families`` one empty task (see the module doc). Other CUDA devices' workers warm up at
    their first task, as GPTQModel has them do: no CUDA context is made on a GPU the run may not use."""
    stats = WarmupStats()
    pool = _pool()
    with pool._dispatch_lock:  # the groups GPTQModel built for this process
        keys = list(pool._worker_groups)
    for key in keys:
        if key == cuda or key.split(":", 1)[0] in families:
            stats.workers[key] = hand_each_worker(key, _nothing)
    logger.debug("warming GPTQModel's workers: %s", stats.workers)
    return stats
