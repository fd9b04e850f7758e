"""Opt-in cProfile of a benchmark's timed region: ``DQ_PROFILE_DIR=dir`` writes ``dir/<name>.txt``.

The text holds the top functions by own time and by cumulative time (host Python only; CUDA
kernels show up as the host calls that launch or wait for them). Unset, it costs nothing.
"""

from __future__ import annotations

import contextlib
import cProfile
import io
import os
import pstats
from collections.abc import Iterator
from pathlib import Path

ENV = "DQ_PROFILE_DIR"


@contextlib.contextmanager
def maybe_profile(name: str, top: int = 60) -> Iterator[None]:
    """Profile the block when ``$DQ_PROFILE_DIR`` is set; write the summary even if the block raises."""
    folder = os.environ.get(ENV)
    if not folder:
        yield
        return
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        yield
    finally:
        profiler.disable()
        text = io.StringIO()
        for key in ("tottime", "cumulative"):
            pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(top)
        path = Path(folder) / f"{name}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text.getvalue())
