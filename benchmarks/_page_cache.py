"""The page cache around a benchmark's runs: drop a file's pages (the next read comes from the disk), or write
every dirty page back before a run (a later run's save then does not wait on an earlier run's checkpoints)."""

from __future__ import annotations

import os
import time
from pathlib import Path


def evict(path: str | Path) -> bool:
    """Write ``path``'s dirty pages back, then advise the kernel to drop them; False if it would not."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def write_back() -> float | None:
    """``os.sync()``, for the caller to run untimed before a run: the earlier runs' checkpoints are written back, so a
    later run's save does not wait on their dirty pages. Seconds it took (None where there is no ``os.sync``)."""
    if not hasattr(os, "sync"):
        return None
    t0 = time.perf_counter()
    os.sync()
    return round(time.perf_counter() - t0, 2)
