"""The ``finalize_turns`` part of :func:`~.overhead.lean_bookkeeping`: the finalizes of expert
projections take turns for their Python, and pack side by side.

GPTQModel 7.6 finalizes every quantized module on its CPU pool (eight workers on a 16-core host):
``GPTQProcessor.submodule_finalize`` creates the quantized module, runs ``pack_module`` ->
``pack_block`` (Python around one call of the C++ pack extension, ``pack_block_cpu``, which releases
the interpreter lock for 15-20 ms at Qwen3-30B-A3B shape) and converts the zero points. With a
layer's 384 expert projections queued at once, up to eight threads run that Python together, each
torch call handing the interpreter lock to another thread and waiting to get it back, while the main
thread loads and runs the next layer beside them (docs/performance.md, round 31: the layer change and
the last layer's finalize, 1.4-1.7 s each on an H200 host).

Here a finalize of one of our expert projections first takes a turn (one plain lock for all of
them), runs GPTQModel's ``submodule_finalize`` unchanged, and gives the turn back while the pack
extension runs, taking it again after: one such finalize runs Python at a time, the packs still run
side by side. Every module gets the same calls with the same arguments in the same order; only how
the finalizes of different modules interleave changes, which GPTQModel leaves open anyway (each
finalize writes its own module under its own locks). Other modules' finalizes are GPTQModel's.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

__all__ = ["FinalizeTurnStats", "finalize_turns", "internals_refusal"]


@dataclass
class FinalizeTurnStats:
    """What :func:`finalize_turns` did in one run."""

    finalizes: int = 0  # expert-projection finalizes that took turns
    packs_outside: int = 0  # pack-extension calls made with the turn given back
    waited_seconds: float = 0.0  # summed over threads: waiting for a turn (first, and after each pack)

    def as_dict(self) -> dict:
        return {**asdict(self), "waited_seconds": round(self.waited_seconds, 3)}


def internals_refusal() -> str | None:
    """Why GPTQModel's finalize does not look like what the turns rely on (None: it does): the
    processor's ``submodule_finalize(self, module, model, **kwargs)`` and ``pack_block`` importing
    ``pack_block_cpu`` from ``pack_block_ext`` when it runs (so the patched one is the one called)."""
    import inspect

    from gptqmodel.looper.gptq_processor import GPTQProcessor
    from gptqmodel.nn_modules.qlinear import PackableQuantLinear, pack_block_ext

    finalize = getattr(GPTQProcessor, "submodule_finalize", None)
    if finalize is None or list(inspect.signature(finalize).parameters)[:3] != ["self", "module", "model"]:
        return "expected GPTQProcessor.submodule_finalize(self, module, model, **kwargs)"
    pack = getattr(PackableQuantLinear, "pack_block", None)
    names = set(getattr(getattr(inspect.unwrap(pack), "__code__", None), "co_names", ())) if pack is not None else set()
    if not callable(getattr(pack_block_ext, "pack_block_cpu", None)) or not {"pack_block_ext", "pack_block_cpu"} <= names:
        return "expected PackableQuantLinear.pack_block to import pack_block_ext.pack_block_cpu when it runs"
    return None


class _Turns:
    def __init__(self, paths: frozenset[str], stats: FinalizeTurnStats):
        self.paths = paths
        self.stats = stats
        self.turn = threading.Lock()
        self.count = threading.Lock()  # guards stats
        self.local = threading.local()  # .holding: this thread has the turn

    def _take(self) -> None:
        t0 = time.perf_counter()
        self.turn.acquire()
        self.local.holding = True
        waited = time.perf_counter() - t0
        with self.count:
            self.stats.waited_seconds += waited

    def _give(self) -> None:
        self.local.holding = False
        self.turn.release()

    def finalize(self, original: Callable) -> Callable:
        @functools.wraps(original)
        def submodule_finalize(processor, module, model, *args, **kwargs):
            if getattr(module, "full_name", None) not in self.paths or getattr(self.local, "holding", False):
                return original(processor, module, model, *args, **kwargs)
            self._take()
            try:
                return original(processor, module, model, *args, **kwargs)
            finally:
                self._give()
                with self.count:
                    self.stats.finalizes += 1
        return submodule_finalize

    def pack(self, original: Callable) -> Callable:
        @functools.wraps(original)
        def pack_block_cpu(*args, **kwargs):
            if not getattr(self.local, "holding", False):
                return original(*args, **kwargs)
            self._give()
            try:
                return original(*args, **kwargs)
            finally:
                self._take()
                with self.count:
                    self.stats.packs_outside += 1
        return pack_block_cpu


@contextmanager
def finalize_turns(paths: frozenset[str]) -> Iterator[FinalizeTurnStats]:
    """Inside the block, the finalizes of the modules at ``paths`` (full names) take turns for their
    Python and pack outside their turn (see the module docstring); restored on exit."""
    from gptqmodel.looper.gptq_processor import GPTQProcessor
    from gptqmodel.nn_modules.qlinear import pack_block_ext

    from .compat import patched

    stats = FinalizeTurnStats()
    turns = _Turns(frozenset(paths), stats)
    with patched(GPTQProcessor, "submodule_finalize", turns.finalize(GPTQProcessor.submodule_finalize)), \
            patched(pack_block_ext, "pack_block_cpu", turns.pack(pack_block_ext.pack_block_cpu)):
        yield stats
