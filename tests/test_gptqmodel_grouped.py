"""GPTQModel with the grouped calibration forward and the kernel recorder (real GPTQModel 7.6, CPU)."""

from __future__ import annotations

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
    with record_gptq_kernels(stages=grouped) as kernels:
        result = plugin.quantize_with_defuser(model, tiny["calibration"], routing=routing, batch_size=4, grouped=grouped)
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
    assert calls["solve"] == quantized and calls["pack"] == quantized
    assert calls["hessian"] >= quantized and calls["experts_forward"] > 0
    assert all(seconds > 0 for seconds in kernels_grouped.stage_seconds.values())


def test_fallback_reason_names_what_fell_back():
    from defuser_quant.integrations.gptqmodel.kernels import GptqKernelRecord

    fast = GptqKernelRecord(solves=Counter({("cuda_block_update", "cuda"): 768}), block_update_available=True)
    assert fast.fallback_reason() is None and "FALLBACK" not in fast.label()
    slow = GptqKernelRecord(solves=Counter({("torch", "cuda"): 768}), block_update_available=False)
    assert "768 GPTQ solve(s) on CUDA used GPTQModel's torch loop" in slow.fallback_reason()
    assert "did not build or load" in slow.fallback_reason() and slow.label().endswith("(FALLBACK)")
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
