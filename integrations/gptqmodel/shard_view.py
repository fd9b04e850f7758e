"""A stand-in for ``safe_open(path, framework="pt", device="cpu")`` that answers some ``get_tensor``
calls itself and leaves everything else to a handle of its own, opened on first use; and the
identity of a shard file, to tell whether it is still the file that was opened or read."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

__all__ = ["DelegatingShard", "file_id"]


def file_id(path: str) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime) of ``path``: changes when the file is replaced or rewritten."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class DelegatingShard:
    """``get_tensor(name)`` answered by ``serve(name)`` (``(True, tensor)``) when it can; any other
    read (and any other attribute: ``keys``, ``metadata``...) on a handle of its own, opened with
    ``opener`` on first use and closed with this one, as the caller's own ``safe_open`` would be."""

    def __init__(self, opener: Callable, path: str, serve: Callable[[str], tuple[bool, Any]]):
        self._opener = opener
        self._path = path
        self._serve = serve
        self._own: Any = None
        self._exited = False

    def __enter__(self) -> DelegatingShard:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._exited = True
        if self._own is not None:
            self._own.__exit__(*exc)

    def get_tensor(self, name: str) -> Any:
        if not self._exited:  # else a closed file: safetensors' own error
            served, tensor = self._serve(name)
            if served:
                return tensor
        return self.__getattr__("get_tensor")(name)

    def __getattr__(self, attr: str) -> Any:
        if self._own is None:
            self._own = self._opener(self._path, framework="pt", device="cpu")
            if self._exited:
                self._own.__exit__(None, None, None)
        return getattr(self._own, attr)
