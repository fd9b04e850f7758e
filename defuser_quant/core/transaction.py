"""All or nothing: run a conversion that records an undo step per change, undo them all on failure."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from .errors import DefuserQuantError


@contextmanager
def all_or_nothing(undo: list[Callable[[], None]], error: type[DefuserQuantError], action: str) -> Iterator[None]:
    """Run the body under ``torch.no_grad()``; on any exception (Ctrl-C included) run ``undo`` in
    reverse. Our own errors and non-``Exception``s (KeyboardInterrupt) propagate as they are; any
    other exception becomes ``error`` saying ``action`` failed and the model was restored."""
    try:
        with torch.no_grad():
            yield
    except BaseException as exc:
        with torch.no_grad():
            for step in reversed(undo):
                step()
        if isinstance(exc, DefuserQuantError) or not isinstance(exc, Exception):
            raise
        raise error(f"{action} failed ({type(exc).__name__}: {exc}); the model was restored to its state before the call") from exc
