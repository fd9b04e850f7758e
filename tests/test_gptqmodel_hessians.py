"""GPTQModel's Hessian hooks batched per grouped call (``integrations.gptqmodel.hessians``).

Real GPTQModel 7.6 runs on the tiny qwen3_moe (CPU), each compared with the same run whose hook
chain is called per expert and call (``batched_hessians=False``): the checkpoints must be
identical and every projection's GPTQ must have counted the same samples.
"""

from __future__ import annotations

import logging
import types

import pytest
import torch
from test_gptqmodel_plugin import _tensors, plugin, tiny  # noqa: F401  (fixtures)

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"), pytest.mark.slow]


def _run(plugin, tiny, tmp_path, name: str, *, batched: bool, hessian=None):  # noqa: F811
    from gptqmodel import GPTQModel, QuantizeConfig

    qcfg = QuantizeConfig(bits=4, group_size=128, **({"hessian": hessian} if hessian is not None else {}))
    model = GPTQModel.load(str(tiny["src"]), qcfg)
    result = plugin.quantize_with_defuser(model, tiny["calibration"], batch_size=4, grouped=True, batched_hessians=batched)
    model.save(str(tmp_path / name))
    samples = sorted((p.module, p.quantizer_samples, p.routed) for p in result.projections)
    return result, samples, _tensors(tmp_path / name)


def _same_checkpoint(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different[:5]


@pytest.fixture(scope="module")
def by_hook(plugin, tiny, tmp_path_factory):  # noqa: F811
    """The reference: GPTQModel's hook chain per expert and grouped call."""
    result, samples, tensors = _run(plugin, tiny, tmp_path_factory.mktemp("hooks"), "hooks", batched=False)
    assert result.hessians is None
    return samples, tensors


def test_batched_hessians_give_the_hooks_checkpoint(plugin, tiny, tmp_path, by_hook):  # noqa: F811
    result, samples, tensors = _run(plugin, tiny, tmp_path, "batched", batched=True)
    counts = result.hessians
    # gate leads its shared-input group (up's hook is GPTQModel's no-op follower), down leads alone
    assert counts.batched > 0 and counts.products == counts.batched and counts.by_hook == 0
    assert counts.followers * 2 == counts.batched
    assert samples == by_hook[0]
    _same_checkpoint(tensors, by_hook[1])


def test_without_shared_input_dedup_gate_and_up_share_each_product(plugin, tiny, tmp_path):  # noqa: F811
    from gptqmodel.quantization.config import HessianConfig

    hooks = _run(plugin, tiny, tmp_path, "hooks", batched=False, hessian=HessianConfig(dedup_shared_inputs=False))
    result, samples, tensors = _run(plugin, tiny, tmp_path, "batched", batched=True,
                                    hessian=HessianConfig(dedup_shared_inputs=False))
    counts = result.hessians
    assert counts.followers == 0 and counts.by_hook == 0
    assert counts.products * 3 == counts.batched * 2  # gate and up: one product for both; down: its own
    assert samples == hooks[1]
    _same_checkpoint(tensors, hooks[2])


def test_chunked_accumulation_is_left_to_the_hooks(plugin, tiny, tmp_path):  # noqa: F811
    from gptqmodel.quantization.config import HessianConfig

    hooks = _run(plugin, tiny, tmp_path, "hooks", batched=False, hessian=HessianConfig(chunk_size=5))
    result, samples, tensors = _run(plugin, tiny, tmp_path, "batched", batched=True, hessian=HessianConfig(chunk_size=5))
    assert result.hessians.batched == 0 and result.hessians.by_hook > 0
    assert samples == hooks[1]
    _same_checkpoint(tensors, hooks[2])


def test_out_of_memory_hands_the_rest_to_the_hooks(plugin, tiny, tmp_path, by_hook, monkeypatch):  # noqa: F811
    from defuser_quant.integrations.gptqmodel import hessians

    real = hessians.gram_operands
    calls = {"n": 0}

    def failing(rows, spans):
        calls["n"] += 1
        for i, pair in enumerate(real(rows, spans)):
            if calls["n"] % 3 == 0 and i == 2:  # every third role input, after two products were queued
                raise torch.OutOfMemoryError("CUDA out of memory (test)")
            yield pair

    monkeypatch.setattr(hessians, "gram_operands", failing)
    result, samples, tensors = _run(plugin, tiny, tmp_path, "batched", batched=True)
    assert result.hessians.by_hook > 0 and result.hessians.batched > 0
    assert samples == by_hook[0]
    _same_checkpoint(tensors, by_hook[1])


def test_an_unknown_hook_chain_is_not_batched(plugin, tiny, tmp_path, by_hook, monkeypatch, caplog):  # noqa: F811
    from defuser_quant.integrations.gptqmodel import hessians

    monkeypatch.setattr(hessians, "HOOK_CHAIN_DIGEST", "0" * 16)
    with caplog.at_level(logging.WARNING, logger=hessians.__name__):
        result, samples, tensors = _run(plugin, tiny, tmp_path, "unknown", batched=True)
    assert result.hessians is None
    assert any("differs from 7.6.0's" in r.getMessage() for r in caplog.records)
    assert samples == by_hook[0]
    _same_checkpoint(tensors, by_hook[1])


def test_paused_hooks_accumulate_nothing():
    from defuser_quant.integrations.gptqmodel import hessians

    class Untouchable:
        def __getattr__(self, name):
            raise AssertionError(f"a paused hook touched the task ({name})")

    looper = types.SimpleNamespace(_get_processor_hooks_paused=lambda processor: True)
    rows = torch.ones(4, 3)
    members = [(torch.nn.Linear(3, 2), (looper, "forward_pre_hook", "m", Untouchable()), rows, 0, 4)]
    before = hessians.last_batching().as_dict()
    hessians._run(object(), members)
    assert hessians.last_batching().as_dict() == before


def test_batched_hessians_must_be_a_bool(plugin):  # noqa: F811
    with pytest.raises(TypeError, match="batched_hessians must be a bool"):
        plugin.quantize_with_defuser(types.SimpleNamespace(quantize_config=None), [], batched_hessians="yes")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
@pytest.mark.parametrize("routing", ["routed", "all"])
def test_batched_hessians_on_cuda_give_the_hooks_checkpoint(tiny, tmp_path, routing):  # noqa: F811
    """On CUDA each product is the hook's matmul on the same operands: the same checkpoint,
    tensor for tensor (deterministic kernels in both runs)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps(tiny["calibration"]))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0],
           "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    runs = {}
    for name, extra in (("hooks", ["--hook-hessians"]), ("batched", [])):
        cmd = [sys.executable, str(Path(__file__).with_name("gptqmodel_run.py")), str(tiny["src"]), str(calibration),
               str(tmp_path / name), "--grouped", "--batched", "--deterministic", "--routing", routing, *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        runs[name] = json.loads((tmp_path / name / "result.json").read_text())
    assert runs["hooks"]["hessians"] is None
    counts = runs["batched"]["hessians"]
    assert counts["batched"] > 0 and counts["by_hook"] == 0
    key = lambda r: (r["module"], r["quantizer_samples"], r["routed"], r["forced"])  # noqa: E731
    assert sorted(map(key, runs["hooks"]["projections"])) == sorted(map(key, runs["batched"]["projections"]))
    _same_checkpoint(_tensors(tmp_path / "hooks" / "checkpoint"), _tensors(tmp_path / "batched" / "checkpoint"))
