"""Per-stage wall time of one llm-compressor ``oneshot``, per rank (a profile for the benchmarks).

:func:`install` wraps the few functions ``oneshot`` goes through (module attributes looked up at
call time, so the wrappers take effect) and returns a :class:`StageClock`; ``clock.totals()``
gives seconds per stage. Stages (inclusive; nested ones are listed under their parent):

* ``pre_process`` (``Oneshot.__init__``: model/processor checks, save wrapper), ``dataloader``,
  ``linearize`` (llm-compressor's MoE linearization, our hook builds ``DefusedExperts``),
  ``initialize`` (every modifier's ``on_initialize``: defuse, quantization config);
* ``offload_setup`` (the pipelines' ``set_onload_device``: every module's tensors wrapped in an
  offload cache, broadcast from rank 0 tensor by tensor under torchrun), ``trace`` (the sequential
  pipeline's subgraph tracing);
* ``calibrate_forward`` (every layer's calibration pass: forward plus every hook),
  ``propagate_forward`` (the pass with hooks off that feeds the next layer);
* ``epoch_end`` (after each layer's calibration pass), which holds ``rank_sync`` (our
  ``before_compress``: data check, budgeted top-up, Hessian alignment), ``hessian_reduce``,
  ``solve`` (``compress_module_list``), ``qparam_broadcast`` and ``barrier`` (ours, after each
  compression: the time this rank waits for the slowest);
* ``experts_host`` (inside the two forwards: host seconds in the experts blocks' forwards, not
  synchronized, so the timing changes nothing);
* ``finalize`` (every modifier's ``on_finalize``: our coverage reduce and report), ``save``
  (``post_process``: compress, write on rank 0, barriers), which holds ``save.compress``
  (compressed-tensors' ``compress_model``: packing, spread over the ranks under torchrun; with DefuseModifier's
  ``batched_compress`` only the modules its loop still packs), ``save.compress_batched`` (DefuseModifier's
  stacked packing of alike modules, run just before that loop),
  ``save.accelerate`` (``to_accelerate``/``from_accelerate`` around the write),
  ``save.save_pretrained`` (Transformers' own, rank 0) with ``save.shard_write`` (each
  safetensors shard: device-to-host copies, serialization, file write; in DefuseModifier's
  writer pool, host seconds in its threads, not synchronized) inside, ``save.shard_wait``
  (DefuseModifier's writer pool, ``save_threads``: waiting for the last shards after
  Transformers' save returned; ``save.shard_write`` then sums the threads' overlapping writes)
  and ``save.recipe`` (the recipe file).

On CUDA every boundary synchronizes the current device (a few per layer: cheap). Benchmark
instrumentation only; it changes no result.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["TOP_LEVEL", "StageClock", "install"]

#: the stages that do not nest in one another: ``oneshot`` minus their sum is time no stage covers
TOP_LEVEL = ("pre_process", "dataloader", "linearize", "initialize", "offload_setup", "trace", "calibrate_forward",
             "propagate_forward", "epoch_end", "finalize", "save")


class StageClock:
    """Summed wall time and call count per stage name."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.seconds: dict[str, float] = defaultdict(float)
        self.cpu_seconds: dict[str, float] = defaultdict(float)  # this process's CPU time: robust to a shared CPU
        self.calls: dict[str, int] = defaultdict(int)
        self._open = threading.local()  # each thread's stages entered and not yet left, outermost first

    def _sync(self) -> None:
        if self.cuda:
            import torch

            torch.cuda.synchronize()

    def open_stages(self) -> tuple[str, ...]:
        """The calling thread's stages entered and not yet left, outermost first."""
        return tuple(getattr(self._open, "names", ()))

    def top_level_stage(self) -> str:
        """The calling thread's outermost open stage of :data:`TOP_LEVEL` (else its outermost open stage; else
        ``"outside the stages"``): where a moment of ``oneshot`` belongs."""
        names = self.open_stages()
        return next((n for n in names if n in TOP_LEVEL), names[0] if names else "outside the stages")

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self._sync()
        t0, c0 = time.perf_counter(), time.process_time()
        names = self._open.__dict__.setdefault("names", [])
        names.append(name)
        try:
            import torch

            with torch.profiler.record_function(f"stage:{name}"):  # a range in DQ_TORCH_PROFILE_DIR's table
                yield
        finally:
            names.pop()
            self._sync()
            self.seconds[name] += time.perf_counter() - t0
            self.cpu_seconds[name] += time.process_time() - c0
            self.calls[name] += 1

    def add_host(self, name: str, seconds: float, cpu_seconds: float) -> None:
        self.seconds[name] += seconds
        self.cpu_seconds[name] += cpu_seconds
        self.calls[name] += 1

    def wrap(self, owner: Any, attr: str, name: str, sync: bool = True) -> None:
        """Time every call of ``owner.attr`` as stage ``name`` (``sync=False``: host time only, no
        CUDA synchronization, for a stage called per batch whose timing must not change the run)."""
        inner = getattr(owner, attr)
        if getattr(inner, "_stage_clock", None) is self:
            return

        @functools.wraps(inner)
        def timed(*args: Any, **kwargs: Any) -> Any:
            if not sync:
                t0, c0 = time.perf_counter(), time.process_time()
                try:
                    return inner(*args, **kwargs)
                finally:
                    self.add_host(name, time.perf_counter() - t0, time.process_time() - c0)
            with self.stage(name):
                return inner(*args, **kwargs)

        timed._stage_clock = self  # type: ignore[attr-defined]
        setattr(owner, attr, timed)

    def wrap_batches(self, owner: Any, attr: str) -> None:
        """Time the sequential pipeline's batch loops (``_get_batches``) by their description."""
        inner = getattr(owner, attr)
        clock = self

        @functools.wraps(inner)
        def timed(*args: Any, **kwargs: Any) -> Iterator[Any]:
            desc = kwargs.get("desc", args[3] if len(args) > 3 else "")
            name = "propagate_forward" if "Propagating" in str(desc) else "calibrate_forward"
            with clock.stage(name):
                yield from inner(*args, **kwargs)

        setattr(owner, attr, timed)

    def totals(self) -> dict[str, dict[str, float | int]]:
        return {k: {"s": round(v, 3), "cpu_s": round(self.cpu_seconds[k], 3), "calls": self.calls[k]} for k, v in self.seconds.items()}


