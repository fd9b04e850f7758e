"""The ``load_priority`` part of :func:`~.overhead.lean_bookkeeping` (opt-in, with ``block_finalize``): while a
decoder layer holding our experts is loaded (GPTQModel's ``_copy_checkpoint_tensors_into_submodule``), the finalize
tasks and ``block_finalize``'s workers wait instead of competing with the load for the interpreter lock.

GPTQModel loads a layer with one ``torch.empty`` and one ``copy_`` per tensor (768 calls for a Qwen3-30B-A3B layer's
experts), and every torch call from Python drops the interpreter lock and waits to take it back. At the layer change
the previous layer's finalizes run beside the load (on one H100 host layer 1's load took the main thread 0.45-1.0 s
against 0.26-0.67 s for layer 0's at the start, with nothing beside it; ``gptqmodel_cuda_2layers_round52*``), and on
a 2-core CPU the same loop beside four threads running Python took 250 times its time alone, and 11 times beside
four that mix Python with lock-free host copies, as the finalize workers do (``layer_load_cpu_round52.json``). The
finalizes are background work: what matters is that the last layer's are done when the run ends, and a pause during
an earlier layer's load only moves them later, beside the next subsets.

So the load holds a gate (:meth:`LoadPriority.during_load`), and while it is held ``block_finalize``'s finalize tasks
(before they start, GPTQModel's own finalize of references and other modules included), its group worker (before
each member) and its extension threads (before each member's tensors) wait (:meth:`LoadPriority.pause`, a blocking
wait that gives the lock up). A wait ends after :data:`MAX_WAIT` seconds even if the load goes on (counted in
``timeouts``), so nothing can wait on the load forever. Nothing is computed differently: the same members, the same
buffers, only later. A finalize task already past its pause runs on, and GPTQModel's disk offload after a
finalize is not gated.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from .layer_reads import LayerLoadScope

__all__ = ["MAX_WAIT", "LoadPriority", "LoadPriorityStats"]

#: Longest one pause waits for a load (seconds); a Qwen3-30B-A3B layer's load takes well under one.
MAX_WAIT = 2.0


@dataclass
class LoadPriorityStats:
    """What the ``load_priority`` part did in one run."""

    loads: int = 0  # layer loads that held the gate
    load_seconds: float = 0.0  # ... their summed time
    pauses: int = 0  # waits of finalize tasks and block_finalize's threads while a load held the gate
    paused_seconds: float = 0.0  # ... their summed time (several threads wait at once)
    timeouts: int = 0  # waits that ended at MAX_WAIT with the load still holding the gate

    def as_dict(self) -> dict[str, Any]:
        return {"loads": self.loads, "load_seconds": round(self.load_seconds, 4), "pauses": self.pauses,
                "paused_seconds": round(self.paused_seconds, 4), "timeouts": self.timeouts}


class LoadPriority(LayerLoadScope):
    """A gate a layer load holds (:meth:`during_load`) and background workers wait at (see the module docstring)."""

    def __init__(self, stats: LoadPriorityStats | None = None, max_wait: float = MAX_WAIT) -> None:
        super().__init__(stats if stats is not None else LoadPriorityStats())
        self.max_wait = max_wait
        self._open = threading.Event()
        self._open.set()

    def _first(self) -> None:
        self._open.clear()

    def _last(self) -> None:
        self._open.set()

    def pause(self) -> None:
        """Wait while a load holds the gate (at most ``max_wait`` seconds); return at once when none does."""
        if self._open.is_set():
            return
        t0 = time.perf_counter()
        opened = self._open.wait(self.max_wait)
        with self._lock:
            self.stats.pauses += 1
            self.stats.paused_seconds += time.perf_counter() - t0
            self.stats.timeouts += not opened
