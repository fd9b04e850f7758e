"""The ``rehome`` part of :func:`~.overhead.lean_bookkeeping`: the per-batch device check of a layer forward
without GPTQModel's three walks over the layer.

Before every calibration batch of a layer forward, GPTQModel 7.6's ``ForwardExecutor.run_single`` calls
``looper_helpers.rehome_module_to_device(layer, device, move_parameters=True, move_buffers=True,
root_module=model)``. That walks ``layer.modules()`` to move any parameter or buffer not on ``device``, then
(``_realign_materialized_hooks``) walks it twice more looking for accelerate hooks (``_hf_hook``) to point at
``device``, each lookup going through ``nn.Module.__getattr__``. A Qwen3-MoE layer holding 128 defused experts has
525 modules: 2.4 ms of the host per batch on a 2-core CPU (``benchmarks/rehome_check.py``; two layers take 144-160
batches), under the interpreter lock the rest of the run needs.

Inside :func:`lean_rehome`, for a layer holding our ``DefusedExperts`` and GPTQModel's call's arguments, one walk
checks what makes GPTQModel's call do nothing: every parameter and buffer of the layer is already on ``device``
(GPTQModel's own test, ``tensor.device == device``) and no module of it has an accelerate hook. When both hold,
GPTQModel would move nothing (it moves only mismatched tensors) and retarget nothing (it retargets only hooks it
finds), so the call returns at once; anything else (a tensor elsewhere, a hook, another module, other arguments)
goes to GPTQModel's function unchanged. The walk holds GPTQModel's own lock (``_rehome_lock``), as its function
does. Checked against 7.6.0's source of both functions (:data:`SOURCE_DIGESTS`); another source stays stock.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from defuser_quant.core.defused import DefusedExperts

from .compat import code_names, patched, source_digest

__all__ = ["RehomeStats", "SOURCE_DIGESTS", "internals_refusal", "lean_rehome", "reason_to_call_stock"]

#: sha256[:16] of GPTQModel 7.6.0's ``looper_helpers`` functions whose no-op this reproduces.
SOURCE_DIGESTS = {"rehome_module_to_device": "8b6adf55a897e828", "_realign_materialized_hooks": "f9d9f236a2cb8d59"}

#: The keyword defaults of GPTQModel's function, and the values of its call in ``run_single``: only calls
#: with these values (and a ``root_module``) are answered here.
_DEFAULTS = {"move_parameters": False, "move_buffers": True, "include_non_persistent_buffers": True, "only_mismatched": True}
_RUN_SINGLE_CALL = {**_DEFAULTS, "move_parameters": True}
_HOOK = "_hf_hook"


@dataclass
class RehomeStats:
    """What :func:`lean_rehome` did in one run."""

    skipped: int = 0  # calls answered by the one-walk check: GPTQModel's function would have done nothing
    stock: int = 0  # calls passed to GPTQModel's function (see ``reasons``)
    reasons: dict[str, int] | None = None

    def note_stock(self, reason: str) -> None:
        self.stock += 1
        self.reasons = self.reasons or {}
        self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "stock": self.stock, "reasons": dict(self.reasons or {})}


def internals_refusal() -> str | None:
    """Why GPTQModel's rehome does not look like what this relies on (None: it does)."""
    from gptqmodel.looper import forward_executor
    from gptqmodel.utils import looper_helpers

    for name, digest in SOURCE_DIGESTS.items():
        fn = getattr(looper_helpers, name, None)
        if fn is None or source_digest(fn) != digest:
            return f"looper_helpers.{name} differs from GPTQModel 7.6.0's source"
    if not isinstance(getattr(looper_helpers, "_rehome_lock", None), type(threading.Lock())):
        return "expected looper_helpers._rehome_lock, a lock"
    if getattr(forward_executor, "rehome_module_to_device", None) is not looper_helpers.rehome_module_to_device:
        return "expected forward_executor to import looper_helpers.rehome_module_to_device"
    run_single = getattr(getattr(forward_executor, "ForwardExecutor", None), "run_single", None)
    if run_single is None or "rehome_module_to_device" not in code_names(run_single):
        return "expected ForwardExecutor.run_single to call rehome_module_to_device"
    return None


def reason_to_call_stock(module: nn.Module, device: torch.device) -> str | None:
    """None when ``module`` holds our experts and GPTQModel's ``rehome_module_to_device(module, device,
    move_parameters=True, ...)`` would change nothing (every tensor on ``device``, no accelerate hook); else
    what rules that out."""
    class_hooks: dict[type, bool] = {}  # per class: has an ``_hf_hook`` class attribute
    seen: set[int] = set()
    todo = [module]
    experts = False
    while todo:
        sub = todo.pop()
        if id(sub) in seen:
            continue
        seen.add(id(sub))
        cls = type(sub)
        if cls not in class_hooks:
            class_hooks[cls] = getattr(cls, _HOOK, None) is not None
        params, buffers, children = sub._parameters, sub._buffers, sub._modules
        # ``getattr(sub, "_hf_hook", None)`` as GPTQModel asks it, without nn.Module.__getattr__'s exception;
        # a name merely present in a store sends the call to GPTQModel too
        if sub.__dict__.get(_HOOK) is not None or class_hooks[cls] or _HOOK in params or _HOOK in buffers or _HOOK in children:
            return "an accelerate hook"
        for tensor in params.values():
            if tensor is not None and tensor.device != device:
                return "a tensor on another device"
        for tensor in buffers.values():
            if tensor is not None and tensor.device != device:
                return "a tensor on another device"
        experts = experts or isinstance(sub, DefusedExperts)
        todo.extend(child for child in children.values() if child is not None)
    return None if experts else "not a layer holding our experts"


def _lean(original: Callable, lock: Any, stats: RehomeStats, stats_lock: threading.Lock) -> Callable:
    @functools.wraps(original)
    def rehome_module_to_device(module: nn.Module, device: torch.device, **kwargs: Any) -> None:
        root = kwargs.get("root_module")
        settings = {name: kwargs.get(name, default) for name, default in _DEFAULTS.items()}
        if not isinstance(module, nn.Module) or not isinstance(device, torch.device) or root is None or \
                settings != _RUN_SINGLE_CALL or set(kwargs) - {*_DEFAULTS, "root_module"}:
            why = "another call"
        else:
            with lock:
                why = reason_to_call_stock(module, device)
                if why is None:
                    with stats_lock:
                        stats.skipped += 1
                    return None
        with stats_lock:
            stats.note_stock(why)
        return original(module, device, **kwargs)

    return rehome_module_to_device


@contextmanager
def lean_rehome(stats: RehomeStats | None = None) -> Iterator[RehomeStats]:
    """Inside the block, ``run_single``'s per-batch rehome of a layer holding our experts is answered by one
    walk when GPTQModel's function would do nothing (see the module docstring); restored on exit."""
    from gptqmodel.looper import forward_executor
    from gptqmodel.utils import looper_helpers

    stats = stats if stats is not None else RehomeStats()
    lean = _lean(forward_executor.rehome_module_to_device, looper_helpers._rehome_lock, stats, threading.Lock())
    with patched(forward_executor, "rehome_module_to_device", lean):
        yield stats