def install(cuda: bool) -> StageClock:
    """Wrap ``oneshot``'s stages (call before ``oneshot``; in the process that runs it)."""
    import importlib

    from llmcompressor.core.lifecycle import CompressionLifecycle
    from llmcompressor.modifiers.gptq import base as gptq_base
    from llmcompressor.pipelines.data_free import pipeline as data_free
    from llmcompressor.pipelines.sequential import pipeline as sequential

    oneshot_module = importlib.import_module("llmcompressor.entrypoints.oneshot")  # the package attribute is the function
    clock = StageClock(cuda)
    clock.wrap(oneshot_module, "pre_process", "pre_process")
    clock.wrap(oneshot_module, "get_calibration_dataloader", "dataloader")
    clock.wrap(oneshot_module, "linearize_moe", "linearize")
    clock.wrap(oneshot_module, "post_process", "save")
    clock.wrap(CompressionLifecycle, "initialize", "initialize")
    clock.wrap(CompressionLifecycle, "finalize", "finalize")
    clock.wrap(sequential, "trace_subgraphs", "trace")
    for pipeline in (sequential, data_free):  # the model-wide offload wrap: per-tensor broadcasts under torchrun
        clock.wrap(pipeline, "set_onload_device", "offload_setup")
    clock.wrap_batches(sequential, "_get_batches")
    clock.wrap(gptq_base.GPTQModifier, "on_sequential_epoch_end", "epoch_end")
    clock.wrap(gptq_base.GPTQModifier, "_reduce_hessian_to_target_rank", "hessian_reduce")
    clock.wrap(gptq_base.GPTQModifier, "compress_module_list", "solve")
    clock.wrap(gptq_base, "broadcast_qparams_and_cleanup", "qparam_broadcast")
    _wrap_experts(clock)
    _wrap_save(clock)
    try:
        from defuser_quant.integrations.llmcompressor import ranks
    except ImportError:  # the stock variant does not import our integration
        return clock
    clock.wrap(ranks, "align_hessians", "rank_sync.align")
    _wrap_barrier(clock, ranks)
    from defuser_quant.integrations.llmcompressor.modifier import DefuseModifier

    clock.wrap(DefuseModifier, "_before_compress", "rank_sync.check_and_top_up")
    return clock


def _wrap_experts(clock: StageClock) -> None:
    """``experts_host``: host seconds in the experts blocks' forwards (stock's ``LinearExperts2D``,
    ours ``DefusedExperts``), not synchronized: on a GPU whose calibration is bound by the host this
    is what the block calls cost, apart from the rest of the layer."""
    from llmcompressor.modeling.moe import linear_experts

    clock.wrap(linear_experts.LinearExperts2D, "forward", "experts_host", sync=False)
    try:
        from defuser_quant.core.defused import DefusedExperts
    except ImportError:  # pragma: no cover - the stock variant still has the package on its path
        return
    clock.wrap(DefusedExperts, "forward", "experts_host", sync=False)


def _wrap_save(clock: StageClock) -> None:
    """The parts of ``post_process``'s save (module globals and class attributes looked up at call time)."""
    import transformers.modeling_utils as modeling_utils
    from compressed_tensors.compressors import ModelCompressor
    from llmcompressor.transformers.compression import compressed_tensors_utils as ct_utils

    clock.wrap(ModelCompressor, "compress_model", "save.compress")
    for name in ("to_accelerate", "from_accelerate"):
        if hasattr(ct_utils, name):
            clock.wrap(ct_utils, name, "save.accelerate")
    if hasattr(ct_utils, "update_and_save_recipe"):
        clock.wrap(ct_utils, "update_and_save_recipe", "save.recipe")
    # llm-compressor's save wrapper keeps the class's save_pretrained when oneshot starts: wrap it first
    clock.wrap(modeling_utils.PreTrainedModel, "save_pretrained", "save.save_pretrained")
    if hasattr(modeling_utils, "safe_save_file"):  # Transformers' one-by-one write (stock, *-onewriter)
        clock.wrap(modeling_utils, "safe_save_file", "save.shard_write")
    try:
        from defuser_quant.checkpoint import concurrent_save
    except ImportError:  # pragma: no cover - the stock variant still has the package on its path
        return
    clock.wrap(concurrent_save, "write_safetensors", "save.shard_write", sync=False)  # the pool's writer
    clock.wrap(concurrent_save._Writes, "wait", "save.shard_wait")
    try:
        from defuser_quant.integrations.llmcompressor import batched_compress
    except ImportError:  # the stock variant blocks our integration's import
        return
    clock.wrap(batched_compress, "compress_in_batches", "save.compress_batched")


def _wrap_barrier(clock: StageClock, ranks: Any) -> None:
    """Time ``ranks``' barrier calls (it calls ``dist.barrier`` through its ``dist`` global)."""
    import torch.distributed as dist

    class _Dist:
        def __getattr__(self, name: str) -> Callable:
            return getattr(dist, name)

        def barrier(self, *args: Any, **kwargs: Any) -> Any:
            with clock.stage("barrier"):
                return dist.barrier(*args, **kwargs)

    ranks.dist = _Dist()
