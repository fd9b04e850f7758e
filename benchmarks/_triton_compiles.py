"""How many Triton kernels were compiled while a block ran, from Triton's on-disk cache.

Triton writes every kernel it compiles into its cache directory: one folder per compile key
holding the IR, the binary, the metadata and a group file ``__grp__<kernel>.json`` written last.
A kernel found in that cache is loaded, not compiled, so a new group file means a compile. What
is counted: group files that appear in the cache while the block runs, from any process sharing
the directory (concurrent runs may count each other's compiles). Not counted: helper modules
Triton builds there (``cuda_utils.so``, launcher stubs: no group file), kernels already in this
process's memory, and a cache set up through ``TRITON_CACHE_MANAGER`` elsewhere than the directory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path


def triton_cache_dir() -> Path | None:
    """Triton's cache directory, resolved as Triton does (``triton.knobs.cache.dir`` where it has
    one; else ``TRITON_CACHE_DIR``, else ``$TRITON_HOME/.triton/cache``, else ``~/.triton/cache``);
    None when Triton cannot be imported."""
    try:
        import triton
    except ImportError:
        return None
    knob = getattr(getattr(getattr(triton, "knobs", None), "cache", None), "dir", None)
    if isinstance(knob, str) and knob.strip():
        return Path(knob.strip())
    explicit = os.environ.get("TRITON_CACHE_DIR", "").strip()
    if explicit:
        return Path(explicit)
    home = os.environ.get("TRITON_HOME") or os.path.expanduser("~")
    return Path(home) / ".triton" / "cache"


def _kernels(cache: Path) -> set[Path]:
    """The compiled kernels in ``cache``: their group files."""
    return set(cache.glob("*/__grp__*")) if cache.is_dir() else set()


@dataclass
class TritonCompiles:
    """Triton kernels compiled between :meth:`start` and :meth:`stop` (``kernels``: set by ``stop``;
    None without Triton)."""

    cache_dir: Path | None
    before: frozenset[Path] = frozenset()
    kernels: int | None = None

    @classmethod
    def start(cls) -> TritonCompiles:
        """Note the kernels already in Triton's cache (they are not counted)."""
        cache = triton_cache_dir()
        return cls(cache, frozenset(_kernels(cache)) if cache is not None else frozenset())

    def stop(self) -> int | None:
        """Set and return ``kernels``: the cache's entries that were not there at :meth:`start`."""
        if self.cache_dir is not None:
            self.kernels = len(_kernels(self.cache_dir) - self.before)
        return self.kernels


@contextmanager
def count_triton_compiles() -> Iterator[TritonCompiles]:
    """Count the Triton kernels compiled inside the ``with`` block (new entries of Triton's cache;
    the ones there before are ignored). ``.kernels`` is set at the block's end, None when Triton
    is not importable."""
    seen = TritonCompiles.start()
    try:
        yield seen
    finally:
        seen.stop()
