"""The ``layer_ahead`` part of :func:`~.overhead.lean_bookkeeping` (opt-in: not in ``DEFAULT_PARTS``): the
next decoder layer loaded onto the quantize device on a background thread while the current one finishes.

GPTQModel 7.6 loads each decoder layer after layer 0 from its lazy checkpoint source when it gets
to it: ``run_layer_stage`` calls ``BaseQModel.pre_quantize(layer)``, which copies every tensor of
the layer from the checkpoint onto the quantize device, one tensor at a time, on the main thread.
At Qwen3-30B-A3B shape on an H200 that is 1.0-1.2 s of each layer change (393 tensors, 1.2 GB),
with the previous layer's finalize workers competing for the interpreter lock
(``gptqmodel_cuda_2layers_round34a_packahead_h200x1.json``).

Here, once the last subset forward of layer ``i`` has run (GPTQModel's ``forward_end`` subset
event: layer ``i+1``'s load no longer competes with a forward for the checkpoint lock), a
background thread makes the very call GPTQModel will make, ``pre_quantize(layer i+1)``, while
layer ``i``'s last modules are solved, replayed and moved back. When GPTQModel's main thread gets to
``pre_quantize(layer i+1)``, it waits for that load if it is still running and then calls
``pre_quantize`` itself, which finds the layer materialized on the device and returns it: the same
tensors, copied by GPTQModel's own load, only earlier. The background thread synchronizes its
stream before it reports the load done, so every copy has landed before the layer is used.

Only a lazy layer (one with meta tensors) that holds our experts is loaded ahead, only to a CUDA
quantize device, only with GPTQModel 7.6's own ``pre_quantize`` (compared by source, and not
overridden by the model's class), only without a ``dynamic`` per-module config (which may skip a
layer) and only when the device has room for the layer twice over (the layer ahead and the one
quantized: :data:`ROOM`). Anything else loads when GPTQModel gets to it, as stock; why is counted
(``stats.refused``). A load ahead that raises is logged once and GPTQModel's own call loads the layer
(GPTQModel's load copies every tensor again, so a half-loaded layer ends up whole). On leaving
the block (also on an exception or Ctrl-C) a load still running is waited for before anything it
uses is restored.

Measured on an H200 (``gptqmodel_cuda_2layers_round34b_layerahead_h200x1.json``): the load ran beside the last
subset and the layer change shrank, but the subsets around it grew by about as much (the host's threads share
one interpreter lock), and the whole run was no faster; so the part is opt-in. With ``gc_freeze`` beside it (round
36, ``gptqmodel_cuda_2layers_round36[abc]_h200x1.json``) the layer change took 0.5-1.0 s against 1.4-3.1 s, but layer
0's last subset and layer 1's first two grew by about as much (layer 0's finalize workers now compete with them
instead of with the load): faster in 3 of 6 pairs, still opt-in.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .compat import all_code_names, code_strings, parameter_names

logger = logging.getLogger(__name__)

__all__ = ["DEVICES", "EVENT", "ROOM", "LayerAhead", "LayerAheadStats", "after_last_forward_of", "free_bytes",
           "internals_refusal", "subset_event_refusal"]

#: Quantize device types a layer is loaded ahead to.
DEVICES = frozenset({"cuda"})

#: A layer is loaded ahead only when the device has this many times its bytes free (counting the
#: blocks PyTorch's allocator holds unused): the layer ahead must fit beside the layer quantized.
ROOM = 2.0

#: The subset event after which the next layer is loaded (its forwards no longer need the checkpoint lock).
EVENT = "forward_end"


@dataclass
class LayerAheadStats:
    """What the ``layer_ahead`` part did in one run."""

    started: int = 0  # layers whose load was started ahead
    loaded: int = 0  # ... that finished on the background thread
    used: int = 0  # layers GPTQModel got to after their load ahead had started (waited for, if still running)
    waited_seconds: float = 0.0  # main thread's wait for loads still running when GPTQModel got to them
    load_seconds: float = 0.0  # background thread's time in those loads
    failed: int = 0  # loads ahead that raised (GPTQModel then loaded the layer itself)
    refused: Counter = field(default_factory=Counter)  # why a next layer was not loaded ahead -> times

    def as_dict(self) -> dict[str, Any]:
        return {"started": self.started, "loaded": self.loaded, "used": self.used,
                "waited_seconds": round(self.waited_seconds, 4), "load_seconds": round(self.load_seconds, 4),
                "failed": self.failed, "refused": dict(self.refused)}


def layers_lookup_refusal() -> str | None:
    """Why :func:`decoder_layers` cannot work with the installed GPTQModel (None: it can)."""
    from gptqmodel.utils import model as model_utils

    if not callable(getattr(model_utils, "get_layers_with_prefixes", None)):
        return "gptqmodel.utils.model.get_layers_with_prefixes is missing"
    return None


def decoder_layers(gptq_model: Any) -> tuple[list[nn.Module], list[str]]:
    """The decoder layers GPTQModel quantizes one by one, in order, and their names."""
    from gptqmodel.utils.model import get_layers_with_prefixes

    layers, names = get_layers_with_prefixes(gptq_model.model, gptq_model.extract_layers_node())
    return list(layers), [str(n) for n in names]


def internals_refusal() -> str | None:
    """Why the part must stay stock with this GPTQModel (None: it may run)."""
    from .recopy import pre_quantize_refusal

    why = pre_quantize_refusal()  # it materializes or moves the layer and writes nothing else
    if why is not None:
        return why
    why = layers_lookup_refusal()
    if why is not None:
        return why
    return subset_event_refusal()


def subset_event_refusal() -> str | None:
    """Why GPTQModel's subset events cannot tell this GPTQModel's last subset forward of a layer (None: they can):
    ``ModuleLooper._subset_event_dispatch`` with its keywords, passed to every subset, emitting ``forward_end``."""
    from gptqmodel.looper import stage_layer, stage_subset
    from gptqmodel.looper.module_looper import ModuleLooper

    dispatch = getattr(ModuleLooper, "_subset_event_dispatch", None)
    need = {"self", "stage", "layer_idx", "subset_index", "subset_total", "module_names", "processor"}
    if dispatch is None or parameter_names(dispatch) != need:
        return f"expected ModuleLooper._subset_event_dispatch({', '.join(sorted(need))})"
    run_subset = getattr(stage_subset, "run_subset_stage", None)
    if run_subset is None or "subset_event_cb" not in parameter_names(run_subset) or EVENT not in code_strings(run_subset):
        return f"expected stage_subset.run_subset_stage(subset_event_cb=...) to emit a {EVENT!r} subset event"
    run_layer = getattr(stage_layer, "run_layer_stage", None)
    if run_layer is None or "_subset_event_dispatch" not in all_code_names(run_layer):
        return "expected stage_layer.run_layer_stage to pass ModuleLooper._subset_event_dispatch to its subsets"
    return None


def after_last_forward_of(original: Callable, gptq_model: Any, callback: Callable[[int, Any], None]) -> Callable:
    """``ModuleLooper._subset_event_dispatch`` that, after GPTQModel's own dispatch, calls ``callback(layer_idx,
    module_names)`` once a layer of ``gptq_model`` has run its last subset forward (the :data:`EVENT` event)."""

    @functools.wraps(original)
    def _subset_event_dispatch(self, *, stage, layer_idx, subset_index, subset_total, module_names, processor):
        result = original(self, stage=stage, layer_idx=layer_idx, subset_index=subset_index,
                          subset_total=subset_total, module_names=module_names, processor=processor)
        if (stage == EVENT and getattr(self, "gptq_model", None) is gptq_model
                and isinstance(layer_idx, int) and subset_index == subset_total - 1):
            callback(layer_idx, module_names)
        return result

    return _subset_event_dispatch


class LayerAhead:
    """The ``layer_ahead`` part for one lean block over ``gptq_model`` (see the module docstring)."""

    def __init__(self, gptq_model: Any, holds_experts: Callable[[nn.Module], bool], stats: LayerAheadStats,
                 *, room: float = ROOM) -> None:
        self.gptq_model = gptq_model
        self.holds_experts = holds_experts
        self.stats = stats
        self.room = room
        self.lock = threading.Lock()
        self.pending: dict[int, tuple[nn.Module, Future]] = {}  # id(layer) -> (layer, its load ahead)
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dq-layer-ahead")
        self.inner: Callable | None = None  # the pre_quantize beneath this part's (set by patch_pre_quantize)
        self.closed = False
        self._layers: tuple[list[nn.Module], list[str]] | None = None
        self._warned = False

    # ----- the patches
    def patch_pre_quantize(self, original: Callable) -> Callable:
        """``BaseQModel.pre_quantize`` that first waits for the layer's load ahead, if one was started."""
        ahead = self
        self.inner = original

        @functools.wraps(original)
        def pre_quantize(self, module):
            if self is ahead.gptq_model and isinstance(module, nn.Module):
                ahead._wait(module)
            return original(self, module)

        return pre_quantize

    def patch_subset_event(self, original: Callable) -> Callable:
        """``ModuleLooper._subset_event_dispatch`` that starts the next layer's load after the last subset forward."""
        return after_last_forward_of(original, self.gptq_model, self.after_last_forward)

    # ----- the work
    def after_last_forward(self, layer_idx: int, module_names: Any) -> None:
        """Layer ``layer_idx`` has run its last subset forward: start loading layer ``layer_idx + 1``."""
        try:
            why, layer = self._next_layer(layer_idx, module_names)
        except Exception as exc:  # noqa: BLE001 - an unexpected model: GPTQModel loads the layer itself
            why, layer = f"the next layer could not be found ({type(exc).__name__})", None
        device = None
        if why is None:
            try:
                why, device = self._refusal(layer)
            except Exception as exc:  # noqa: BLE001 - never let GPTQModel's subset event fail on our account
                why = f"the next layer could not be checked ({type(exc).__name__})"
        if why is not None:
            with self.lock:
                self.stats.refused[why] += 1
            return
        with self.lock:
            if self.closed or id(layer) in self.pending:
                return
            self.pending[id(layer)] = (layer, self.pool.submit(self._load, layer, device))
            self.stats.started += 1

    def _next_layer(self, layer_idx: int, module_names: Any) -> tuple[str | None, nn.Module | None]:
        if self._layers is None:
            self._layers = decoder_layers(self.gptq_model)
        layers, names = self._layers
        if not 0 <= layer_idx < len(layers) - 1:
            return "the last layer", None
        if not module_names or not all(_within(layers[layer_idx], names[layer_idx], n) for n in module_names):
            return "the subset's modules are not of the layer its event names", None  # e.g. embeddings
        return None, layers[layer_idx + 1]

    def _refusal(self, layer: nn.Module) -> tuple[str | None, torch.device | None]:
        """Why ``layer`` is not loaded ahead (None: it may be), and the quantize device."""
        from gptqmodel.models.base import BaseQModel
        from gptqmodel.utils.model import _module_has_meta_tensors

        qcfg = getattr(self.gptq_model, "quantize_config", None)
        device = _torch_device(getattr(qcfg, "device", None))
        if device is None or device.type not in DEVICES or (device.type == "cuda" and not torch.cuda.is_available()):
            return "the quantize device is not CUDA", device
        if getattr(qcfg, "dynamic", None):
            return "a dynamic per-module config (it may skip a layer)", device
        if any(k.__dict__.get("pre_quantize") is not None for k in type(self.gptq_model).__mro__
               if k is not BaseQModel and issubclass(k, BaseQModel)):
            return "the model's class has its own pre_quantize", device
        if not self.holds_experts(layer):
            return "the next layer holds no defused experts", device
        if not _module_has_meta_tensors(layer):
            return "the next layer is not a lazy layer (nothing to load)", device
        need = self.room * _layer_bytes(layer)
        free = free_bytes(device)
        if free is None or free < need:
            return f"too little free memory on {device} for the layer twice over", device
        return None, device

    def _load(self, layer: nn.Module, device: torch.device) -> None:
        t0 = time.perf_counter()
        result = self.inner(self.gptq_model, layer)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # pageable copies may still be in flight
        if result is not layer:
            raise RuntimeError("pre_quantize returned another module than the layer it loaded")
        with self.lock:
            self.stats.loaded += 1
            self.stats.load_seconds += time.perf_counter() - t0

    def _wait(self, layer: nn.Module) -> None:
        with self.lock:
            entry = self.pending.get(id(layer))  # the entry holds the layer: its id is not reused meanwhile
        if entry is None:
            return
        t0 = time.perf_counter()
        try:
            entry[1].result()  # a Ctrl-C here leaves the entry pending: close() still waits for the load
        except Exception as exc:  # noqa: BLE001 - GPTQModel's own call loads (and raises what stock raises)
            self._failed(exc)
        with self.lock:
            self.pending.pop(id(layer), None)
            self.stats.used += 1
            self.stats.waited_seconds += time.perf_counter() - t0

    def _failed(self, exc: BaseException) -> None:
        with self.lock:
            self.stats.failed += 1
            first, self._warned = not self._warned, True
        if first:
            logger.warning("loading the next layer ahead failed (%s: %s); GPTQModel loads it when it gets to it",
                           type(exc).__name__, exc)

    def close(self) -> None:
        """Wait for a load still running (its patches must stay until it ends); start no other."""
        with self.lock:
            self.closed = True
            pending, self.pending = list(self.pending.values()), {}
        for _layer, future in pending:
            try:
                future.result()
            except Exception as exc:  # noqa: BLE001 - the block is ending; the layer is GPTQModel's to load
                self._failed(exc)
        self.pool.shutdown(wait=True)


