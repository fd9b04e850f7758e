"""Wall-clock stack sampler for threaded runs: ``DQ_SAMPLE_DIR=dir`` writes ``dir/<name>.sampled.txt``.

cProfile sees only the thread that enabled it and charges waits to whoever holds the lock, so it
cannot say what bounds a run whose work is spread over threads (GPTQModel's finalize pool,
llm-compressor's writer threads). This samples every thread's Python stack every ``interval``
seconds (``sys._current_frames``) and reports, per thread name, the functions on the stack in the
most samples (inclusive: a function counts once per sample it is anywhere on the stack) and the
innermost frames (self). The main thread's table is the run's critical path: a sample spent in
``wait``/``acquire`` there is time the main thread waited on a worker. The raw collapsed stacks
(``flamegraph.pl`` input, one line per distinct stack) go to ``<name>.stacks.txt``.

A run may set :attr:`StackSampler.since` (a ``time.perf_counter()``) before the block ends: the
samples from then on are also reported alone, in ``<name>.tail.sampled.txt`` (``gptqmodel_gpu.py``
sets it to the end of the last GPTQ solve, so that file is what ``quantize()`` did after it).
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ENV = "DQ_SAMPLE_DIR"


def _label(frame) -> str:
    code = frame.f_code
    return f"{Path(code.co_filename).name}:{code.co_name}"


class StackSampler:
    """Samples all threads' stacks on a daemon thread until :meth:`stop`."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.samples: collections.Counter[tuple[str, tuple[str, ...]]] = collections.Counter()
        self.ticks = 0
        self.tick_times: list[float] = []  # time.perf_counter() of each tick
        self.by_tick: list[list[tuple[str, tuple[str, ...]]]] = []  # each tick's (thread, stack) samples
        self._keys: dict[tuple[str, tuple[str, ...]], tuple[str, tuple[str, ...]]] = {}  # one object per distinct sample
        self.since: float | None = None  # set by the run: also report the samples from then on
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="DQStackSampler", daemon=True)

    def start(self) -> StackSampler:
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.stopped = time.perf_counter()
        self.wall = self.stopped - self.started

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval):
            names = {t.ident: t.name for t in threading.enumerate()}
            self.ticks += 1
            self.tick_times.append(time.perf_counter())
            tick = []
            for ident, frame in sys._current_frames().items():
                if ident == me:
                    continue
                stack = []
                while frame is not None:
                    stack.append(_label(frame))
                    frame = frame.f_back
                key = (names.get(ident, str(ident)), tuple(reversed(stack)))
                key = self._keys.setdefault(key, key)  # the ticks share it: a long run keeps references, not copies
                self.samples[key] += 1
                tick.append(key)
            self.by_tick.append(tick)

    def tail(self) -> collections.Counter[tuple[str, tuple[str, ...]]]:
        """The samples of the ticks at or after :attr:`since` (all of them while it is None)."""
        if self.since is None:
            return self.samples
        counts: collections.Counter[tuple[str, tuple[str, ...]]] = collections.Counter()
        for at, tick in zip(self.tick_times, self.by_tick):
            if at >= self.since:
                counts.update(tick)
        return counts

    def report(self, top: int = 40, tail: bool = False) -> str:
        """Per thread name: samples, then the top inclusive and self functions (``tail``: only
        the samples from :attr:`since` on)."""
        samples, wall, ticks = self.samples, self.wall, self.ticks
        if tail and self.since is not None:
            samples = self.tail()
            wall = max(0.0, self.stopped - max(self.since, self.started))
            ticks = sum(at >= self.since for at in self.tick_times)
        per_thread: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self_time: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        totals: collections.Counter[str] = collections.Counter()
        for (thread, stack), count in samples.items():
            totals[thread] += count
            for label in set(stack):
                per_thread[thread][label] += count
            if stack:
                self_time[thread][stack[-1]] += count
        # A tick waits for the GIL, so ticks come later than asked: a sample stands for wall / ticks.
        period = wall / max(ticks, 1)
        lines = [
            f"# wall {wall:.2f} s, {ticks} ticks (asked every {self.interval * 1e3:.0f} ms, "
            f"got {period * 1e3:.1f} ms); seconds = samples x {period * 1e3:.1f} ms"
            + (" (the tail: from the mark the run set on)" if tail and self.since is not None else "")
        ]
        for thread, count in totals.most_common():
            lines.append(f"\n## thread {thread}: {count} samples ({count * period:.2f} s)")
            lines.append("### inclusive")
            lines += [f"{n * period:8.2f} s  {label}" for label, n in per_thread[thread].most_common(top)]
            lines.append("### self")
            lines += [f"{n * period:8.2f} s  {label}" for label, n in self_time[thread].most_common(top // 2)]
        return "\n".join(lines) + "\n"

    def collapsed(self) -> str:
        return "".join(f"{thread};{';'.join(stack)} {n}\n" for (thread, stack), n in self.samples.most_common())


@contextlib.contextmanager
def maybe_sample(name: str, interval: float = 0.005) -> Iterator[StackSampler | None]:
    """Sample the block's threads when ``$DQ_SAMPLE_DIR`` is set (yields the sampler, else None);
    write the report even if it raises."""
    folder = os.environ.get(ENV)
    if not folder:
        yield None
        return
    sampler = StackSampler(interval).start()
    try:
        yield sampler
    finally:
        sampler.stop()
        path = Path(folder) / f"{name}.sampled.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(sampler.report())
        path.with_name(f"{name}.stacks.txt").write_text(sampler.collapsed())
        if sampler.since is not None:
            path.with_name(f"{name}.tail.sampled.txt").write_text(sampler.report(tail=True))
