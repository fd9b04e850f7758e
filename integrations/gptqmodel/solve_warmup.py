"""The ``solve_warmup`` part of :func:`~.overhead.lean_bookkeeping` (a default since round 44): the steps a GPTQ solve runs
before its Hessian inverse, once on small tensors on each CUDA worker of the quantize device, while the
calibration inputs are captured on the CPU.

In rounds 42-43 (one H100, ``gptqmodel_gpu.py --timeline``) layer 0's first solves (q/k/v) waited 0.2-0.3 s
between the weight's clone and the Hessian inverse, stock's and the plugin's alike, against 0.006 s in
layer 1. The GPU's clocks do not drop while it idles (``benchmarks/gpu_clock_ramp.py``) and the Hessian
finalization and its sources' wait take under a millisecond there, so what remains between clone and
inverse is the first use in the process of those steps' CUDA kernels: ``Quantizer.find_params`` (per-row
minimum and maximum, ``torch.any``), the dead columns' boolean-mask writes, act_group_aware's permutations
(``topk`` in groups of ``group_size``, gathers) or desc_act's ``argsort``, and the plugin's sync-free
parameters. :func:`rehearse` runs those same functions (GPTQModel's own, a :class:`Quantizer` of its own)
on a Hessian of ``2 * group_size`` columns of random data and keeps nothing; no GPTQModel state, random
generator or counter is touched. Each worker's rehearsal runs after GPTQModel's own warm-up of that worker
and before its first real task (the pool hands tasks out round robin, in order), like ``worker_warmup``'s
empty tasks. A rehearsal that fails is logged and counted; the run goes on as stock's.

``benchmarks/first_use_probe.py`` measured those steps on an H100 (round 44): 0.57 s the first time in a fresh
process, 5 ms the second, 6.5 ms after the small rehearsal. Layer 0's first forward through the attention
waited the same way (0.27 s more than layer 1's in round 44's timelines), so the first worker also calls the
model's registered attention function once on random tensors of its head shape (:func:`rehearse_attention`).

Measured on one H100 in round 44 (``gptqmodel_cuda_2layers_round44a/c_h100x1.json``): layer 0's first subset took
0.26-0.41 s with the part against 0.64-0.75 s without in all four runs, every checkpoint stock's; a default since
then (benchmark variant ``-nosolvewarmup`` leaves it out).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from defuser_quant.calibration.first_use import ATTENTION_STEPS, rehearse_attention
from defuser_quant.calibration.first_use import timed_step as _timed

from .worker_warmup import hand_each_worker

logger = logging.getLogger(__name__)

__all__ = ["ATTENTION_STEPS", "STEPS", "SolveWarmupStats", "internals_refusal", "rehearse", "rehearse_attention",
           "rehearse_on_workers"]

#: The steps :func:`rehearse` runs, in order (the names its ``timings`` use).
STEPS = ("hessian", "dead_columns", "find_params", "plugin_find_params", "permutation")


@dataclass
class SolveWarmupStats:
    """What :func:`rehearse_on_workers` did: workers handed a rehearsal, those done, their seconds, failures."""

    workers: int = 0
    seconds: list[float] = field(default_factory=list)  # one per rehearsal done
    failed: list[str] = field(default_factory=list)
    attention: bool | None = None  # the attention rehearsal: ran, nothing to rehearse (eager), or not done
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def done(self) -> int:
        return len(self.seconds)

    def as_dict(self) -> dict:
        with self.lock:
            return {"workers": self.workers, "done": self.done, "seconds": [round(s, 4) for s in self.seconds],
                    "failed": list(self.failed), "attention": self.attention}


def internals_refusal() -> str | None:
    """Why GPTQModel's pool or solve functions do not look like what this relies on (None: they do)."""
    from .worker_warmup import internals_refusal as pool_refusal

    why = pool_refusal()
    if why is not None:
        return why
    from gptqmodel.quantization import gar
    from gptqmodel.quantization.quantizer import Quantizer

    missing = [name for name in ("compute_local_perms", "compute_global_perm", "compose_final_perm", "extend_perm_with_tail")
               if not callable(getattr(gar, name, None))]
    if missing or not callable(getattr(Quantizer, "find_params", None)) or not callable(getattr(Quantizer, "configure", None)):
        return "expected gptqmodel.quantization.gar's permutations and Quantizer.configure/find_params"
    return None


