"""Peak-RSS measurement shared by the benchmarks: a sampling thread plus the kernel's ru_maxrss."""

from __future__ import annotations

import resource
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil


class PeakRSS:
    """Context manager measuring wall time and peak extra resident memory of the enclosed code."""

    def __init__(self, interval_s: float = 0.0005):
        self.interval_s = interval_s
        self.process = psutil.Process()

    def __enter__(self) -> PeakRSS:
        self.baseline = self.process.memory_info().rss
        self.maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc: Any) -> None:
        self.seconds = time.perf_counter() - self.t0
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)
        maxrss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        # ru_maxrss only grows when the process exceeds its previous record; count it when it did.
        kernel_peak = maxrss_after if maxrss_after > self.maxrss_before else 0
        self.extra_bytes = max(self.peak, kernel_peak) - self.baseline


def measure(fn: Callable[[], Any]) -> tuple[Any, PeakRSS]:
    with PeakRSS() as m:
        result = fn()
    return result, m