def _within(layer: nn.Module, layer_name: str, name: Any) -> bool:
    """``name`` (relative to the layer, as GPTQModel's subset plans name modules, or a full path) is a
    module of ``layer``."""
    if not isinstance(name, str):
        return False
    if name == layer_name:
        return True
    if name.startswith(layer_name + "."):
        name = name[len(layer_name) + 1:]
    try:
        layer.get_submodule(name)
    except AttributeError:
        return False
    return True


def _torch_device(device: Any) -> torch.device | None:
    """``quantize_config.device`` as a ``torch.device`` (a string, a device, or GPTQModel's ``DEVICE``)."""
    if hasattr(device, "to_torch_device"):
        device = device.to_torch_device()
    try:
        return torch.device(device) if isinstance(device, (str, torch.device)) else None
    except (TypeError, RuntimeError):
        return None


def _layer_bytes(layer: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*layer.parameters(), *layer.buffers()))


def free_bytes(device: torch.device) -> int | None:
    """Bytes a new allocation on CUDA ``device`` can use: free device memory plus the blocks PyTorch's
    allocator holds unused (None: not a CUDA device, or not known)."""
    if device.type != "cuda":
        return None
    try:
        free, _total = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    except (RuntimeError, AssertionError):
        return None
    return int(free + max(0, cached))