def rehearse(device: torch.device | str, qcfg: Any, timings: dict[str, float] | None = None, *, groups: int = 2,
             rows: int = 64) -> None:
    """GPTQModel's steps before a solve's inverse (see the module doc), once, on ``device`` with ``qcfg``'s
    bits, symmetry, group size and ordering, for a weight of ``rows`` x ``groups`` groups of columns.
    ``timings``: each step's seconds, the device synchronized after it."""
    from gptqmodel.quantization.gar import compose_final_perm, compute_global_perm, compute_local_perms, extend_perm_with_tail
    from gptqmodel.quantization.quantizer import Quantizer

    from .batched import _find_params

    device = torch.device(device)
    group = int(qcfg.group_size) if int(qcfg.group_size) > 0 else 128
    columns = groups * group
    generator = torch.Generator().manual_seed(0)  # a generator of its own: the run's random state is left alone

    def step(name: str, run: Callable[[], Any]) -> Any:
        return _timed(device, timings, name, run)

    with torch.inference_mode():
        x = torch.randn(4 * rows, columns, generator=generator).to(device)
        W = torch.randn(rows, columns, generator=generator).to(device)
        H = step("hessian", lambda: x.T @ x)
        H[:, 0] = 0  # one dead column, so the masked writes below write
        H[0, :] = 0

        def dead_columns() -> None:
            dead = torch.diag(H) == 0
            H[dead, dead] = 1
            W[:, dead] = 0

        step("dead_columns", dead_columns)
        quantizer = Quantizer(qcfg)
        quantizer.configure(perchannel=True)
        step("find_params", lambda: quantizer.find_params(W, weight=True))
        maxq_value = int(quantizer.maxq.item())
        step("plugin_find_params", lambda: _find_params(quantizer, W.unsqueeze(0).repeat(2, 1, 1),
                                                        quantizer.maxq.to(device), maxq_value))

        def permutation() -> None:
            diag = torch.diag(H)
            if qcfg.desc_act:
                perm = torch.argsort(diag, descending=True)
            elif qcfg.act_group_aware:
                local, values = compute_local_perms(diag, group, return_values=True)
                perm = extend_perm_with_tail(compose_final_perm(local, compute_global_perm(diag, group,
                                                                                          precomputed_values=values), group), columns)
            else:
                return
            H[perm][:, perm]
            W[:, perm]
            torch.argsort(perm)

        step("permutation", permutation)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()


def rehearse_on_workers(cuda: str | None, qcfg: Any, model_config: Any = None,
                        dtype: torch.dtype | None = None) -> SolveWarmupStats:
    """Hand each worker of GPTQModel's pool group ``cuda`` (a key such as ``"cuda:0"``) one :func:`rehearse`
    of ``qcfg`` (nothing without a CUDA group), and, given the model's config and dtype, one
    :func:`rehearse_attention` to the first of them; returns at once, the stats filling in as the workers finish."""
    stats = SolveWarmupStats()
    if cuda is None:
        return stats
    device = torch.device(cuda)

    attention_left = [model_config is not None and dtype is not None]  # one rehearsal: its kernels load once per process

    def task() -> None:
        begin = time.perf_counter()
        with stats.lock:
            attention, attention_left[0] = attention_left[0], False
        try:
            rehearse(device, qcfg)
            if attention:
                ran = rehearse_attention(device, model_config, dtype)
                with stats.lock:
                    stats.attention = ran
        except Exception as exc:  # an optimization only: the real solves run as they would have
            with stats.lock:
                stats.failed.append(f"{type(exc).__name__}: {exc}")
            logger.warning("defuser-quant's solve warm-up on %s failed (%s: %s); the run goes on without it", cuda,
                           type(exc).__name__, exc)
            return
        with stats.lock:
            stats.seconds.append(time.perf_counter() - begin)

    stats.workers = hand_each_worker(cuda, task)
    logger.debug("rehearsing the solves' first steps on %d workers of %s", stats.workers, cuda)
    return stats
