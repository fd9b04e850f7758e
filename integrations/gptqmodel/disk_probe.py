"""The ``disk_probe`` part of :func:`~.overhead.lean_bookkeeping`: GPTQModel's disk write-speed probe runs
beside the quantization instead of in front of it.

GPTQModel 7.6's ``ModuleLooper.__init__`` calls ``module_looper.io_write_performance()``, which (once per
process) writes 100 MB to a temporary file, fsyncs it and times the write, only to log the throughput (an
error under 100 MB/s, a warning under 200 MB/s). On an H200 host that is 0.15-0.2 s before the first layer
of every run, stock's too (``ModuleLooper.__init__`` in the timelines of rounds 33-36, docs/performance.md; stock's
in ``gptqmodel_cuda_2layers_round36a_h200x1.json``: 0.18-0.21 s).

Inside :func:`probe_behind` GPTQModel's own probe runs on a background thread started when the block is
entered, and the looper's call returns the figure if the probe has already finished (or an earlier run of
this process measured it), else ``None``, for which GPTQModel logs nothing. When the probe finishes, the thread
logs the throughput through this module's logger (a warning below 200 MB/s). The block's end waits for the
thread (also on an exception or Ctrl-C), so its temporary file is never left behind. Nothing the run computes
or writes changes; only when the disk figure is logged.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from .compat import code_names, parameter_names, patched

__all__ = ["DiskProbeStats", "internals_refusal", "probe_behind", "SLOW_MB_S"]

logger = logging.getLogger(__name__)

#: Below this write throughput (MB/s) the probe's result is logged as a warning (GPTQModel warns below it too).
SLOW_MB_S = 200.0


@dataclass
class DiskProbeStats:
    """What :func:`probe_behind` did in one run."""

    behind: bool = False  # the probe ran on the background thread (False: measured already in this process)
    mb_per_s: float | None = None  # what it measured (None: it had not finished, or failed)
    seconds: float = 0.0  # how long the probe ran on its thread
    waited_seconds: float = 0.0  # how long the block's end waited for it
    failed: str | None = None  # the probe's exception, if it raised

    def as_dict(self) -> dict[str, Any]:
        return {"behind": self.behind, "mb_per_s": None if self.mb_per_s is None else round(self.mb_per_s, 1),
                "seconds": round(self.seconds, 3), "waited_seconds": round(self.waited_seconds, 3),
                "failed": self.failed}


def internals_refusal() -> str | None:
    """Why GPTQModel's probe does not look like what this relies on (None: it does)."""
    from gptqmodel.looper import module_looper

    probe = getattr(module_looper, "io_write_performance", None)
    looper = getattr(module_looper, "ModuleLooper", None)
    if probe is None or not callable(probe) or parameter_names(probe) or "_IO_WRITE_SPEED_MB" not in vars(module_looper):
        return "expected gptqmodel.looper.module_looper.io_write_performance() caching _IO_WRITE_SPEED_MB"
    if looper is None or "io_write_performance" not in code_names(looper.__init__):
        return "expected ModuleLooper.__init__ to call io_write_performance"
    return None


@contextmanager
def probe_behind(stats: DiskProbeStats | None = None) -> Iterator[DiskProbeStats]:
    """Inside the block, GPTQModel's disk probe runs on a background thread (see the module docstring)."""
    from gptqmodel.looper import module_looper

    stats = stats if stats is not None else DiskProbeStats()
    probe = module_looper.io_write_performance
    if module_looper._IO_WRITE_SPEED_MB is not None:  # measured earlier in this process: nothing left to move
        stats.mb_per_s = module_looper._IO_WRITE_SPEED_MB
        yield stats
        return

    def run() -> None:
        start = time.perf_counter()
        try:
            speed = probe()
        except Exception as exc:  # the run goes on without the figure, as it would with a failed probe
            stats.failed = f"{type(exc).__name__}: {exc}"
            logger.warning("GPTQModel's disk write-speed probe failed (%s); the quantization is not affected",
                           stats.failed)
            return
        finally:
            stats.seconds = time.perf_counter() - start
        stats.mb_per_s = speed
        if speed is not None:
            level = logging.WARNING if speed < SLOW_MB_S else logging.INFO
            logger.log(level, "disk write throughput %.1f MB/s (GPTQModel's probe, run beside the quantization)%s",
                       speed, "; the disk offload may slow the quantization" if speed < SLOW_MB_S else "")

    thread = threading.Thread(target=run, name="defuser-quant-disk-probe", daemon=True)
    stats.behind = True
    with patched(module_looper, "io_write_performance", lambda: module_looper._IO_WRITE_SPEED_MB):
        thread.start()
        try:
            yield stats
        finally:
            began = time.perf_counter()
            thread.join()  # its temporary file is removed when the probe returns
            stats.waited_seconds = time.perf_counter() - began
