"""The ``gc_freeze`` part of :func:`~.overhead.lean_bookkeeping` (opt-in, not in ``DEFAULT_PARTS``): the objects
alive when the run starts are left out of the interpreter's full garbage collections until it ends. On an H200
(``gptqmodel_cuda_2layers_round35d_gc_h200x1.json``) the full collections inside ``quantize()`` went from
0.30-0.38 s to 0.03-0.04 s, but the collection then came in the save once the objects were handed back: end to end
within the host's noise.

A full collection (generation 2) holds the interpreter lock while it walks every object the collector tracks:
the model's modules, parameters and their dicts, every imported library. GPTQModel's run allocates enough for
the interpreter to start a couple of them per two-layer run, and every thread waits meanwhile: on an H200 host
each run, stock's too, had one whole-process stall of 0.33-0.41 s during layer 0's finalizes and one of
0.12-0.21 s at the start (``gptqmodel_cuda_2layers_round34c_stalls_h200x1.json``); on the CPU proxy the two full
collections took 0.5 s together and were the run's only long stalls (``gptqmodel_cpu_776modules_round34_gc.json``).

Inside the block ``gc.freeze()`` moves every tracked object alive at its start to the permanent generation,
which collections skip; what the run allocates is collected as before, and collections only walk that.
``gc.unfreeze()`` at the end (also on an exception or Ctrl-C) hands the frozen objects back to the oldest
generation. Nothing is computed differently. What this costs: an object alive at the start that becomes
garbage in a reference cycle during the run is freed only after the block, by a later collection (plain
reference counting frees everything else at once).

The part stays stock, and says why, when automatic collection is off (``gc.disable()``: nothing to spare).
Objects frozen before the block (a caller's own ``gc.freeze()``, or the interpreter's start: the H200 image's
Python 3.12 starts with 375 frozen objects, ``gptqmodel_cuda_2layers_round35a_gc_h200x1.json``) are counted in
``frozen_before`` and logged: ``gc.unfreeze()`` cannot tell them apart, so the end of the block hands them back to
the collector too. They stay alive; only later full collections walk them again.
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
    """What the ``gc_freeze`` part did in one run."""

    frozen: int = 0  # objects moved out of full collections at the start
    frozen_before: int = 0  # ... of them frozen already when the block started (handed back at its end too)
    full_collections: int = 0  # full (generation 2) collections during the run, frozen or not
    full_seconds: float = 0.0  # ... their summed time
    stock: str | None = None  # why nothing was frozen

    def as_dict(self) -> dict[str, Any]:
        return {"frozen": self.frozen, "frozen_before": self.frozen_before, "full_collections": self.full_collections,
                "full_seconds": round(self.full_seconds, 4), "stock": self.stock}


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
def frozen_heap(stats: FreezeStats | None = None) -> Iterator[FreezeStats]:
    """Inside the block, the objects tracked at its start are left out of full collections (see the module
    docstring); ``stats`` counts them and times the full collections that still ran."""
    stats = stats if stats is not None else FreezeStats()

    def full(generation: int, start: float, end: float) -> None:
        if generation == 2:
            stats.full_collections += 1
            stats.full_seconds += end - start

    with timed_collections(full):
        if not gc.isenabled():
            stats.stock = "automatic garbage collection is off"
            yield stats
            return
        stats.frozen_before = gc.get_freeze_count()
        if stats.frozen_before:
            logger.info("gc_freeze: %d objects were frozen before the run (gc.freeze() by the caller or at the "
                        "interpreter's start); the run's end hands them back to the collector with the rest",
                        stats.frozen_before)
        gc.freeze()
        stats.frozen = gc.get_freeze_count()
        try:
            yield stats
        finally:
            gc.unfreeze()
