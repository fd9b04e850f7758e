"""Drop a file's pages from the page cache, so the next read of it comes from the disk."""

from __future__ import annotations

import os
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
