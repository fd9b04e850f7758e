"""Opt-in cProfile of a benchmark's timed region: ``DQ_PROFILE_DIR=dir`` writes ``dir/<name>.txt``
(and the raw ``dir/<name>.prof`` for ``pstats``); ``DQ_TORCH_PROFILE_DIR`` and ``DQ_SAMPLE_DIR``
select torch.profiler and the all-threads stack sampler instead; ``DQ_GIL_DIR`` the lock holder's sampler (py-spy).

The text holds the top functions by own time and by cumulative time (host Python only; CUDA
kernels show up as the host calls that launch or wait for them). Unset, it costs nothing.

Before Python 3.12 cProfile sees only the thread it runs on, so with ``DQ_PROFILE_DIR`` every GPTQModel module finalize
(``GPTQProcessor.submodule_finalize``, run on its CPU workers) is profiled too, on its own worker
thread, and the calls are merged into ``<name>.finalize.txt``/``.prof``: what a finalize spends its
time on (the wall time of calls that wait for the interpreter lock is charged to where they waited). From
Python 3.12 one profiler records every thread (:data:`PER_THREAD`), and the summary says so.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import os
import pstats
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV = "DQ_PROFILE_DIR"


#: Before Python 3.12 each cProfile profiler sees only the thread that enabled it, so the finalize workers get
#: their own; from 3.12 cProfile runs on ``sys.monitoring``, one profiler per process ("Another profiling tool is
#: already active" for a second), and the one enabled on the main thread records every thread's calls.
PER_THREAD = sys.version_info < (3, 12)
ALL_THREADS_NOTE = ("# Python >= 3.12: one cProfile profiler per process (sys.monitoring); it recorded every thread's "
                    "calls, the finalize workers' included (no separate .finalize.txt)\n")

TORCH_ENV = "DQ_TORCH_PROFILE_DIR"
SAMPLE_ENV = "DQ_SAMPLE_DIR"
GIL_ENV = "DQ_GIL_DIR"


@contextlib.contextmanager
def maybe_profile(name: str, top: int = 60) -> Iterator[Any]:
    """Profile the block when ``$DQ_PROFILE_DIR`` is set; write the summary even if the block raises.

    ``$DQ_TORCH_PROFILE_DIR`` instead runs ``torch.profiler`` (CPU and CUDA activity) and writes
    ``<name>.torch.txt``: the ops by device time, and the device-busy seconds (sum of kernel
    times) against the wall seconds, which says whether the GPU or the host bounds the block.
    ``$DQ_SAMPLE_DIR`` instead samples every thread's stack (``_sampler.py``): what the main thread
    waits on when the work is spread over threads; the block gets the sampler (its ``since`` marks
    a tail to report alone), with the others None. ``$DQ_GIL_DIR`` (first of all) samples only the thread holding
    the interpreter lock, with py-spy (``_gil_sampler.py``); the block gets its :class:`~_gil_sampler.GilSample`."""
    if os.environ.get(GIL_ENV):
        from _gil_sampler import maybe_gil_sample

        with maybe_gil_sample(name) as sample:
            yield sample
        return
    if os.environ.get(SAMPLE_ENV):
        from _sampler import maybe_sample

        with maybe_sample(name) as sampler:
            yield sampler
        return
    if os.environ.get(TORCH_ENV):
        with _torch_profile(Path(os.environ[TORCH_ENV]) / f"{name}.torch.txt", top):
            yield
        return
    folder = os.environ.get(ENV)
    if not folder:
        yield
        return
    profiler = cProfile.Profile()
    with _finalize_profiles() if PER_THREAD else contextlib.nullcontext([]) as finalizes:
        profiler.enable()
        try:
            yield
        finally:
            profiler.disable()
            _write(Path(folder) / f"{name}.txt", [profiler], top, head="" if PER_THREAD else ALL_THREADS_NOTE)
            if finalizes:
                _write(Path(folder) / f"{name}.finalize.txt", finalizes, top,
                       head=f"# {len(finalizes)} finalize worker threads, their submodule_finalize calls merged\n")


def _write(path: Path, profilers: list[cProfile.Profile], top: int, head: str = "") -> None:
    text = io.StringIO()
    text.write(head)
    stats = pstats.Stats(*profilers, stream=text)
    for key in ("tottime", "cumulative"):
        stats.sort_stats(key).print_stats(top)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.getvalue())
    stats.dump_stats(path.with_suffix(".prof"))  # for pstats' callers/callees


@contextlib.contextmanager
def _finalize_profiles() -> Iterator[list[cProfile.Profile]]:
    """Inside the block, each ``GPTQProcessor.submodule_finalize`` call runs under its thread's own profiler;
    yields the list of those profilers (one per thread that finalized), complete once the block ends."""
    import threading

    try:
        from gptqmodel.looper.gptq_processor import GPTQProcessor
    except ImportError:
        yield []
        return
    from defuser_quant.integrations.gptqmodel.compat import patched

    original = GPTQProcessor.submodule_finalize
    local, profilers, lock = threading.local(), [], threading.Lock()

    def submodule_finalize(self, *args, **kwargs):
        prof = getattr(local, "profiler", None)
        if prof is None:
            prof = local.profiler = cProfile.Profile()
            with lock:
                profilers.append(prof)
        prof.enable()
        try:
            return original(self, *args, **kwargs)
        finally:
            prof.disable()

    with patched(GPTQProcessor, "submodule_finalize", submodule_finalize):
        yield profilers


@contextlib.contextmanager
def _torch_profile(path: Path, top: int) -> Iterator[None]:
    import time

    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        try:
            yield
        finally:
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    wall = time.perf_counter() - start
    events = prof.key_averages()
    busy = sum(e.self_device_time_total for e in events) / 1e6
    kernels = sum(e.count for e in events if e.self_device_time_total > 0)
    head = f"# wall {wall:.2f} s, device busy {busy:.2f} s (sum of self device times, {kernels} device ops)\n"
    for e in events:  # ranges the stage clock opens (record_function "stage:<name>")
        if e.key.startswith("stage:"):
            head += f"# {e.key}: {e.count} calls, host {e.cpu_time_total / 1e6:.2f} s, device {e.device_time_total / 1e6:.2f} s\n"
    try:
        head += "".join(f"# {line}\n" for line in gpu_busy_lines(prof.events()))
    except Exception as exc:  # a summary only: the table still gets written
        head += f"# GPU busy time not computed ({type(exc).__name__}: {exc})\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + events.table(sort_by="self_device_time_total", row_limit=top))


#: Device-side profiler events of the driver loading kernels: not work on the GPU.
DRIVER_LOADS = ("Lazy Function Loading", "Runtime Triggered Module Loading")
#: The stage clock's ranges (``record_function("stage:<name>")``), on the host and mirrored on the device.
STAGE = "stage:"


def gpu_busy_lines(events: Any) -> list[str]:
    """From a torch profile's events: the time the GPU ran kernels or copies (their intervals' union), the
    driver's lazy kernel loads, and per ``stage:<name>`` range (``_llmc_stages.py``'s) how much of its host
    time the GPU was busy, which says whether the stage waits on the host or on the GPU."""
    from _timeline import covered_seconds, merge_spans

    work, loads, stages = [], [], []
    for e in events:
        start, end = e.time_range.start / 1e6, e.time_range.end / 1e6
        device = str(getattr(e, "device_type", "")).rsplit(".", 1)[-1]
        if e.name.startswith(DRIVER_LOADS):  # by name, whatever device: after the device check round 46c found none of 183
            loads.append(end - start)
        elif device == "CPU":
            if e.name.startswith(STAGE):
                stages.append((e.name, start, end))
        elif not e.name.startswith(STAGE):
            work.append((start, end))
    merged = merge_spans(work)
    lines = [f"GPU busy {sum(b - a for a, b in merged):.2f} s (union of {len(work)} kernels and copies); "
             f"lazy kernel loads {len(loads)}, {sum(loads):.2f} s"]
    totals: dict[str, list[float]] = {}
    for name, start, end in stages:
        total = totals.setdefault(name, [0.0, 0.0])
        total[0] += end - start
        total[1] += covered_seconds(merged, start, end)
    for name, (host, busy) in totals.items():
        lines.append(f"{name}: host {host:.2f} s, GPU busy {busy:.2f} s ({100 * busy / host if host else 0:.0f}%)")
    return lines
