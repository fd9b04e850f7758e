"""The ``base_in_memory`` part of :func:`~.overhead.lean_bookkeeping`: GPTQModel's base modules stay in host memory
instead of being written to the offload folder after the input capture.

With ``offload_to_disk`` on, GPTQModel 7.6's ``ModuleLooper.loop`` writes the base modules (everything outside the
decoder layers that the input capture materialized: the token embedding, the final norm, the rotary embedding) to
its offload folder right after the capture and leaves accelerate disk-offload hooks in their place; the save reads
them back. For Qwen3-30B-A3B that is mostly the 622 MB embedding: 0.22 s at the start of an H200 run (round 36c's
timeline) and 1.4 s on the 2-core CPU here, on the main thread, before the first layer. Nothing reads those modules
again until the save (the layers run from the captured inputs; the save takes offloaded ones from the source
checkpoint, mapped by :mod:`.save_sources`), so inside :func:`keep_base_modules` that one call
(``module_looper.offload_to_disk`` with a list of module names, made by ``loop``; in 7.6 ``_loop_impl``) writes nothing and the modules stay
as the capture left them, where the save takes them, as it does with ``offload_to_disk`` off. The capture loads them
as views of the source checkpoint's file mapping (where the checkpoint's dtype is the model's), so they hold page cache,
not fresh host memory, and the save's shard writer copies their bytes from the source file as it does for the ones it
maps (the tiny model's run writes the same bytes each way). The checkpoint is the same. Every other offload
is GPTQModel's; only 7.6.0's ``ModuleLooper._loop_impl`` (compared by source) is known to make that call and no other.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from .compat import code_names, patched, source_digest

__all__ = ["LOOP_DIGEST", "BaseModuleStats", "internals_refusal", "keep_base_modules"]

#: sha256[:16] of GPTQModel 7.6.0's ``ModuleLooper._loop_impl``: its one ``offload_to_disk`` call writes the base modules.
LOOP_DIGEST = "833c84a49888f7dc"


@dataclass
class BaseModuleStats:
    """What :func:`keep_base_modules` did in one run: the base modules kept in memory, offloads left to GPTQModel."""

    kept: list[str] = field(default_factory=list)
    stock: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"kept": list(self.kept), "stock": self.stock}


def internals_refusal() -> str | None:
    """What differs from the GPTQModel 7.6 internals the part relies on (None: nothing)."""
    from gptqmodel.looper import module_looper
    from gptqmodel.utils import offload

    looked_up = getattr(module_looper, "offload_to_disk", None)
    # a wrapper made with functools.wraps (a profiler's, a timer's) is called as before for every other offload
    if looked_up is None or inspect.unwrap(looked_up) is not getattr(offload, "offload_to_disk", None):
        return "gptqmodel.looper.module_looper.offload_to_disk is not utils.offload.offload_to_disk"
    loop = getattr(getattr(module_looper, "ModuleLooper", None), "_loop_impl", None)
    if loop is None or source_digest(loop) != LOOP_DIGEST:
        return "ModuleLooper._loop_impl differs from GPTQModel 7.6.0's source"
    if "offload_to_disk" not in code_names(loop):
        return "expected ModuleLooper._loop_impl to call offload_to_disk"
    return None


def _skipping(original: Callable, owner: Any, stats: BaseModuleStats) -> Callable:
    @functools.wraps(original)
    def offload_to_disk(module, model, disk_path=".", force=False):
        if model is owner and isinstance(module, list) and not force:
            stats.kept.extend(str(name) for name in module)
            return None
        stats.stock += 1
        return original(module=module, model=model, disk_path=disk_path, force=force)

    return offload_to_disk


@contextmanager
def keep_base_modules(model: Any) -> Iterator[BaseModuleStats]:
    """Inside the block, ``ModuleLooper.loop``'s offload of ``model``'s base modules writes nothing (see the module
    docstring); restored on exit. The caller has checked :func:`internals_refusal`."""
    from gptqmodel.looper import module_looper

    stats = BaseModuleStats()
    with patched(module_looper, "offload_to_disk", _skipping(module_looper.offload_to_disk, model, stats)):
        yield stats
