"""GPTQModel with the grouped calibration forward and the kernel recorder (real GPTQModel 7.6, CPU)."""

from __future__ import annotations

import time
from collections import Counter

import pytest
import torch
from test_gptqmodel_plugin import _tensors, plugin, tiny  # noqa: F401  (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _run(plugin, tiny, tmp_path, name: str, *, grouped: bool, routing: str = "routed"):
    from gptqmodel import GPTQModel, QuantizeConfig

    from defuser_quant.core.defused import DefusedExperts
    from defuser_quant.integrations.gptqmodel.kernels import quant_linear_classes, record_gptq_kernels

    model = GPTQModel.load(str(tiny["src"]), QuantizeConfig(bits=4, group_size=128))
    if grouped:
        # Prove the grouped path ran: the per-expert loop raises.
        for block in model.model.modules():
            if isinstance(block, DefusedExperts):
                block.routed_forward = _loop_ran
    t0 = time.perf_counter()
    with record_gptq_kernels(stages=grouped, model=model.model) as kernels:
        result = plugin.quantize_with_defuser(model, tiny["calibration"], routing=routing, batch_size=4, grouped=grouped)
    kernels.elapsed = time.perf_counter() - t0
    classes = quant_linear_classes(model.model)
    model.save(str(tmp_path / name))
    return result, kernels, classes, _tensors(tmp_path / name)


def _loop_ran(*args, **kwargs):
    raise AssertionError("the per-expert loop ran although the grouped forward applies")


@pytest.mark.slow
@pytest.mark.parametrize("routing", ["routed", "all"])
def test_grouped_gptq_equals_per_expert_loop(plugin, tiny, tmp_path, routing):  # noqa: F811
    loop, kernels_loop, classes, tensors_loop = _run(plugin, tiny, tmp_path, "loop", grouped=False, routing=routing)
    grouped, kernels_grouped, _, tensors_grouped = _run(plugin, tiny, tmp_path, "grouped", grouped=True, routing=routing)
    # Every expert projection's GPTQ saw the same rows.
    key = lambda r: (r.module, r.routed, r.forced, r.quantizer_samples, r.method)  # noqa: E731
    assert sorted(map(key, loop.projections)) == sorted(map(key, grouped.projections))
    # On the CPU grouped_mm rounds like the per-expert matmul: the checkpoints are identical.
    assert tensors_loop.keys() == tensors_grouped.keys()
    different = [k for k in tensors_loop if not torch.equal(tensors_loop[k], tensors_grouped[k])]
    assert not different, different[:5]
    # The recorder saw every GPTQ solve, all on GPTQModel's torch path on the CPU (no fallback there).
    quantized = sum(classes.values())
    assert quantized > 0
    for kernels in (kernels_loop, kernels_grouped):
        assert kernels.solves == Counter({("torch", "cpu"): quantized})
        assert kernels.fallback_reason() is None
        assert "torch@cpu" in kernels.label()
    assert not kernels_loop.stage_seconds
    calls = kernels_grouped.stage_calls
    assert calls["solve"] == quantized and calls["pack"] == calls["finalize"] == quantized
    assert calls["hessian"] >= quantized and calls["experts_forward"] > 0
    # GPTQModel's per-module machinery (host stages): every module materialized, logged, offloaded.
    assert calls["materialize"] >= quantized and calls["log"] == quantized and calls["offload"] == quantized
    # Decoder layer forwards: per layer, a capture pass per subset plus the replay pass, per batch.
    assert calls["forward"] >= 2 * 3 * len(tiny["calibration"]) // 4
    seconds, wall = kernels_grouped.stage_seconds, kernels_grouped.stage_wall_seconds
    assert all(v > 0 for v in seconds.values()) and seconds.keys() == wall.keys()
    # Wall time of a stage never exceeds its summed thread time; nested stages fit in their parent.
    assert all(wall[k] <= seconds[k] + 1e-6 for k in wall)
    assert wall["hessian"] + wall["experts_forward"] <= wall["forward"] * 2 and wall["pack"] <= wall["finalize"] + 1e-6
    busy = kernels_grouped.busy_wall_seconds
    assert max(wall["forward"], wall["solve"], wall["finalize"]) <= busy + 1e-6 <= kernels_grouped.elapsed
    # any stage at all (host stages included) covers the busy time and every host stage's wall time
    any_stage = kernels_grouped.any_stage_wall_seconds
    assert max(busy, wall["materialize"], wall["offload"], wall["log"]) <= any_stage + 1e-6 <= kernels_grouped.elapsed


