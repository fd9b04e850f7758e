"""A frozen heap for a stretch of a run (used by both adapters' frozen saves and GPTQModel's ``gc_freeze`` part): the
objects alive when a block starts are left out of the interpreter's full garbage collections until it ends.

A full collection (generation 2) holds the interpreter lock while it walks every object the collector tracks: the
model's modules, parameters and their dicts, every imported library. Inside :func:`frozen_heap` ``gc.freeze()`` moves
every tracked object alive at its start to the permanent generation, which collections skip; what the block allocates
is collected as before, and collections only walk that. ``gc.unfreeze()`` at the end (also on an exception or Ctrl-C)
hands the frozen objects back to the oldest generation. Nothing is computed differently. What this costs: an object
alive at the start that becomes garbage in a reference cycle inside the block is freed only after it, by a later
collection (plain reference counting frees everything else at once).

A block stays stock, and says why, when automatic collection is off (``gc.disable()``: nothing to spare), and when
another block is open (``gc.freeze()`` is process-wide: the inner end must not hand back the outer's objects; the
outer one covers it). Objects frozen before the block (a caller's own ``gc.freeze()``, or the interpreter's start)
are counted in ``frozen_before`` and logged: ``gc.unfreeze()`` cannot tell them apart, so the block's end hands them
back to the collector too. They stay alive; only later full collections walk them again.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ["FreezeStats", "frozen_heap", "timed_collections"]

logger = logging.getLogger(__name__)


@dataclass
class FreezeStats:
    """What one frozen block (:func:`frozen_heap`) did."""

    froze: bool = False  # the objects alive at the start were moved out of full collections
    frozen: int | None = None  # ... how many (None: not counted; counting walks them all, see frozen_heap)
    frozen_before: int = 0  # objects frozen already when the block started (handed back at its end too)
    full_collections: int = 0  # full (generation 2) collections during the run, frozen or not
    full_seconds: float = 0.0  # ... their summed time
    stock: str | None = None  # why nothing was frozen

    def as_dict(self) -> dict[str, Any]:
        return {"froze": self.froze, "frozen": self.frozen, "frozen_before": self.frozen_before,
                "full_collections": self.full_collections, "full_seconds": round(self.full_seconds, 4),
                "stock": self.stock}


_OPEN = [0]  # frozen_heap blocks open in the process
_OPEN_LOCK = threading.Lock()


@contextmanager
def timed_collections(done: Callable[[int, float, float], None]) -> Iterator[None]:
    """Inside the block, ``done(generation, start, end)`` (``perf_counter`` seconds) after each garbage
    collection the interpreter runs, called on the thread that ran it."""
    started: dict[int, float] = {}

    def event(phase: str, info: dict) -> None:
        key = threading.get_ident()
        if phase == "start":
            started[key] = time.perf_counter()
        elif (began := started.pop(key, None)) is not None:
            done(info.get("generation"), began, time.perf_counter())

    gc.callbacks.append(event)
    try:
        yield
    finally:
        gc.callbacks.remove(event)


@contextmanager
def frozen_heap(stats: FreezeStats | None = None, *, count: bool = False) -> Iterator[FreezeStats]:
    """Inside the block, the objects tracked at its start are left out of full collections (see the module
    docstring); ``stats`` times the full collections that still ran, and with ``count`` says how many objects
    were frozen (``gc.get_freeze_count()`` walks them all while holding the interpreter lock: 0.05 s for 400,000
    objects on a CPU host, so a run does not count them)."""
    stats = stats if stats is not None else FreezeStats()

    def full(generation: int, start: float, end: float) -> None:
        if generation == 2:
            stats.full_collections += 1
            stats.full_seconds += end - start

    with timed_collections(full), _one_block() as outermost:
        if not gc.isenabled():
            stats.stock = "automatic garbage collection is off"
            yield stats
            return
        if not outermost:
            stats.stock = "inside another frozen block, which hands the objects back at its end"
            yield stats
            return
        stats.frozen_before = gc.get_freeze_count()
        if stats.frozen_before:
            logger.info("frozen heap: %d objects were frozen before the block (gc.freeze() by the caller or at the "
                        "interpreter's start); the block's end hands them back to the collector with the rest",
                        stats.frozen_before)
        gc.freeze()
        stats.froze = True
        if count:
            stats.frozen = gc.get_freeze_count()
        try:
            yield stats
        finally:
            gc.unfreeze()


@contextmanager
def _one_block() -> Iterator[bool]:
    """Counts the open :func:`frozen_heap` blocks of the process (``gc.freeze()`` is process-wide); gives True
    to the outermost one."""
    with _OPEN_LOCK:
        outermost = _OPEN[0] == 0
        _OPEN[0] += 1
    try:
        yield outermost
    finally:
        with _OPEN_LOCK:
            _OPEN[0] -= 1
