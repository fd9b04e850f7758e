"""The GPTQModel loader plugin with real GPTQModel 7.6 (no mocks), on tiny models, CPU.

One tiny qwen3_moe (hidden 128, moe_intermediate 128 so group size 128 applies, 8 experts,
top-2, bf16) and a BPE tokenizer trained offline on CPython's pydoc prose are built once per
session. The end-to-end runs (GPTQ, AWQ, excluded experts, a generated definition) are marked
slow; they still run in CI.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

BITS, GROUP = 4, 128


# ----- fixtures ----------------------------------------------------------------------------
def _tokenizer(path: Path):
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<|endoftext|>", "<|pad|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(list(topics.values()), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", bos_token="<|endoftext|>")
    fast.save_pretrained(path)
    return fast, list(topics.values())


def _common(tok) -> dict:
    return dict(
        vocab_size=len(tok), hidden_size=128, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )


def _save_model(config, path: Path, *, fused: bool = False) -> nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.bfloat16).eval()
    model.save_pretrained(path, save_original_format=not fused)
    return model


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Tokenizer, calibration rows, and a tiny qwen3_moe saved per expert (and fused)."""
    from transformers import Qwen3MoeConfig

    root = tmp_path_factory.mktemp("gptqmodel_tiny")
    src, fused = root / "src", root / "src_fused"
    tok, texts = _tokenizer(src)
    _tokenizer(fused)
    config = Qwen3MoeConfig(**_common(tok), moe_intermediate_size=128, head_dim=32, num_experts=8, num_experts_per_tok=2)
    model = _save_model(config, src)
    _save_model(config, fused, fused=True)
    calibration = []
    for text in texts:
        enc = tok(text[:2000], truncation=True, max_length=128)
        if len(enc["input_ids"]) >= 16:
            calibration.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
        if len(calibration) == 32:
            break
    ids = tok("The import statement binds names in the local namespace", return_tensors="pt")
    return {"root": root, "src": src, "fused": fused, "tok": tok, "texts": texts, "model": model, "calibration": calibration, "ids": ids}


@pytest.fixture(scope="module")
def plugin():
    from defuser_quant.integrations import gptqmodel as plugin_module

    plugin_module.install()
    yield plugin_module
    plugin_module.uninstall()


def _logits(model, ids) -> torch.Tensor:
    with torch.inference_mode():
        return model(**ids).logits.float()


def _expert_projections(model: nn.Module) -> dict[str, nn.Module]:
    from defuser_quant.core.defused import DefusedExperts

    out = {}
    for path, block in model.named_modules():
        if isinstance(block, DefusedExperts):
            for i, expert in enumerate(block):
                for name in expert.names.as_tuple():
                    out[f"{path}.{i}.{name}"] = getattr(expert, name)
    return out


