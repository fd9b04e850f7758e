"""The ``capture_lazy`` part of :func:`~.overhead.lean_bookkeeping`: the first decoder layer stays lazy through
GPTQModel's input capture and is loaded once, straight onto the quantize device, like every other layer.

GPTQModel 7.6's input capture (``StageInputsCapture.cache_inputs``) first materializes the first decoder layer on the
CPU from the lazy checkpoint source (``shell_module_materialize(layers[0], device=CPU)``), then runs the calibration
batches through the modules in front of it. The layer itself never runs: a forward pre-hook on it stores its inputs
and stops the forward. The layer stage's ``pre_quantize`` then moves it to the quantize device (``move_to``), where
it materializes every later layer straight from the checkpoint. For a Qwen3-30B-A3B layer that is 1.2 GB copied into
fresh host memory during the capture (0.59-0.84 s of the H200 runs' capture, round 36) and the same bytes copied
again to the GPU (``layer_onload``, 0.21-0.44 s). GPTQModel itself keeps the layer lazy there when its checkpoint
holds packed floatx weights (``_first_layer_has_deferred_floatx_source``: "its pre-hook runs before packed weights are
used").

Inside :func:`lazy_capture`, the capture's materialization of a first layer that holds our ``DefusedExperts``, whose
parameters and buffers are all still on the meta device and whose model has a ``LazyTurtle`` source, returns the
layer as it is; ``pre_quantize`` then materializes it on the quantize device as it does layers 1 on (the other parts
serve that load as theirs: ``recopy`` records it, ``layer_reads`` reads the next layer ahead). The layer gets the same
checkpoint tensors, copied once instead of twice and never into host memory. Anything else (another call, a layer
without our experts or with tensors already materialized, another source) is GPTQModel's own call. Only GPTQModel
7.6.0's ``cache_inputs`` and ``pre_quantize`` (compared by source) are known to leave the layer unread until then.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .compat import patched, source_digest

__all__ = ["CACHE_INPUTS_DIGEST", "CaptureLazyStats", "internals_refusal", "lazy_capture"]

#: sha256[:16] of GPTQModel 7.6.0's ``StageInputsCapture.cache_inputs``: it materializes ``layers[0]`` on the CPU
#: and only hooks it (the pre-hook stops the forward before the layer runs).
CACHE_INPUTS_DIGEST = "9d8206b95156f72d"

_CPU = torch.device("cpu")


@dataclass
class CaptureLazyStats:
    """What :func:`lazy_capture` did in one run: first layers kept lazy, and captures left to GPTQModel (why)."""

    kept_lazy: int = 0
    stock: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"kept_lazy": self.kept_lazy, "stock": dict(self.stock)}


def internals_refusal() -> str | None:
    """What differs from the GPTQModel 7.6 internals the part relies on (None: nothing)."""
    from gptqmodel.looper.stage_inputs_capture import StageInputsCapture

    from .recopy import pre_quantize_refusal

    if source_digest(getattr(StageInputsCapture, "cache_inputs", None) or (lambda: None)) != CACHE_INPUTS_DIGEST:
        return "StageInputsCapture.cache_inputs differs from GPTQModel 7.6.0's source"
    return pre_quantize_refusal()  # it materializes a lazy layer on the quantize device, nothing else


def _is_cpu(device: object) -> bool:
    try:
        return torch.device(device) == _CPU
    except (TypeError, RuntimeError):
        return False


def _all_meta(module: nn.Module) -> bool:
    tensors = [*module.parameters(), *module.buffers()]
    return bool(tensors) and all(t.is_meta for t in tensors)


class _Capture:
    """The first layer of the capture running on this thread, and the counts."""

    def __init__(self, gptq_model: Any, holds_experts: Callable[[nn.Module], bool], stats: CaptureLazyStats):
        self.gptq_model = gptq_model
        self.holds_experts = holds_experts
        self.stats = stats
        self.lock = threading.Lock()
        self.local = threading.local()

    def _stock(self, reason: str) -> None:
        with self.lock:
            self.stats.stock[reason] = self.stats.stock.get(reason, 0) + 1

    def reason_to_load(self, model: Any, layer: nn.Module) -> str | None:
        """Why the capture must materialize ``layer`` as GPTQModel does (None: it may stay lazy)."""
        from gptqmodel.utils.structure import LazyTurtle

        if model is not self.gptq_model:
            return "another model"
        if not isinstance(getattr(model, "turtle_model", None), LazyTurtle):
            return "no lazy checkpoint source"
        if not self.holds_experts(layer):
            return "the first layer holds no defused experts"
        if not _all_meta(layer):
            return "the first layer is already (partly) materialized"
        return None

    def patch_cache_inputs(self, original: Callable) -> Callable:
        capture = self

        @functools.wraps(original)
        def cache_inputs(self, layers, *args, **kwargs):
            previous = getattr(capture.local, "first", None)
            capture.local.first = layers[0] if layers else None
            try:
                return original(self, layers, *args, **kwargs)
            finally:
                capture.local.first = previous

        return cache_inputs

    def patch_materialize(self, original: Callable) -> Callable:
        capture = self

        @functools.wraps(original)
        def shell_module_materialize(self, target_submodule, device, non_blocking=False, role="default",
                                     named_module=None, module_path=None):
            first = getattr(capture.local, "first", None)
            if (first is not None and target_submodule is first and role == "default" and named_module is None
                    and _is_cpu(device)):
                capture.local.first = None  # the capture's one call for its first layer
                why = capture.reason_to_load(self, target_submodule)
                if why is None:
                    with capture.lock:
                        capture.stats.kept_lazy += 1
                    return target_submodule
                capture._stock(why)
            return original(self, target_submodule=target_submodule, device=device, non_blocking=non_blocking,
                            role=role, named_module=named_module, module_path=module_path)

        return shell_module_materialize


@contextmanager
def lazy_capture(gptq_model: Any, holds_experts: Callable[[nn.Module], bool]) -> Iterator[CaptureLazyStats]:
    """Inside the block, ``gptq_model``'s input capture keeps a lazy first layer holding our experts lazy (see the
    module docstring); restored on exit. The caller has checked :func:`internals_refusal`."""
    from gptqmodel.looper.stage_inputs_capture import StageInputsCapture
    from gptqmodel.models.base import BaseQModel

    stats = CaptureLazyStats()
    capture = _Capture(gptq_model, holds_experts, stats)
    with ExitStack() as stack:
        stack.enter_context(patched(StageInputsCapture, "cache_inputs",
                                    capture.patch_cache_inputs(StageInputsCapture.cache_inputs)))
        stack.enter_context(patched(BaseQModel, "shell_module_materialize",
                                    capture.patch_materialize(BaseQModel.shell_module_materialize)))
        yield stats