def test_fallback_reason_names_what_fell_back():
    from defuser_quant.integrations.gptqmodel.kernels import GptqKernelRecord

    fast = GptqKernelRecord(solves=Counter({("cuda_block_update", "cuda"): 768}), block_update_available=True)
    assert fast.fallback_reason() is None and "FALLBACK" not in fast.label()
    slow = GptqKernelRecord(solves=Counter({("torch", "cuda"): 768}), block_update_available=False)
    assert "768 GPTQ solve(s) on CUDA used a torch loop instead of the extension" in slow.fallback_reason()
    assert "did not build or load" in slow.fallback_reason() and slow.label().endswith("(FALLBACK)")
    batched = GptqKernelRecord(solves=Counter({("batched_cuda_block_update", "cuda"): 5}), block_update_available=True)
    assert batched.fallback_reason() is None and batched.label() == "batched-cuda-ext@cuda 5"
    batched_slow = GptqKernelRecord(solves=Counter({("batched_torch", "cuda"): 5}), block_update_available=False)
    assert "5 GPTQ solve(s) on CUDA used a torch loop" in batched_slow.fallback_reason()
    oom = GptqKernelRecord(solves=Counter({("cuda_block_update", "cuda"): 3}), hessian_inverse_cpu_fallbacks=1)
    assert "CPU after a CUDA OOM" in oom.fallback_reason()
    assert oom.as_dict()["gptq_solves"] == {"cuda_block_update@cuda": 3}


@pytest.mark.slow
def test_threshold_fallback_is_counted_as_such_not_as_a_slow_path(plugin, tiny):  # noqa: F811
    from gptqmodel import GPTQModel, QuantizeConfig

    from defuser_quant.integrations.gptqmodel.kernels import quant_linear_classes, record_gptq_kernels

    model = GPTQModel.load(str(tiny["src"]), QuantizeConfig(bits=4, group_size=128))
    with record_gptq_kernels() as kernels:
        result = plugin.quantize_with_defuser(model, tiny["calibration"][:8], policy="fallback", min_tokens=10**6, batch_size=4)
    rtn = [p for p in result.projections if p.method == "rtn-fallback"]
    assert rtn and len(rtn) == len(result.projections)
    assert kernels.solves == Counter({("rtn-fallback", "cpu"): sum(quant_linear_classes(model.model).values())})
    assert kernels.fallback_reason() is None and "rtn-fallback@cpu" in kernels.label()


@pytest.mark.slow
def test_deterministic_mode_is_on_during_quantize_only(plugin, tiny):  # noqa: F811
    from gptqmodel import GPTQModel, QuantizeConfig

    from defuser_quant.core.defused import DefusedExperts

    model = GPTQModel.load(str(tiny["src"]), QuantizeConfig(bits=4, group_size=128))
    seen = []
    for block in model.model.modules():
        if isinstance(block, DefusedExperts):
            block.register_forward_pre_hook(lambda m, a: seen.append(torch.are_deterministic_algorithms_enabled()))
    before = torch.are_deterministic_algorithms_enabled()
    plugin.quantize_with_defuser(model, tiny["calibration"][:8], batch_size=4, deterministic=True, grouped=True)
    assert seen and all(seen)
    assert torch.are_deterministic_algorithms_enabled() == before


def test_stage_clock_counts_nested_calls_once_and_overlap_as_wall_time():
    import threading

    from defuser_quant.integrations.gptqmodel import kernels

    both_inside = threading.Barrier(2)

    with kernels.record_gptq_kernels(stages=True) as record:
        def work():
            with kernels.stage("solve"), kernels.stage("solve"):  # nested on one thread: once
                both_inside.wait(10)  # the two stages overlap for the whole sleep, however late a thread starts
                time.sleep(0.2)

        threads = [threading.Thread(target=work) for _ in range(2)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - t0
    assert record.stage_calls["solve"] == 2
    assert record.stage_seconds["solve"] >= 0.4 and elapsed >= record.stage_wall_seconds["solve"] >= 0.2
    # the overlap (at least the 0.2 s both slept after the barrier) is counted once in the wall time
    assert record.stage_wall_seconds["solve"] <= record.stage_seconds["solve"] - 0.2 + 0.05
    assert record.busy_wall_seconds == pytest.approx(record.stage_wall_seconds["solve"])
    with kernels.stage("solve"):  # no active recorder: nothing to time, nothing fails
        pass
    assert record.stage_calls["solve"] == 2


def test_host_stages_are_timed_without_synchronising_cuda(monkeypatch):
    from defuser_quant.integrations.gptqmodel import kernels

    syncs = []
    monkeypatch.setattr(kernels, "_sync", lambda: syncs.append(1))
    with kernels.record_gptq_kernels(stages=True) as record:
        for name in kernels.HOST_STAGES:
            with kernels.stage(name):
                time.sleep(0.01)
        assert not syncs
        with kernels.stage("solve"):
            pass
        assert len(syncs) == 2  # device stages: before and after
    assert all(record.stage_seconds[name] >= 0.01 for name in kernels.HOST_STAGES)
    assert record.busy_wall_seconds < 0.01  # host stages are not busy time of their own