def _tensors(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        out.update(load_file(file))
    return out


def _quantize(plugin, src: Path, calibration, *, method: str = "gptq", **kw):
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    qcfg_kw = {k: kw.pop(k) for k in ("offload_to_disk", "dynamic") if k in kw}
    qcfg = QuantizeConfig(bits=BITS, group_size=GROUP, method=method, **qcfg_kw)
    model = GPTQModel.load(str(src), qcfg)
    backend = {"backend": BACKEND.AWQ_TORCH} if method == "awq" else {}
    result = plugin.quantize_with_defuser(model, calibration, batch_size=4, **backend, **kw)
    return model, result


# ----- errors without (the right) gptqmodel ------------------------------------------------
def test_core_and_plugin_import_without_gptqmodel():
    code = (
        "import sys; sys.modules['gptqmodel'] = None\n"
        "import defuser_quant, defuser_quant.integrations.gptqmodel as g\n"
        "try:\n    g.install()\nexcept ImportError as e:\n    print('ERR', e)\n"
    )
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "gptqmodel==7.6.0" in out.stdout and "pip install" in out.stdout


def test_missing_gptqmodel_gives_the_pin(monkeypatch):
    from defuser_quant.integrations.gptqmodel import GPTQModelUnavailableError, install, is_installed, uninstall

    uninstall()  # start from the uninstalled state whatever ran before
    monkeypatch.setitem(sys.modules, "gptqmodel", None)
    with pytest.raises(ImportError, match=r"gptqmodel==7\.6\.0") as info:
        install()
    assert isinstance(info.value, GPTQModelUnavailableError)
    assert "pip install" in str(info.value)
    assert not is_installed()


def test_wrong_gptqmodel_version_gives_the_pin(monkeypatch):
    import gptqmodel

    from defuser_quant.integrations.gptqmodel import install, is_installed, uninstall

    uninstall()
    monkeypatch.setattr(gptqmodel, "__version__", "7.8.0")
    with pytest.raises(ImportError, match=r"found gptqmodel 7\.8\.0.*gptqmodel==7\.6\.0"):
        install()
    assert not is_installed()
    monkeypatch.setattr(gptqmodel, "__version__", "7.7.0")  # same seams as 7.6 (docs/gptqmodel.md)
    install()
    assert is_installed()
    uninstall()


# ----- install / uninstall ------------------------------------------------------------------
def test_install_is_idempotent_and_uninstall_restores():
    from gptqmodel.models import auto, loader, writer

    from defuser_quant.integrations import gptqmodel as plugin_module

    if plugin_module.is_installed():
        pytest.skip("the module's plugin fixture is active")
    from gptqmodel.models.base import BaseQModel

    before = (loader.defuser, loader._convert_model_with_defuser, auto.check_and_get_model_definition, writer.get_state_dict_for_save,
              BaseQModel.save)
    plugin_module.install()
    plugin_module.install()
    try:
        assert loader.defuser is plugin_module.shim()
        assert loader._convert_model_with_defuser == plugin_module.shim().convert_with_definition
        assert auto.check_and_get_model_definition is not before[2]
        assert BaseQModel.save is not before[4] and BaseQModel.save.__wrapped__ is before[4]
    finally:
        plugin_module.uninstall()
    after = (loader.defuser, loader._convert_model_with_defuser, auto.check_and_get_model_definition, writer.get_state_dict_for_save,
             BaseQModel.save)
    assert after == before
    assert not plugin_module.is_installed()


# ----- storage ownership (the writer's shared-storage dedup) ----------------------------------
def test_unguarded_writer_drops_expert_views_and_guard_keeps_them():
    from gptqmodel.utils.model import get_state_dict_for_save

    from defuser_quant import convert_model
    from defuser_quant.integrations.gptqmodel.storage import guarded_state_dict_for_save, shared_expert_tensors
    from tiny import build

    model, _ = build("qwen3_moe")
    convert_model(model)
    expected = {k for k in model.state_dict() if ".experts." in k}
    assert shared_expert_tensors(model)
    unguarded = {k for k in get_state_dict_for_save(model) if ".experts." in k}
    assert len(unguarded) < len(expected), "GPTQModel's writer no longer drops shared storage: revisit the guard"
    views = {k: v.clone() for k, v in model.state_dict().items() if ".experts." in k}
    guarded = guarded_state_dict_for_save(get_state_dict_for_save)(model)
    assert {k for k in guarded if ".experts." in k} == expected
    assert not shared_expert_tensors(model)
    assert all(torch.equal(views[k], v) for k, v in model.state_dict().items() if k in views)


# ----- generated definitions ----------------------------------------------------------------
def test_generated_tree_matches_gptqmodels_own_qwen3_moe_definition():
    from gptqmodel.models import auto
    from transformers import Qwen3MoeConfig

    from defuser_quant.integrations.gptqmodel.definitions import generate_definition

    config = Qwen3MoeConfig(num_hidden_layers=2, num_experts=8)
    generated = generate_definition(config)
    stock = auto.MODEL_MAP["qwen3_moe"]
    assert generated.simple_layer_modules(config, None) == stock.simple_layer_modules(config, None)
    assert generated.dynamic_expert_index == "num_experts"
    assert generated.pre_lm_head_norm_module == "model.norm"


@pytest.mark.parametrize("model_type", ["exaone_moe", "flex_olmo", "granitemoeshared", "mistral4"])
def test_generated_definitions_cover_every_expert(model_type):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from defuser_quant.integrations.gptqmodel.definitions import generate_definition
    from defuser_quant.integrations.gptqmodel.loader import uncovered_projections
    from defuser_quant.integrations.gptqmodel.trace import build_meta_model

    config = CONFIG_MAPPING[model_type]()
    config.get_text_config().num_hidden_layers = 3
    cls = generate_definition(config)
    model = build_meta_model(config)
    from defuser_quant.integrations.gptqmodel.naming import align_projection_names

    align_projection_names(model, cls.module_tree)
    assert uncovered_projections(cls, model) == []


# ----- end to end: GPTQ -------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gptq_run(tiny, plugin):
    from gptqmodel import GPTQModel

    root = tiny["root"] / "gptq"
    model, result = _quantize(plugin, tiny["src"], tiny["calibration"], routing="all", coverage_report=root / "coverage.json")
    model.save(str(root / "quantized"))
    calls = list(plugin.shim().calls)
    reloaded = GPTQModel.load(str(root / "quantized"), device="cpu")
    return {"root": root, "model": model, "result": result, "reloaded": reloaded, "calls": calls}


@pytest.mark.slow
def test_gptq_every_expert_projection_is_quantized(gptq_run):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    projections = _expert_projections(gptq_run["model"].model)
    assert len(projections) == 2 * 8 * 3
    assert all(isinstance(m, BaseQuantLinear) for m in projections.values())
    assert {p.method for p in gptq_run["result"].projections} == {"gptq"}
    assert not gptq_run["result"].float_projections()
    assert ("replace_fused_blocks", "qwen3_moe") in gptq_run["calls"]
    assert ("convert_model", "qwen3_moe") in gptq_run["calls"]


@pytest.mark.slow
def test_gptq_routing_all_calibrates_every_expert_on_every_token(gptq_run, tiny):
    result = gptq_run["result"]
    report = result.coverage
    rows = {p.quantizer_samples for p in result.projections}
    assert len(rows) == 1, "every expert projection's quantizer saw the same rows in routing='all'"
    total = rows.pop()
    assert total >= sum(len(r["input_ids"]) for r in tiny["calibration"])
    assert report.totals.under_threshold == 0 and report.totals.forced_tokens > 0
    for layer in report.layers:
        assert [e.calibrated for e in layer.experts] == [total] * 8
        assert all(e.forced > 0 for e in layer.experts)
    # honest counts: what we report per projection is what GPTQ accumulated into its Hessian
    assert all(p.routed + p.forced == p.quantizer_samples for p in result.projections)
    on_disk = json.loads((gptq_run["root"] / "coverage.json").read_text())
    assert on_disk["schema_version"] == 1 and on_disk["totals"]["under_threshold"] == 0
    details = json.loads((gptq_run["root"] / "coverage.projections.json").read_text())
    assert len(details["projections"]) == 48


@pytest.mark.slow
def test_gptq_checkpoint_has_no_float_expert(gptq_run):
    saved = _tensors(gptq_run["root"] / "quantized")
    assert not [k for k in saved if ".experts." in k and k.endswith(".weight")], "an expert was saved in float"
    assert len([k for k in saved if ".experts." in k and k.endswith(".qweight")]) == 48


@pytest.mark.slow
def test_gptq_reload_generates(gptq_run, tiny):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    reloaded = gptq_run["reloaded"]
    assert all(isinstance(m, BaseQuantLinear) for m in _expert_projections(reloaded.model).values())
    ids = tiny["ids"]
    generated = reloaded.generate(**ids, max_new_tokens=6, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 6


@pytest.mark.slow
def test_dequantized_fused_checkpoint_loads_in_stock_transformers(gptq_run, tiny):
    from transformers import AutoModelForCausalLM
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from defuser_quant.integrations.gptqmodel import save_dequantized_fused

    out = save_dequantized_fused(gptq_run["root"] / "quantized", gptq_run["root"] / "dequantized")
    keys = _tensors(out)
    assert "model.layers.0.mlp.experts.gate_up_proj" in keys and keys["model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 256, 128)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model.model.layers[0].mlp.experts) is Qwen3MoeExperts
    ids = tiny["ids"]
    got, want = _logits(model, ids), _logits(gptq_run["reloaded"].model, ids)
    assert (got - want).abs().max().item() < 0.03 * want.abs().max().item()


# ----- end to end: AWQ ---------------------------------------------------------------------------
@pytest.mark.slow
def test_awq_end_to_end(tiny, plugin):
    from gptqmodel import GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    root = tiny["root"] / "awq"
    model, result = _quantize(
        plugin, tiny["src"], tiny["calibration"][:16], method="awq", routing="routed", min_tokens=1, offload_to_disk=False
    )
    assert all(isinstance(m, BaseQuantLinear) for m in _expert_projections(model.model).values())
    assert {p.method for p in result.projections} == {"awq"}
    ids = tiny["ids"]
    in_memory = _logits(model.model, ids)  # AWQ's in-memory modules are inference-ready
    model.save(str(root))
    reloaded = GPTQModel.load(str(root), device="cpu")
    assert all(isinstance(m, BaseQuantLinear) for m in _expert_projections(reloaded.model).values())
    got = _logits(reloaded.model, ids)
    assert (got - in_memory).abs().max().item() < 0.03 * in_memory.abs().max().item()
    assert reloaded.generate(**ids, max_new_tokens=4, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 4


# ----- excluded experts keep their float weights; policies ------------------------------------------
@pytest.mark.slow
def test_excluded_experts_are_saved_whole_from_a_fused_source(tiny, plugin):
    """Fused source + no offload: excluded experts are views of one fused tensor until saved."""
    from gptqmodel import GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    root = tiny["root"] / "excluded"
    model, result = _quantize(
        plugin, tiny["fused"], tiny["calibration"][:8], routing="budgeted", min_tokens=64,
        offload_to_disk=False, dynamic={r"-:.*experts\.[0-3]\..*": {}},
    )
    excluded = {p.module for p in result.projections if p.method == "float (excluded)"}
    assert len(excluded) == 2 * 4 * 3
    assert all(p.forced > 0 or p.routed >= 64 for p in result.projections if p.method == "gptq")
    # GPTQModel 7.6 keeps v1 zero points in memory after quantize() (its kernels need v2 and
    # only the loader converts), so the in-memory model is compared through its dequantized
    # weights: the same packed tensors, run in float by stock Transformers.
    reference = plugin.save_dequantized_fused(model, root.with_name("excluded_in_memory"))
    packed = {
        f"{name}.{t}": getattr(module, t).detach().clone()
        for name, module in _expert_projections(model.model).items()
        if isinstance(module, BaseQuantLinear)
        for t in ("qweight", "qzeros", "scales", "g_idx")
    }
    model.save(str(root))
    saved = _tensors(root)
    assert len(packed) == 2 * 4 * 3 * 4
    for key, tensor in packed.items():  # the checkpoint holds exactly the in-memory quantized tensors
        assert torch.equal(saved[key], tensor), key
    source = tiny["model"]
    for layer in range(2):
        experts = source.model.layers[layer].mlp.experts
        for e in range(4):
            gate, up = experts.gate_up_proj[e].chunk(2, dim=0)
            prefix = f"model.layers.{layer}.mlp.experts.{e}."
            assert torch.equal(saved[prefix + "gate_proj.weight"], gate)
            assert torch.equal(saved[prefix + "up_proj.weight"], up)
            assert torch.equal(saved[prefix + "down_proj.weight"], experts.down_proj[e])
    reloaded = GPTQModel.load(str(root), device="cpu")
    projections = _expert_projections(reloaded.model)
    assert sum(isinstance(m, BaseQuantLinear) for m in projections.values()) == 2 * 4 * 3
    assert sum(type(m) is nn.Linear for m in projections.values()) == 2 * 4 * 3
    from transformers import AutoModelForCausalLM

    ids = tiny["ids"]
    got, want = _logits(reloaded.model, ids), _logits(AutoModelForCausalLM.from_pretrained(reference), ids)
    assert (got - want).abs().max().item() < 0.03 * want.abs().max().item()


@pytest.mark.slow
def test_error_policy_names_starved_experts_and_writes_the_report(tiny, plugin):
    from defuser_quant.calibration import CoverageError

    report = tiny["root"] / "starved" / "coverage.json"
    with pytest.raises(CoverageError) as info:
        _quantize(plugin, tiny["src"], tiny["calibration"][:4], routing="routed", min_tokens=10**6, policy="error", coverage_report=report)
    assert len(info.value.experts) == 16
    assert json.loads(report.read_text())["totals"]["under_threshold"] == 16


def test_our_routing_and_gptqmodel_moe_routing_are_exclusive(tiny, plugin):
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.quantization.config import ExpertsRoutingOverride, MoEConfig

    qcfg = QuantizeConfig(bits=BITS, group_size=GROUP, moe=MoEConfig(routing=ExpertsRoutingOverride("all")))
    model = GPTQModel.load(str(tiny["src"]), qcfg)
    with pytest.raises(ValueError, match="both change MoE calibration routing"):
        plugin.quantize_with_defuser(model, tiny["calibration"][:4], routing="all")


# ----- names and definitions at load ---------------------------------------------------------------
def test_mixtral_experts_take_the_definitions_names(tiny, plugin):
    from gptqmodel import GPTQModel, QuantizeConfig
    from transformers import MixtralConfig

    from defuser_quant.core.naming import projection_names

    assert projection_names("mixtral", True).as_tuple() == ("w1", "w3", "w2")  # our core's own names
    src = tiny["root"] / "mixtral"
    config = MixtralConfig(**_common(tiny["tok"]), num_local_experts=4, num_experts_per_tok=2)
    _save_model(config, src)
    tiny["tok"].save_pretrained(src)
    model = GPTQModel.load(str(src), QuantizeConfig(bits=BITS, group_size=GROUP))
    expert = model.model.model.layers[0].mlp.experts[0]
    assert [n for n, _ in expert.named_children()] == ["gate_proj", "up_proj", "down_proj"]
    assert callable(model.model.model.layers[0].mlp.experts._apply_gate)


@pytest.mark.slow
def test_mismatched_definition_is_refused_then_replaced(tiny, plugin):
    """GPTQModel's granitemoe definition expects Defuser's layout: refused, then replaced by a generated one."""
    from gptqmodel import GPTQModel, QuantizeConfig
    from gptqmodel.models import auto
    from gptqmodel.models.definitions.granitemoe import GraniteMoeQModel
    from transformers import AutoConfig, GraniteMoeConfig

    from defuser_quant.integrations.gptqmodel import DefinitionMismatchError

    src = tiny["root"] / "granitemoe"
    config = GraniteMoeConfig(**_common(tiny["tok"]), num_local_experts=4, num_experts_per_tok=2)
    _save_model(config, src)
    tiny["tok"].save_pretrained(src)
    with pytest.raises(DefinitionMismatchError, match="register_generated_definition"):
        GPTQModel.load(str(src), QuantizeConfig(bits=BITS, group_size=GROUP))
    generated = plugin.register_generated_definition("granitemoe", AutoConfig.from_pretrained(src), replace=True)
    assert issubclass(generated, GraniteMoeQModel) and auto.MODEL_MAP["granitemoe"] is generated
    model, result = _quantize(plugin, src, tiny["calibration"][:8], routing="all")
    assert {p.method for p in result.projections} == {"gptq"} and len(result.projections) == 2 * 4 * 3


@pytest.mark.slow
def test_generated_definition_end_to_end_flex_olmo(tiny, plugin):
    """flex_olmo has no GPTQModel definition: one is generated, and it quantizes, saves and reloads."""
    from gptqmodel import GPTQModel
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear
    from transformers import AutoModelForCausalLM, FlexOlmoConfig

    root = tiny["root"] / "flex_olmo"
    config = FlexOlmoConfig(**_common(tiny["tok"]), num_experts=8, num_experts_per_tok=2)
    _save_model(config, root / "src")
    tiny["tok"].save_pretrained(root / "src")
    model, result = _quantize(plugin, root / "src", tiny["calibration"][:16], routing="all")
    assert getattr(type(model), "defuser_quant_generated", False)
    assert "flex_olmo" in plugin.generated_definitions()
    assert {p.method for p in result.projections} == {"gptq"}
    assert result.coverage.totals.under_threshold == 0
    floats = [n for n, m in model.model.named_modules() if type(m) is nn.Linear]
    assert floats == ["lm_head"]
    model.save(str(root / "quantized"))
    reloaded = GPTQModel.load(str(root / "quantized"), device="cpu")
    assert all(isinstance(m, BaseQuantLinear) for m in _expert_projections(reloaded.model).values())
    dequantized = AutoModelForCausalLM.from_pretrained(plugin.save_dequantized_fused(root / "quantized", root / "dequantized"))
    ids = tiny["ids"]
    got, want = _logits(reloaded.model, ids), _logits(dequantized, ids)
    assert (got - want).abs().max().item() < 0.03 * want.abs().max().item()
    assert reloaded.generate(**ids, max_new_tokens=4, do_sample=False).shape[1] == ids["input_ids"].shape[1] + 4
