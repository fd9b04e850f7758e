"""Which Python held the interpreter lock during a benchmark's timed block: ``DQ_GIL_DIR=dir`` runs ``py-spy``
(``$DQ_PYSPY``, else ``py-spy`` on ``PATH``) attached to this process for the block, sampling only the thread that
holds the lock (``--gil``), and writes ``dir/<name>.gil.txt`` (py-spy's collapsed stacks, ``flamegraph.pl`` input)
and ``dir/<name>.gil.json`` (:func:`summarize`).

Rounds 53-57 read the middle of a GPTQModel quantize as bound by the one interpreter lock its main thread and finalize
workers take turns at (moving Python from one thread or time to another never shortened the run). The stack samplers
beside this one (``_sampler.py``, cProfile) charge a thread's wait for the lock to where it waited; this one counts
only the holder, so its seconds add up over threads to the time the lock was held, by thread and by function (round
58: 2.9 s of a 6.5 s quantize on an H100, so the run was not bound by it). Every sample stands for ``1 / rate``
seconds.

py-spy runs ``--nonblocking`` (the process is not paused to read it: a sample's stack may be torn, the totals are
what is wanted) and is attached from a child process, which Linux's Yama ``ptrace_scope=1`` allows only when this
process names it as its tracer (``prctl(PR_SET_PTRACER)``, done here). A py-spy that cannot start or attach is
reported (``error``) and the block runs unsampled. Unset, it costs nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from _report import write_json  # beside this module, on sys.path where it is imported

ENV = "DQ_GIL_DIR"
BINARY_ENV = "DQ_PYSPY"
RATE = 250  # samples per second
PR_SET_PTRACER = 0x59616D61
TOP = 40

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::\d+)?\)$")
_DIGITS = re.compile(r"\d+")


class GilSample:
    """One sampled block: :attr:`summary` once it has ended (``since`` is accepted and ignored, like the
    stack sampler's)."""

    def __init__(self) -> None:
        self.summary: dict[str, Any] | None = None
        self.since: float | None = None


def function_of(frame: str) -> str:
    """``"func (pkg/file.py:12)"`` -> ``"func (pkg/file.py)"``: a function, whatever line it was on."""
    m = _FRAME.match(frame)
    return f"{m['func']} ({m['file']})" if m else frame


def thread_group(label: str) -> str:
    """py-spy's thread label (``"thread (1234): DQFinalize-3"``) -> its name with the numbers made ``#``, so a pool's
    threads count together (``"DQFinalize-#"``)."""
    name = label.split(": ", 1)[1] if ": " in label else label
    return _DIGITS.sub("#", name).strip() or "?"


def parse(text: str) -> list[tuple[str, list[str], int]]:
    """py-spy's raw output -> (thread label, frames outermost first, samples) per line."""
    rows = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        rows.append((frames[0], frames[1:], int(count)))
    return rows


def summarize(text: str, rate: float, wall_seconds: float | None = None, top: int = TOP) -> dict[str, Any]:
    """GIL-held seconds of a py-spy ``--gil --threads`` raw profile: in all, per thread group, per innermost function
    (``own``) and per function anywhere on the stack (``inclusive``, once per sample), each thread group's inclusive
    top functions too."""
    by_thread: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    per_thread: dict[str, Counter[str]] = {}
    total = 0
    for label, frames, count in parse(text):
        group = thread_group(label)
        total += count
        by_thread[group] += count
        own[function_of(frames[-1]) if frames else "(no Python frame)"] += count
        on_stack = dict.fromkeys({function_of(f) for f in frames}, count)  # a recursive function once per sample
        inclusive.update(on_stack)
        per_thread.setdefault(group, Counter()).update(on_stack)

    def seconds(counter: Counter[str], n: int) -> list[list[Any]]:
        return [[name, round(c / rate, 3)] for name, c in counter.most_common(n)]

    return {
        "rate": rate,
        "samples": total,
        "gil_seconds": round(total / rate, 3),
        "wall_seconds": None if wall_seconds is None else round(wall_seconds, 3),
        "by_thread": dict(seconds(by_thread, len(by_thread))),
        "own": seconds(own, top),
        "inclusive": seconds(inclusive, top),
        "by_thread_inclusive": {g: seconds(c, 15) for g, c in sorted(per_thread.items(), key=lambda kv: -by_thread[kv[0]])},
    }


def _allow_tracer() -> None:
    """Let any process of this user trace this one (Yama ``ptrace_scope=1`` otherwise allows only ancestors)."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PTRACER, ctypes.c_ulong(-1), 0, 0, 0)


@contextlib.contextmanager
def maybe_gil_sample(name: str) -> Iterator[GilSample | None]:
    """Sample the block's lock holder with py-spy when ``$DQ_GIL_DIR`` is set (the module's docstring); yields a
    :class:`GilSample` whose ``summary`` is filled when the block ends (``error`` when py-spy could not run)."""
    folder = os.environ.get(ENV)
    if not folder:
        yield None
        return
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    raw, log = out / f"{name}.gil.txt", out / f"{name}.gil.log"
    raw.unlink(missing_ok=True)  # an earlier block's stacks are not this one's, should py-spy write none
    sample = GilSample()
    binary = os.environ.get(BINARY_ENV) or shutil.which("py-spy")
    if not binary:
        sample.summary = {"error": f"no py-spy: set {BINARY_ENV} or put py-spy on PATH"}
        yield sample
        return
    _allow_tracer()
    cmd = [binary, "record", "--pid", str(os.getpid()), "--gil", "--threads", "--nonblocking", "--rate", str(RATE),
           "--format", "raw", "--output", str(raw)]
    with log.open("w") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    time.sleep(0.5)  # py-spy's attach (reading the interpreter's layout) before the block starts
    start = time.perf_counter()
    try:
        yield sample
    finally:
        wall = time.perf_counter() - start
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # py-spy writes its output and exits
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if raw.exists():
            sample.summary = summarize(raw.read_text(), RATE, wall)
        else:
            sample.summary = {"error": f"py-spy exited {proc.returncode} without output: "
                                       f"{log.read_text().strip().splitlines()[-1:] or ['(no output)']}"}
        write_json(out / f"{name}.gil.json", sample.summary)
