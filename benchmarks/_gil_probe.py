"""How long a thread that leaves Python's interpreter lock waits to get it back, during a run.

GPTQModel runs a layer's work on many threads (its device workers, the finalize pool, stream
syncs, progress refresh); they share one interpreter lock. A thread that calls into C and lets the
lock go (a CUDA call, a copy, a sleep) must take it back afterwards, and when another thread runs
Python meanwhile, that can take up to ``sys.getswitchinterval()`` (5 ms by default). Profilers
charge that wait to whatever line the thread was on, so they cannot tell it from work.

The probe is a daemon thread that sleeps ``interval`` seconds in a loop and records how much later
than asked it runs again: the operating system's timer slack (tens of microseconds on an idle
machine) plus the wait for the lock. Its summary is an estimate of what every lock hand-back costs
in that run (``mean_ms``) and how often it is long (``over_1ms``, ``over_switch``).

    with GilProbe() as probe:
        run()
    row["gil_probe"] = probe.summary()
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Any


class GilProbe:
    """Samples the lock hand-back delay on a daemon thread between ``start()`` and ``stop()``."""

    def __init__(self, interval: float = 0.002, stall: float = 0.05) -> None:
        if interval <= 0:
            raise ValueError(f"GilProbe interval must be > 0 seconds, got {interval}")
        self.interval = interval
        self.stall = stall  # a delay at least this long is kept as a stall, with when it happened
        self.delays: list[float] = []
        self.stalls: list[tuple[float, float]] = []  # (asked to wake, woke), perf_counter seconds
        self.wall = 0.0
        self.switch_interval = sys.getswitchinterval()  # read again when stopped
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="DQGilProbe", daemon=True)

    def __enter__(self) -> GilProbe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> GilProbe:
        self._started = time.perf_counter()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.wall = time.perf_counter() - self._started
        self.switch_interval = sys.getswitchinterval()

    def _run(self) -> None:
        clock, sleep, interval, delays, stall = time.perf_counter, time.sleep, self.interval, self.delays, self.stall
        while not self._stop.is_set():
            t0 = clock()
            sleep(interval)
            woke = clock()
            delay = woke - t0 - interval
            delays.append(delay)
            if delay >= stall:
                self.stalls.append((t0 + interval, woke))

    def summary(self) -> dict[str, Any]:
        """Delays in milliseconds; ``waited_s``: the probe's summed delay (its share of the wall)."""
        delays = sorted(self.delays)
        n = len(delays)
        switch = self.switch_interval

        def pct(q: float) -> float | None:
            return round(delays[min(n - 1, int(q * n))] * 1e3, 3) if n else None

        return {
            "interval_ms": self.interval * 1e3,
            "switch_interval_ms": round(switch * 1e3, 3),
            "samples": n,
            "wall_s": round(self.wall, 3),
            "mean_ms": round(sum(delays) / n * 1e3, 3) if n else None,
            "p50_ms": pct(0.50),
            "p90_ms": pct(0.90),
            "p99_ms": pct(0.99),
            "max_ms": round(delays[-1] * 1e3, 3) if n else None,
            "over_1ms": round(sum(d > 1e-3 for d in delays) / n, 4) if n else None,
            "over_switch": round(sum(d > switch for d in delays) / n, 4) if n else None,
            "waited_s": round(sum(delays), 3),
            "stalls": len(self.stalls),  # delays of at least `stall_ms`: no thread let the lock go that long
            "stall_ms": self.stall * 1e3,
            "stalled_s": round(sum(b - a for a, b in self.stalls), 3),
        }
