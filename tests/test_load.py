"""``defuser_quant.load``: experts defused and, when quantized, kept quantized, compared with the
quantizer's own loader (``GPTQModel.load``, in a fresh process) and with stock Transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig
from transformers.modeling_utils import PreTrainedModel

import defuser_quant as dq
from defuser_quant.assets import TINY_MOE_PATH
from defuser_quant.core import patching
from defuser_quant.core.load_check import ExpertLoadError
from defuser_quant.loading import LoadError
from defuser_quant.loading.load import expert_projections, is_quantized_module
from quantized_checkpoints import broken_copy, quantized_checkpoint

IDS = torch.arange(1, 33).unsqueeze(0)
ORIGINAL = PreTrainedModel.__dict__["_finalize_model_loading"]

_GPTQMODEL_LOAD = """
import sys, torch
torch.set_num_threads(1)
from gptqmodel import GPTQModel
model = GPTQModel.load(sys.argv[1], device="cpu").model
with torch.no_grad():
    torch.save(model(input_ids=torch.arange(1, 33).unsqueeze(0)).logits, sys.argv[2])
"""


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _nbytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _gptqmodel_load_logits(path, tmp_path) -> torch.Tensor:
    # A fresh process: stock GPTQModel.load installs Defuser's class patch for the whole process.
    out = tmp_path / "gptqmodel_logits.pt"
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2"}
    proc = subprocess.run([sys.executable, "-c", _GPTQMODEL_LOAD, str(path), str(out)], capture_output=True, text=True,
                          timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out).float()


@pytest.mark.slow
def test_gptq_checkpoint_loads_quantized_and_equals_gptqmodel_load(tmp_path, tmp_path_factory):
    path = quantized_checkpoint("gptqmodel", tmp_path_factory.getbasetemp())
    model = dq.load(path)
    projections = expert_projections(model)
    assert len(projections) == 192 and all(is_quantized_module(m) for m in projections.values())
    assert torch.equal(_logits(model), _gptqmodel_load_logits(path, tmp_path))
    # Stock Transformers (GPTQ through optimum) leaves the experts random: what load exists to prevent.
    stock = AutoModelForCausalLM.from_pretrained(path)
    assert (_logits(stock) - _logits(model)).abs().max() > 1
    assert _nbytes(model) < 0.5 * _nbytes(stock)
    assert not patching._PATCHED and PreTrainedModel.__dict__["_finalize_model_loading"] is ORIGINAL


@pytest.mark.slow
def test_compressed_tensors_checkpoint_loads_quantized_and_equals_stock(tmp_path_factory):
    path = quantized_checkpoint("llmcompressor", tmp_path_factory.getbasetemp())
    model = dq.load(path)
    projections = expert_projections(model)
    assert len(projections) == 192 and all(hasattr(m, "weight_packed") for m in projections.values())
    stock = AutoModelForCausalLM.from_pretrained(path)  # dequantizes the experts into fused float tensors
    assert stock.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    loaded_bytes, stock_bytes = _nbytes(model), _nbytes(stock)
    assert loaded_bytes < 0.5 * stock_bytes
    assert torch.equal(_logits(model), _logits(stock))


@pytest.mark.slow
def test_experts_dequantized_by_the_integration_are_refused(tmp_path_factory):
    path = quantized_checkpoint("llmcompressor", tmp_path_factory.getbasetemp())
    with pytest.raises(LoadError, match=r"192 expert projection\(s\) stored quantized loaded as float weights"):
        dq.load(path, quantization_config=CompressedTensorsConfig(dequantize=True))


def test_float_checkpoint_loads_defused_with_stock_logits():
    model = dq.load(TINY_MOE_PATH)
    assert len(expert_projections(model)) == 192
    assert torch.equal(_logits(model), _logits(AutoModelForCausalLM.from_pretrained(TINY_MOE_PATH)))
    assert not patching._PATCHED


def test_fused_float_checkpoint_loads_defused(tmp_path):
    fused = tmp_path / "fused"
    stock = AutoModelForCausalLM.from_pretrained(TINY_MOE_PATH)
    stock.save_pretrained(fused, save_original_format=False)  # the v5 fused layout on disk
    with open(fused / "config.json") as f:
        assert json.load(f)["model_type"] == "qwen3_moe"
    from safetensors import safe_open

    with safe_open(str(fused / "model.safetensors"), "pt") as f:
        assert "model.layers.0.mlp.experts.gate_up_proj" in set(f.keys())
    model = dq.load(fused)
    assert len(expert_projections(model)) == 192
    assert torch.equal(_logits(model), _logits(stock))


def test_a_family_patched_by_the_caller_stays_patched():
    dq.replace_fused_blocks("qwen3_moe")
    dq.load(TINY_MOE_PATH)
    assert "qwen3_moe" in patching._PATCHED


def test_an_expert_that_does_not_load_raises(tmp_path):
    broken = broken_copy(TINY_MOE_PATH, tmp_path / "b", lambda t: t.pop("model.layers.3.mlp.experts.0.up_proj.weight"))
    with pytest.raises(ExpertLoadError, match=r"model\.layers\.3\.mlp\.experts\.0\.up_proj\.weight"):
        dq.load(broken)
    assert not patching._PATCHED  # restored although the load failed


@pytest.mark.parametrize("qcfg, message", [
    ({"quant_method": "mxfp4"}, "'mxfp4' is not supported by defuser_quant.load"),
    ({"quant_method": "bitsandbytes"}, "'bitsandbytes' is not supported"),
])
def test_unsupported_formats_are_refused(tmp_path, qcfg, message):
    broken = broken_copy(TINY_MOE_PATH, tmp_path / "b", lambda t: None)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "quantization_config": qcfg}))
    with pytest.raises(LoadError, match=message):
        dq.load(broken)


def test_not_a_checkpoint_is_refused(tmp_path):
    with pytest.raises(LoadError, match="no config.json"):
        dq.load(tmp_path)


@pytest.mark.slow
def test_fp8_per_expert_checkpoint_loads_with_fp8_experts(tmp_path_factory):
    from defuser_quant.checkpoint.check import check_checkpoint

    path = quantized_checkpoint("llmcompressor", tmp_path_factory.getbasetemp(), method="rtn", scheme="FP8_DYNAMIC")
    assert check_checkpoint(path).schemes == {"fp8 8-bit channel": 192}
    model = dq.load(path)
    projections = expert_projections(model)
    assert len(projections) == 192 and all(m.weight.dtype == torch.float8_e4m3fn for m in projections.values())
    stock = AutoModelForCausalLM.from_pretrained(path)
    assert _nbytes(model) < 0.7 * _nbytes(stock)
    reference = _logits(AutoModelForCausalLM.from_pretrained(TINY_MOE_PATH))
    assert (_logits(model) - reference).abs().max() < 0.3 * reference.abs().max()  # quantized, still the model


@pytest.mark.slow
def test_awq_checkpoint_loads_quantized_and_equals_gptqmodel_load(tmp_path, tmp_path_factory):
    path = quantized_checkpoint("gptqmodel", tmp_path_factory.getbasetemp(), method="awq")
    model = dq.load(path)
    projections = expert_projections(model)
    assert len(projections) == 192 and all(is_quantized_module(m) for m in projections.values())
    assert torch.equal(_logits(model), _gptqmodel_load_logits(path, tmp_path))


def test_a_per_expert_checkpoint_of_a_family_stock_cannot_load(tmp_path):
    # gpt_oss: stock Transformers has no per-expert mapping (interleaved, transposed fused storage).
    from tiny import FAMILIES

    config_fn, cls = FAMILIES["gpt_oss"]
    torch.manual_seed(0)
    model = cls(config_fn()).eval()
    reference = _logits(model)
    dq.convert_model(model)
    model.save_pretrained(tmp_path / "gpt_oss")
    loaded = dq.load(tmp_path / "gpt_oss")
    assert len(expert_projections(loaded)) == 2 * 8 * 3
    torch.testing.assert_close(_logits(loaded), reference, rtol=0, atol=1e-6)


def test_a_missing_loader_package_is_named_with_the_install_line(tmp_path, monkeypatch):
    import importlib.util

    pytest.importorskip("gptqmodel")  # the message names only what is missing: here optimum alone
    broken = broken_copy(TINY_MOE_PATH, tmp_path / "b", lambda t: None)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "quantization_config": {"quant_method": "gptq", "bits": 4}}))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "optimum" else real(name, *a))
    with pytest.raises(LoadError, match="loading a gptq checkpoint needs optimum: pip install gptqmodel optimum"):
        dq.load(broken)


# ----- checkpoints of other tools and irregular families (issue 15) -----------------------------


@pytest.mark.slow
def test_llmcompressor_awq_asymmetric_loads_with_zero_points_and_equals_llmcompressor(tmp_path_factory):
    from other_tool_checkpoints import llmcompressor_awq

    path = llmcompressor_awq(tmp_path_factory.getbasetemp())
    model = dq.load(path)
    projections = expert_projections(model)
    assert len(projections) == 192 and all(hasattr(m, "weight_packed") and hasattr(m, "weight_zero_point")
                                           for m in projections.values())
    assert torch.equal(_logits(model), torch.load(path / "inmemory_logits.pt"))  # llm-compressor's own model
    with pytest.raises(RuntimeError, match="automatic conversion of the weights"):
        AutoModelForCausalLM.from_pretrained(path)  # stock Transformers 5.17 cannot merge asymmetric experts


@pytest.mark.slow
def test_autoawq_style_config_loads_like_gptqmodels(tmp_path_factory, tmp_path):
    from other_tool_checkpoints import autoawq_style
    from test_check import _down_proj_float

    base = tmp_path_factory.getbasetemp()
    model = dq.load(autoawq_style(base))
    assert all(is_quantized_module(m) for m in expert_projections(model).values())
    assert torch.equal(_logits(model), _logits(dq.load(quantized_checkpoint("gptqmodel", base, method="awq"))))
    # an AutoAWQ-style suffix skip list: every down_proj stays a float Linear, gate/up quantized
    skipped = broken_copy(autoawq_style(base, ["gate", "down_proj"]), tmp_path / "skip", _down_proj_float)
    projections = expert_projections(dq.load(skipped))
    down = {n: m for n, m in projections.items() if n.endswith("down_proj")}
    assert len(down) == 64 and all(type(m) is torch.nn.Linear and m.weight.dtype == torch.bfloat16 for m in down.values())
    assert sum(is_quantized_module(m) for m in projections.values()) == 128


@pytest.mark.slow
@pytest.mark.parametrize("family", ["dbrx", "granitemoe"])
def test_irregular_family_quantized_by_llmcompressor_loads_quantized(family, tmp_path_factory):
    from other_tool_checkpoints import llmcompressor_irregular

    path = llmcompressor_irregular(family, tmp_path_factory.getbasetemp())
    model = dq.load(path)
    projections = expert_projections(model)
    assert len(projections) == 48 and all(hasattr(m, "weight_packed") for m in projections.values())
    ids = torch.arange(1, 17).unsqueeze(0)
    reference = torch.load(path / "inmemory_logits.pt")  # llm-compressor's quantized model, in memory
    stock = AutoModelForCausalLM.from_pretrained(path)  # no per-expert mapping for the family: random experts
    with torch.no_grad():
        ours, theirs = (m(input_ids=ids).logits.float() for m in (model, stock))
    torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5)
    assert (theirs - reference).abs().max() > 100 * (ours - reference).abs().max().clamp(min=1e-6)
