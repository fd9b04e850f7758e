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
``record_gptq_kernels(stages=True)`` also sums the wall time spent in each stage (Hessian
accumulation ``GPTQ.add_batch``, solve ``GPTQ.quantize``, packing ``pack_module``, our experts
blocks' forward), synchronizing CUDA around each timed call so the time lands in its stage:
a profile, slower than a plain run. Stages nest (the experts forward includes the Hessian
accumulation its hooks do) and add up over GPTQModel's worker threads.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GptqKernelRecord", "quant_linear_classes", "record_gptq_kernels"]


@dataclass
class GptqKernelRecord:
    """Counts of GPTQ solves by path and device.

    Paths: ``cuda_block_update`` (the extension), ``torch`` (GPTQModel's torch block loop),
    ``<strategy>-fallback`` (a module under GPTQModel's ``Fallback`` sample threshold, quantized
    without a Hessian on purpose, e.g. ``rtn-fallback``: not a slower path).
    """

    solves: Counter = field(default_factory=Counter)  # (path, device type) -> modules
    stage_seconds: dict[str, float] = field(default_factory=dict)
    stage_calls: Counter = field(default_factory=Counter)
    hessian_inverse_cpu_fallbacks: int = 0
    block_update_available: bool | None = None
    extension_disabled_by_env: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "gptq_solves": {f"{path}@{device}": n for (path, device), n in sorted(self.solves.items())},
            "hessian_inverse_cpu_fallbacks": self.hessian_inverse_cpu_fallbacks,
            "block_update_available": self.block_update_available,
            "extension_disabled_by_env": self.extension_disabled_by_env,
            "stage_seconds": {k: round(v, 3) for k, v in self.stage_seconds.items()},
            "stage_calls": dict(self.stage_calls),
        }

    def label(self) -> str:
        """Short description for tables, e.g. ``cuda-ext 768`` or ``torch 768 (fallback)``."""
        parts = [f"{'cuda-ext' if path == 'cuda_block_update' else path}@{dev} {n}" for (path, dev), n in sorted(self.solves.items())]
        text = ", ".join(parts) or "no GPTQ solve"
        if self.hessian_inverse_cpu_fallbacks:
            text += f", {self.hessian_inverse_cpu_fallbacks} Hessian inverse(s) on CPU"
        return text + (" (FALLBACK)" if self.fallback_reason() else "")

    def fallback_reason(self) -> str | None:
        """What ran on a slower path than GPTQModel offers on this machine (None: nothing)."""
        torch_on_cuda = self.solves.get(("torch", "cuda"), 0)
        reasons = []
        if torch_on_cuda:
            why = "extension disabled by GPTQMODEL_DISABLE_GPTQ_CUDA" if self.extension_disabled_by_env else (
                "the CUDA block-update extension did not build or load" if self.block_update_available is False
                else "the module did not qualify for the extension (group/bits/blocksize/quantizer)"
            )
            reasons.append(f"{torch_on_cuda} GPTQ solve(s) on CUDA used GPTQModel's torch loop ({why})")
        if self.hessian_inverse_cpu_fallbacks:
            reasons.append(f"{self.hessian_inverse_cpu_fallbacks} Hessian inverse(s) fell back to the CPU after a CUDA OOM")
        return "; ".join(reasons) or None


def quant_linear_classes(model: Any) -> dict[str, int]:
    """Class name -> count of GPTQModel quantized Linear modules in ``model`` (the packing/inference kernel)."""
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    return dict(Counter(type(m).__name__ for m in model.modules() if isinstance(m, BaseQuantLinear)))


def _timed(record: GptqKernelRecord, lock: threading.Lock, stage: str, fn):
    import time

    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)

    def timed(*args, **kwargs):
        sync()
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sync()
            with lock:
                record.stage_seconds[stage] = record.stage_seconds.get(stage, 0.0) + time.perf_counter() - t0
                record.stage_calls[stage] += 1

    return timed


@contextmanager
def _stage_timers(record: GptqKernelRecord, lock: threading.Lock) -> Iterator[None]:
    from gptqmodel.looper import gptq_processor
    from gptqmodel.quantization import gptq

    from defuser_quant.core.defused import DefusedExperts

    targets = [(gptq.GPTQ, "add_batch", "hessian"), (gptq.GPTQ, "quantize", "solve"),
               (gptq_processor, "pack_module", "pack"), (DefusedExperts, "forward", "experts_forward")]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in targets]
    for (owner, name, stage), (_, _, original) in zip(targets, saved, strict=True):
        setattr(owner, name, _timed(record, lock, stage, original))
    try:
        yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


@contextmanager
def record_gptq_kernels(stages: bool = False) -> Iterator[GptqKernelRecord]:
    """Count GPTQModel's GPTQ solves by path and device inside the ``with`` block (restored after).

    ``stages=True`` also times the stages (see the module docstring); it slows the run down.
    """
    import os

    from gptqmodel.quantization import gptq, gptq_cuda

    record = GptqKernelRecord(extension_disabled_by_env=os.environ.get("GPTQMODEL_DISABLE_GPTQ_CUDA", "") not in ("", "0"))
    local = threading.local()
    lock = threading.Lock()
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
        result = quantize(self, *args, **kwargs)
        path = "cuda_block_update" if local.used_extension else (local.weight_only or "torch")
        with lock:
            record.solves[(path, torch.device(device).type)] += 1
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
        with lock:
            record.hessian_inverse_cpu_fallbacks += 1
        return cpu_fallback(self, *args, **kwargs)

    gptq.GPTQ.quantize, gptq_cuda.gptq_block_update = counted_quantize, counted_block_update
    gptq_cuda.block_update_available, gptq.GPTQ.log_cpu_fallback = counted_available, counted_cpu_fallback
    gptq.GPTQ._fallback_quantize = counted_weight_only
    try:
        if stages:
            with _stage_timers(record, lock):
                yield record
        else:
            yield record
    finally:
        gptq.GPTQ.quantize, gptq_cuda.gptq_block_update = quantize, block_update
        gptq_cuda.block_update_available, gptq.GPTQ.log_cpu_fallback = available, cpu_fallback
        gptq.GPTQ._fallback_quantize = weight_only
