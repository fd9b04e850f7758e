"""Build a GPU benchmark's JIT extensions in child processes at once, beside the source model's build.

On a fresh device machine the benchmark built GPTQModel's block-update extension, defuser-quant's rows
kernel and GPTQModel's CPU packing extension one after another after the source model (round 55: 11 s
of source, then 21 + 22 + 16 s of builds), all of it device time before the first run. The builds share
nothing: GPTQModel serializes the JIT builds of one process (a process-local lock) but each extension has
a cross-process lock of its own, so one child process per extension builds them side by side while the
parent builds the source model. Each child prints ``WARMED {"seconds": ..., "available": ...}`` last
(``seconds``/``available`` None where its package is not installed); the parent echoes each child's
output and reads that line.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

#: The line a child prints last.
MARK = "WARMED "


def report(result: tuple[float | None, bool | None]) -> int:
    """The child's side: print the ``(seconds, available)`` of its build as its last line; exit status 0."""
    seconds, available = result
    print(MARK + json.dumps({"seconds": seconds, "available": available}), flush=True)
    return 0


def _read(name: str, proc: subprocess.Popen, output: str) -> tuple[float | None, bool | None]:
    if output:
        print(output, end="" if output.endswith("\n") else "\n", flush=True)
    lines = [line for line in output.splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        last = next((line for line in reversed(output.splitlines()) if line.strip()), "no output")
        raise SystemExit(f"building the {name} extension failed (exit {proc.returncode}): {last}")
    record = json.loads(lines[-1][len(MARK):])
    return record["seconds"], record["available"]


@contextmanager
def warming(script: Path, names: list[str], env: Mapping[str, str] | None = None,
            child_args: Callable[[str], list[str]] = lambda name: ["--warm-extension", name]
            ) -> Iterator[Callable[[], dict[str, tuple[float | None, bool | None]]]]:
    """Start ``python script <child_args(name)>`` for each of ``names`` at once; the block gets a
    function that waits for all of them and returns ``{name: (seconds, available)}`` (raises
    SystemExit naming the first that failed). A child still running when the block ends (it
    raised, or Ctrl-C) is killed."""
    procs = {name: subprocess.Popen([sys.executable, str(script), *child_args(name)], env=dict(env or os.environ),
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for name in names}

    def wait() -> dict[str, tuple[float | None, bool | None]]:
        return {name: _read(name, proc, proc.communicate()[0]) for name, proc in procs.items()}

    try:
        yield wait
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


def timed_wait(wait: Callable[[], dict]) -> tuple[dict, float]:
    """``wait()`` and the seconds it took (how long the parent waited for the builds after its own work)."""
    t0 = time.perf_counter()
    results = wait()
    return results, round(time.perf_counter() - t0, 2)
