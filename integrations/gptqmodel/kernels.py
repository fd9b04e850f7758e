"""Which GPTQModel code paths a ``quantize()`` run took, counted while it runs.

GPTQModel 7.6 solves each module's GPTQ with a JIT-built CUDA block-update extension when it
builds and loads, and silently with its torch loop (about 12x slower at Qwen3-30B-A3B shape)
when it does not; a CUDA out-of-memory in the Hessian inverse moves a module to the CPU with
only a log line. A timing that does not say which path ran is not comparable, so
:func:`record_gptq_kernels` counts, per GPTQ solve, which path ran and on which device:

    with record_gptq_kernels() as kernels:
        model.quantize(calibration)
    kernels.fallback_reason()   # None, or what fell back

Counting only: GPTQModel computes exactly what it would compute without the recorder.
``record_gptq_kernels(stages=True)`` also times the stages, synchronizing CUDA around each
timed call so the time lands in its stage (a profile, slower than a plain run):

* ``forward``: the decoder layers' forward (capture and replay passes; pass ``model=``), which
  contains ``hessian`` (GPTQ's ``add_batch``, run by the capture hooks, or a grouped call's batched
  Hessian hooks, ``integrations.gptqmodel.hessians``) and ``experts_forward``
  (our ``DefusedExperts`` blocks);
* ``solve``: GPTQ solves (``GPTQ.quantize``, and the batched solves of ``integrations.gptqmodel.batched``);
* ``finalize``: ``GPTQProcessor.submodule_finalize`` (create the quantized module and pack), which
  contains ``pack`` (``pack_module``);
* host stages, GPTQModel's per-module machinery outside the arithmetic, timed without CUDA
  synchronisation (:data:`HOST_STAGES`): ``materialize`` (``BaseQModel.shell_module_materialize``:
  a module's weights copied from the checkpoint into GPTQModel's lazily built model, before its
  layer runs), ``offload`` (``offload_to_disk`` of each finalized module, GPTQModel's
  ``offload_to_disk``), ``log`` (``LoopProcessor.log_new_row``: one log/progress row per module).

Two figures per stage: ``stage_seconds`` adds the time of every call over GPTQModel's worker
threads (nested calls of one stage count once); ``stage_wall_seconds`` is the wall time during
which at least one thread was in the stage. ``busy_wall_seconds`` is the wall time some
top-level stage (forward, solve or finalize) was running: the rest of ``quantize()`` is framework
overhead (scheduling, offloading, logging, waiting); ``any_stage_wall_seconds`` the wall time any
stage, host stages included, was running: the rest of ``quantize()`` ran none of them.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from .compat import patched

__all__ = ["HOST_STAGES", "TOP_LEVEL_STAGES", "GptqKernelRecord", "note_solve", "quant_linear_classes", "record_gptq_kernels", "stage"]

#: Stages that do not nest in one another; their union is the busy time of ``quantize()``.
TOP_LEVEL_STAGES = ("forward", "solve", "finalize")
#: Python-side stages: timed without synchronising CUDA (they launch no GPU work of their own).
HOST_STAGES = ("materialize", "offload", "log")


@dataclass
class GptqKernelRecord:
    """Counts of GPTQ solves by path and device.

    Paths: ``cuda_block_update`` (the extension), ``torch`` (GPTQModel's torch block loop),
    ``<strategy>-fallback`` (a module under GPTQModel's ``Fallback`` sample threshold, quantized
    without a Hessian on purpose, e.g. ``rtn-fallback``: not a slower path),
    ``batched_cuda_block_update`` / ``batched_rows_block_update`` / ``batched_torch``
    (``integrations.gptqmodel.batched``: many modules solved together, through the extension per
    Hessian and block, through :mod:`.rows_kernel` once per chunk and block, or a batched torch loop).
    """

    solves: Counter = field(default_factory=Counter)  # (path, device type) -> modules
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_wall_seconds: dict[str, float] = field(default_factory=dict)
    busy_wall_seconds: float = 0.0
    any_stage_wall_seconds: float = 0.0
    stage_calls: Counter = field(default_factory=Counter)
    hessian_inverse_cpu_fallbacks: int = 0
    block_update_available: bool | None = None
    extension_disabled_by_env: bool = False
    timing: bool = False
    last_solve_at: float | None = None  # time.perf_counter() when the latest GPTQ solve returned to GPTQModel
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)
    _active: Counter = field(default_factory=Counter, repr=False, compare=False)
    _since: dict[str, float] = field(default_factory=dict, repr=False, compare=False)

    def as_dict(self) -> dict[str, Any]:
        return {
            "gptq_solves": {f"{path}@{device}": n for (path, device), n in sorted(self.solves.items())},
            "hessian_inverse_cpu_fallbacks": self.hessian_inverse_cpu_fallbacks,
            "block_update_available": self.block_update_available,
            "extension_disabled_by_env": self.extension_disabled_by_env,
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "stage_wall_seconds": {k: round(v, 3) for k, v in self.stage_wall_seconds.items()},
            "busy_wall_seconds": round(self.busy_wall_seconds, 3),
            "any_stage_wall_seconds": round(self.any_stage_wall_seconds, 3),
            "stage_calls": dict(self.stage_calls),
        }

    def _solved(self) -> None:
        """Under the lock: a GPTQ solve returned now."""
        self.last_solve_at = time.perf_counter()

    def seconds_after_last_solve(self, end: float) -> float | None:
        """Seconds from the latest GPTQ solve to ``end`` (a ``time.perf_counter()``; None: no solve):
        the tail of a run, its last modules' finalize and GPTQModel's end of the loop."""
        return None if self.last_solve_at is None else max(0.0, end - self.last_solve_at)

    def label(self) -> str:
        """Short description for tables, e.g. ``cuda-ext 768`` or ``torch 768 (fallback)``."""
        names = {"cuda_block_update": "cuda-ext", "batched_cuda_block_update": "batched-cuda-ext",
                 "batched_rows_block_update": "batched-rows-kernel"}
        parts = [f"{names.get(path, path)}@{dev} {n}" for (path, dev), n in sorted(self.solves.items())]
        text = ", ".join(parts) or "no GPTQ solve"
        if self.hessian_inverse_cpu_fallbacks:
            text += f", {self.hessian_inverse_cpu_fallbacks} Hessian inverse(s) on CPU"
        return text + (" (FALLBACK)" if self.fallback_reason() else "")

    def fallback_reason(self) -> str | None:
        """What ran on a slower path than GPTQModel offers on this machine (None: nothing)."""
        torch_on_cuda = self.solves.get(("torch", "cuda"), 0) + self.solves.get(("batched_torch", "cuda"), 0)
        reasons = []
        if torch_on_cuda:
            why = "extension disabled by GPTQMODEL_DISABLE_GPTQ_CUDA" if self.extension_disabled_by_env else (
                "the CUDA block-update extension did not build or load" if self.block_update_available is False
                else "the module did not qualify for the extension (group/bits/blocksize/quantizer)"
            )
            reasons.append(f"{torch_on_cuda} GPTQ solve(s) on CUDA used a torch loop instead of the extension ({why})")
        if self.hessian_inverse_cpu_fallbacks:
            reasons.append(f"{self.hessian_inverse_cpu_fallbacks} Hessian inverse(s) fell back to the CPU after a CUDA OOM")
        return "; ".join(reasons) or None

    # -- stage clock (called with the record's lock held) ----------------------------------------
    def _enter(self, stage: str, now: float) -> None:
        if not any(self._active.values()):
            self._since["*any"] = now
        if not any(self._active[s] for s in TOP_LEVEL_STAGES) and stage in TOP_LEVEL_STAGES:
            self._since["*busy"] = now
        if not self._active[stage]:
            self._since[stage] = now
        self._active[stage] += 1

    def _exit(self, stage: str, now: float, seconds: float) -> None:
        self._active[stage] -= 1
        self.stage_seconds[stage] = self.stage_seconds.get(stage, 0.0) + seconds
        self.stage_calls[stage] += 1
        if not self._active[stage]:
            self.stage_wall_seconds[stage] = self.stage_wall_seconds.get(stage, 0.0) + now - self._since.pop(stage)
        if stage in TOP_LEVEL_STAGES and not any(self._active[s] for s in TOP_LEVEL_STAGES):
            self.busy_wall_seconds += now - self._since.pop("*busy")
        if not any(self._active.values()):
            self.any_stage_wall_seconds += now - self._since.pop("*any")


_RECORDS: list[GptqKernelRecord] = []  # active recorders, innermost last
_THREAD = threading.local()  # .stages: stages this thread is in; .noted: a solve was counted by note_solve


def _sync() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Time the block as stage ``name`` in every active recorder that times stages.

    A no-op without one; a stage entered again on the same thread (nested) counts once.
    """
    timed = [r for r in _RECORDS if r.timing]
    inside = getattr(_THREAD, "stages", None)
    if inside is None:
        inside = _THREAD.stages = Counter()
    if not timed or inside[name]:
        inside[name] += 1
        try:
            yield
        finally:
            inside[name] -= 1
        return
    device_stage = name not in HOST_STAGES
    if device_stage:
        _sync()
    t0 = time.perf_counter()
    for record in timed:
        with record._lock:
            record._enter(name, t0)
    inside[name] += 1
    try:
        yield
    finally:
        inside[name] -= 1
        if device_stage:
            _sync()
        now = time.perf_counter()
        for record in timed:
            with record._lock:
                record._exit(name, now, now - t0)


def note_solve(path: str, device: str, modules: int = 1) -> None:
    """Count ``modules`` GPTQ solves on ``path`` that did not run through ``GPTQ.quantize``'s body."""
    for record in _RECORDS:
        with record._lock:
            record.solves[(path, device)] += modules
            record._solved()
    _THREAD.noted = True


def quant_linear_classes(model: Any) -> dict[str, int]:
    """Class name -> count of GPTQModel quantized Linear modules in ``model`` (the packing/inference kernel)."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return dict(Counter(type(m).__name__ for m in model.modules() if isinstance(m, BaseQuantLinear)))


def _timed(name: str, fn):
    @functools.wraps(fn)  # keeps the signature visible to other wrappers' checks (integrations.gptqmodel.overhead)
    def timed(*args, **kwargs):
        with stage(name):
            return fn(*args, **kwargs)

    return timed


def _layer_classes(model: Any) -> list[type]:
    """Classes of the decoder layers of ``model`` (children of a ``ModuleList`` named ``layers``)."""
    from torch import nn

    found: list[type] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] == "layers":
            for child in module:
                if type(child) not in found:
                    found.append(type(child))
    return found


@contextmanager
def _stage_timers(model: Any | None) -> Iterator[None]:
    from gptqmodel.looper import gptq_processor, loop_processor, stage_layer
    from gptqmodel.models.base import BaseQModel
    from gptqmodel.quantization import gptq

    from defuser_quant.core.defused import DefusedExperts

    targets = [(gptq.GPTQ, "add_batch", "hessian"), (gptq.GPTQ, "quantize", "solve"),
               (gptq_processor, "pack_module", "pack"), (gptq_processor.GPTQProcessor, "submodule_finalize", "finalize"),
               (DefusedExperts, "forward", "experts_forward"),
               (BaseQModel, "shell_module_materialize", "materialize"), (stage_layer, "offload_to_disk", "offload"),
               (loop_processor.LoopProcessor, "log_new_row", "log")]
    targets += [(cls, "forward", "forward") for cls in (_layer_classes(model) if model is not None else [])]
    with ExitStack() as stack:
        for owner, name, label in targets:
            stack.enter_context(patched(owner, name, _timed(label, getattr(owner, name))))
        yield


@contextmanager
def record_gptq_kernels(stages: bool = False, model: Any | None = None) -> Iterator[GptqKernelRecord]:
    """Count GPTQModel's GPTQ solves by path and device inside the ``with`` block (restored after).

    ``stages=True`` also times the stages (see the module docstring); it slows the run down.
    ``model`` (the Transformers model being quantized) adds the decoder layers' ``forward`` stage.
    """
    import os

    from gptqmodel.quantization import gptq, gptq_cuda

    record = GptqKernelRecord(
        extension_disabled_by_env=os.environ.get("GPTQMODEL_DISABLE_GPTQ_CUDA", "") not in ("", "0"), timing=stages
    )
    local = threading.local()
    quantize, block_update, available, cpu_fallback = (
        gptq.GPTQ.quantize, gptq_cuda.gptq_block_update, gptq_cuda.block_update_available, gptq.GPTQ.log_cpu_fallback
    )
    weight_only = gptq.GPTQ._fallback_quantize

    def counted_quantize(self, *args, **kwargs):
        import torch

        device = getattr(self.module, "target_device", None) or self.module.weight.data.device
        if isinstance(self.module, torch.nn.Embedding):
            return quantize(self, *args, **kwargs)
        local.used_extension = False
        local.weight_only = None
        _THREAD.noted = False
        result = quantize(self, *args, **kwargs)
        if getattr(_THREAD, "noted", False):  # a batched result: note_solve counted it
            _THREAD.noted = False
            return result
        path = "cuda_block_update" if local.used_extension else (local.weight_only or "torch")
        with record._lock:
            record.solves[(path, torch.device(device).type)] += 1
            record._solved()
        return result

    def counted_block_update(*args, **kwargs):
        local.used_extension = True
        return block_update(*args, **kwargs)

    def counted_weight_only(self, strategy, *args, **kwargs):
        local.weight_only = f"{getattr(strategy, 'value', strategy)}-fallback".lower()
        return weight_only(self, strategy, *args, **kwargs)

    def counted_available():
        ok = available()
        record.block_update_available = bool(ok)
        return ok

    def counted_cpu_fallback(self, *args, **kwargs):
        with record._lock:
            record.hessian_inverse_cpu_fallbacks += 1
        return cpu_fallback(self, *args, **kwargs)

    gptq.GPTQ.quantize, gptq_cuda.gptq_block_update = counted_quantize, counted_block_update
    gptq_cuda.block_update_available, gptq.GPTQ.log_cpu_fallback = counted_available, counted_cpu_fallback
    gptq.GPTQ._fallback_quantize = counted_weight_only
    _RECORDS.append(record)
    try:
        if stages:
            with _stage_timers(model):
                yield record
        else:
            yield record
    finally:
        _RECORDS.remove(record)
        gptq.GPTQ.quantize, gptq_cuda.gptq_block_update = quantize, block_update
        gptq_cuda.block_update_available, gptq.GPTQ.log_cpu_fallback = available, cpu_fallback
        gptq.GPTQ._fallback_quantize = weight_only
