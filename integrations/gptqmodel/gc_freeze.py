"""The ``gc_freeze`` part of :func:`~.overhead.lean_bookkeeping` (a default since round 52): the objects alive when
the run starts are left out of the interpreter's full garbage collections until it ends, and the quantized model's
saves run the same way. On an H200 (``gptqmodel_cuda_2layers_round35d_gc_h200x1.json``) the full collections inside
``quantize()`` went from 0.30-0.38 s to 0.03-0.04 s, but the collection then came in the save once the objects were
handed back: end to end within the host's noise. With the save frozen too, on one H100 (round 52,
``gptqmodel_cuda_2layers_round52c_h100x1.json``) the run's collections took 0.04 s against 0.35-0.40 s, the saves ran
none, and the run was 4.22x stock (median of nine pairs) against 4.00x without the part.

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

Handing the objects back at the run's end let the interpreter's next full collection walk all of them, and it came
in the save (round 35). So a model quantized with the part is registered (:func:`freeze_saves_of`), and its saves
through the plugin (``install()`` wraps ``BaseQModel.save`` with :func:`frozen_save`) run frozen the same way:
everything alive at the save's start (the quantized model included) is left out of the full collections that come
during it, and handed back at its end. Nothing is collected less: a frozen object that became garbage is freed by
the next collection after the block. A block started inside another (a save called inside a frozen run, nested
``frozen_heap``) leaves it to the outer one (``stock`` says so): the inner end must not hand back the outer's objects.
"""

from __future__ import annotations

import functools
import gc
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

__all__ = ["FreezeStats", "freeze_saves_of", "frozen_heap", "frozen_save", "timed_collections"]

logger = logging.getLogger(__name__)


@dataclass
class FreezeStats:
    """What the ``gc_freeze`` part did in one run."""

    froze: bool = False  # the objects alive at the start were moved out of full collections
    frozen: int | None = None  # ... how many (None: not counted; counting walks them all, see frozen_heap)
    frozen_before: int = 0  # objects frozen already when the block started (handed back at its end too)
    full_collections: int = 0  # full (generation 2) collections during the run, frozen or not
    full_seconds: float = 0.0  # ... their summed time
    stock: str | None = None  # why nothing was frozen
    saves: int = 0  # saves of the quantized model run frozen since (each through frozen_save)
    save: FreezeStats | None = None  # ... the last one's

    def as_dict(self) -> dict[str, Any]:
        return {"froze": self.froze, "frozen": self.frozen, "frozen_before": self.frozen_before,
                "full_collections": self.full_collections, "full_seconds": round(self.full_seconds, 4),
                "stock": self.stock, "saves": self.saves, "save": self.save.as_dict() if self.save is not None else None}


_OPEN = [0]  # frozen_heap blocks open in the process
_OPEN_LOCK = threading.Lock()
#: models quantized with the part -> its stats: their saves run frozen too (frozen_save)
_SAVES: weakref.WeakKeyDictionary[Any, FreezeStats] = weakref.WeakKeyDictionary()


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
            logger.info("gc_freeze: %d objects were frozen before the run (gc.freeze() by the caller or at the "
                        "interpreter's start); the run's end hands them back to the collector with the rest",
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


def freeze_saves_of(model: Any, stats: FreezeStats) -> None:
    """Run every later save of ``model`` (a GPTQModel model; through :func:`frozen_save`) inside
    :func:`frozen_heap`, counted in ``stats.saves`` and ``stats.save``. Held weakly: nothing is kept alive."""
    _SAVES[model] = stats


def frozen_save(original: Callable[..., Any]) -> Callable[..., Any]:
    """``BaseQModel.save`` that runs inside :func:`frozen_heap` for a model given to :func:`freeze_saves_of`,
    and as ``original`` for any other."""

    @functools.wraps(original)
    def save(self: Any, *args: Any, **kwargs: Any) -> Any:
        stats = _SAVES.get(self)
        if stats is None:
            return original(self, *args, **kwargs)
        stats.saves += 1
        stats.save = FreezeStats()
        with frozen_heap(stats.save):
            return original(self, *args, **kwargs)

    return save
