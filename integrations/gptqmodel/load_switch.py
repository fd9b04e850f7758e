"""The ``load_switch`` part of :func:`~.overhead.lean_bookkeeping` (opt-in): while a decoder layer holding our experts
is loaded (GPTQModel's ``_copy_checkpoint_tensors_into_submodule``), the interpreter's switch interval is
:data:`LOAD_SWITCH_INTERVAL` instead of Python's 5 ms, so the load's per-tensor torch calls get the interpreter lock
back sooner from the finalize threads running beside them.

Every torch call from Python drops the interpreter lock and, when it returns, waits for it; while another thread runs
Python, that wait lasts until the switch interval makes the other thread let go. GPTQModel loads a layer with one
``torch.empty`` and one ``copy_`` per tensor (768 calls for a Qwen3-30B-A3B layer's experts), and at the layer change
the previous layer's finalizes run beside it: on one H100 host layer 1's load took the main thread 0.8 s against
0.17 s for the same copies alone (``gptqmodel_cuda_2layers_round53a_h100x1.json``,
``layer_load_cuda_round53_h100x1.json``). On a 2-core CPU the copy loop beside four threads mixing Python with
lock-free host copies took 0.38 s at 5 ms and 0.21 s at 0.5 ms, beside four pure-Python threads 8.37 s and 0.17 s,
and the busy threads did as much work per second (``layer_load_cpu_round53_si.json``). Unlike ``load_priority``,
nothing waits: the finalizes go on beside the load.

The interval is process-wide. The first of several loads running at once sets it and the last to end puts back what
the first found (also when a load raises or is interrupted); a change made by someone else during a load is
overwritten then. Nothing is computed differently.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

from .layer_reads import LayerLoadScope

__all__ = ["LOAD_SWITCH_INTERVAL", "LoadSwitch", "LoadSwitchStats"]

#: The switch interval during a layer load (seconds; Python's default is 0.005).
LOAD_SWITCH_INTERVAL = 0.0005


@dataclass
class LoadSwitchStats:
    """What the ``load_switch`` part did in one run."""

    loads: int = 0  # whole-layer loads run with the shorter interval
    load_seconds: float = 0.0  # ... their summed time
    interval_us: int = round(LOAD_SWITCH_INTERVAL * 1e6)  # the interval during them
    restored_us: int | None = None  # the interval put back after the last one (the one found before it)

    def as_dict(self) -> dict[str, Any]:
        return {"loads": self.loads, "load_seconds": round(self.load_seconds, 4), "interval_us": self.interval_us,
                "restored_us": self.restored_us}


class LoadSwitch(LayerLoadScope):
    """The shorter switch interval for the duration of layer loads (:meth:`during_load`; see the module docstring)."""

    def __init__(self, stats: LoadSwitchStats | None = None, interval: float = LOAD_SWITCH_INTERVAL) -> None:
        if not interval > 0:
            raise ValueError(f"load_switch: the switch interval must be > 0 seconds, got {interval!r}")
        super().__init__(stats if stats is not None else LoadSwitchStats())
        self.stats.interval_us = round(interval * 1e6)
        self.interval = interval
        self._found = sys.getswitchinterval()  # replaced by the interval the first load finds

    def _first(self) -> None:
        self._found = sys.getswitchinterval()
        sys.setswitchinterval(self.interval)

    def _last(self) -> None:
        sys.setswitchinterval(self._found)
        self.stats.restored_us = round(self._found * 1e6)
