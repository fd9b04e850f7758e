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

The freezing itself is :func:`~defuser_quant.checkpoint.frozen_heap.frozen_heap` (what it skips, what it costs,
when it stays stock). The H200 image's Python 3.12 starts with 375 frozen objects
(``gptqmodel_cuda_2layers_round35a_gc_h200x1.json``): the run's end hands them back to the collector with the rest.

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
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from defuser_quant.checkpoint.frozen_heap import FreezeStats, frozen_heap, timed_collections

__all__ = ["FreezeStats", "RunFreezeStats", "freeze_saves_of", "frozen_heap", "frozen_save", "timed_collections"]


@dataclass
class RunFreezeStats(FreezeStats):
    """What the ``gc_freeze`` part did in one run: its frozen block, and the saves of the quantized model run frozen
    since."""

    saves: int = 0  # saves of the quantized model run frozen since (each through frozen_save)
    save: FreezeStats | None = None  # ... the last one's

    def as_dict(self) -> dict[str, Any]:
        return {**super().as_dict(), "saves": self.saves,
                "save": self.save.as_dict() if self.save is not None else None}


#: models quantized with the part -> its stats: their saves run frozen too (frozen_save)
_SAVES: weakref.WeakKeyDictionary[Any, RunFreezeStats] = weakref.WeakKeyDictionary()


def freeze_saves_of(model: Any, stats: RunFreezeStats) -> None:
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
