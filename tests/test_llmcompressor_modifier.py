"""DefuseModifier with real llm-compressor 0.14 on the CPU: registration, linearization, errors,
end-to-end GPTQ / AWQ / FP8 runs on a tiny qwen3_moe, stock reloads and re-fused checkpoints."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("llmcompressor")

from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

import defuser_quant.integrations.llmcompressor as dq_llmc  # noqa: E402
from defuser_quant import DefusedExperts, DefuserQuantError  # noqa: E402
from defuser_quant.assets import CORPUS_DIR  # noqa: E402
from defuser_quant.calibration import CoverageError, CoverageReport  # noqa: E402
from defuser_quant.checkpoint import concurrent_save  # noqa: E402

LAYERS, EXPERTS, TOP_K, HIDDEN, MOE_I = 2, 8, 2, 128, 128
PROJS = ("gate_proj", "up_proj", "down_proj")
IGNORE = ["lm_head", "re:.*mlp.gate$"]
SAMPLES, SEQ = 8, 64


# ----- fixtures: a tiny qwen3_moe with an offline-trained tokenizer ----------------------------


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread for the whole module (module-scoped, so it also covers the module-scoped
    oneshot runs): these tiny models gain nothing from threads, and on a busy 2-core machine spinning
    OpenMP workers made the AWQ run ~8x slower (57 s vs 7 s measured)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _corpus_lines() -> list[str]:
    text = (CORPUS_DIR / "train.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if len(line.strip()) > 20]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """2 layers, H 128, moe_intermediate 128, intermediate 256, 8 experts top-2, bf16, BPE 512 tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    path = tmp_path_factory.mktemp("tiny_qwen3_moe")
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<unk>", "<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_corpus_lines(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")
    tokenizer.save_pretrained(path)
    config = Qwen3MoeConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=256, moe_intermediate_size=MOE_I,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=EXPERTS,
        num_experts_per_tok=TOP_K, max_position_embeddings=256, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    return path


def _calibration_dataset():
    from datasets import Dataset

    lines = _corpus_lines()
    return Dataset.from_dict({"text": [" ".join(lines[i * 12 : (i + 1) * 12]) for i in range(SAMPLES)]})


@pytest.fixture(scope="session")
def calib_dataset():
    return _calibration_dataset()


@pytest.fixture(scope="session")
def eval_ids(tiny_dir) -> torch.Tensor:
    from transformers import AutoTokenizer

    text = (CORPUS_DIR / "heldout.txt").read_text(encoding="utf-8")[:2000]
    return AutoTokenizer.from_pretrained(tiny_dir)(text, return_tensors="pt").input_ids[:, :48]


def _oneshot(model, dataset, recipe, output_dir, **kw):
    from llmcompressor import oneshot

    # llm-compressor shuffles the calibration rows by default with a sampler seeded from the process's RNG, which torch
    # seeds at random: two runs then accumulate their Hessians in other orders, and one borderline weight can round
    # the other way. The rows in their own order make two runs' checkpoints comparable bit for bit.
    args = {} if dataset is None else {"dataset": dataset, "num_calibration_samples": SAMPLES, "max_seq_length": SEQ,
                                       "shuffle_calibration_samples": False}
    args.update(kw)
    return oneshot(model=str(model), recipe=recipe, output_dir=str(output_dir), **args)


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _keys(folder: Path) -> dict[str, tuple[list[int], str]]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                out[key] = (list(piece.get_shape()), piece.get_dtype())
    return out


def _assert_every_expert_quantized(keys: dict, params: dict[str, str]) -> None:
    """Every ``model.layers.{l}.mlp.experts.{e}.{proj}`` has ``params`` (name -> safetensors dtype) and nothing fused."""
    for layer in range(LAYERS):
        for e in range(EXPERTS):
            for proj in PROJS:
                prefix = f"model.layers.{layer}.mlp.experts.{e}.{proj}"
                for param, dtype in params.items():
                    assert f"{prefix}.{param}" in keys, f"{prefix}.{param} missing"
                    assert keys[f"{prefix}.{param}"][1] == dtype, (prefix, param, keys[f"{prefix}.{param}"])
                if "weight" not in params:
                    assert f"{prefix}.weight" not in keys
    assert not [k for k in keys if "gate_up_proj" in k or k.endswith("experts.down_proj")]


def _close(a: torch.Tensor, b: torch.Tensor, *, cos: float, rel: float) -> None:
    similarity = torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()
    worst = (a - b).abs().max().item() / b.abs().max().item()
    assert similarity > cos and worst < rel, (similarity, worst)


def _stock(path: Path):
    return AutoModelForCausalLM.from_pretrained(path).eval()


# ----- import, version, registration -----------------------------------------------------------


def test_importing_integrations_does_not_import_llmcompressor():
    code = (
        "import sys, defuser_quant, defuser_quant.integrations, defuser_quant.integrations.gptqmodel.compat\n"
        "assert 'llmcompressor' not in sys.modules, 'llmcompressor imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_version_pin_is_enforced_with_the_fix_in_the_message():
    from importlib.metadata import PackageNotFoundError

    from defuser_quant.integrations.llmcompressor.compat import check_llmcompressor

    assert check_llmcompressor() == "0.14.0.1"
    with pytest.raises(ImportError, match=r"found 0\.15\.0.*pip install 'defuser-quant\[llmcompressor\]'"):
        check_llmcompressor(version_of=lambda name: "0.15.0")

    def missing(name):
        raise PackageNotFoundError(name)

    with pytest.raises(dq_llmc.LlmCompressorUnavailableError, match=r"llmcompressor==0\.14\.0\.1, which is not installed"):
        check_llmcompressor(version_of=missing)


def test_defuse_modifier_resolves_by_name_from_yaml_and_unregisters():
    from llmcompressor.modifiers.factory import ModifierFactory
    from llmcompressor.recipe import Recipe

    yaml = """
    quant_stage:
      quant_modifiers:
        DefuseModifier: {routing: budgeted, min_tokens: 32, filter: ["-:layers\\\\.1\\\\."], refuse: false}
        QuantizationModifier: {targets: [Linear], scheme: FP8_DYNAMIC, ignore: [lm_head]}
    """
    assert dq_llmc.is_registered()
    recipe = Recipe.create_instance(yaml)
    first = recipe.modifiers[0]
    assert isinstance(first, dq_llmc.DefuseModifier)
    assert (first.routing, first.min_tokens, first.filter) == ("budgeted", 32, ["-:layers\\.1\\."])
    dq_llmc.unregister()
    try:
        assert not dq_llmc.is_registered()
        with pytest.raises(ValueError, match="No modifier of type 'DefuseModifier'"):
            Recipe.create_instance(yaml)
    finally:
        dq_llmc.register()
    assert ModifierFactory._registered_registry["DefuseModifier"] is dq_llmc.DefuseModifier


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"coverage_policy": "fallback"}, "Use routing: budgeted"),
        ({"refuse": True}, "say refuse: dequantized or refuse: fp8_fused"),
        ({"filter": "+:(unclosed"}, "not a valid regular expression"),
        ({"routing": "some"}, "routed"),
        ({"unknown_key": 1}, "Extra inputs are not permitted"),
    ],
)
def test_bad_fields_fail_at_recipe_parse_with_a_clear_message(fields, message):
    with pytest.raises(ValueError, match=message):
        dq_llmc.DefuseModifier(**fields)


# ----- llm-compressor's linearization builds ours ----------------------------------------------


def test_llmcompressor_linearize_builds_defused_experts_zero_copy(tiny_dir, eval_ids):
    from llmcompressor.modeling.moe.linearize import get_non_linearized_moes, linearize_moe

    model = _stock(tiny_dir)
    fused = model.model.layers[0].mlp.experts.gate_up_proj
    ref = _logits(model, eval_ids)
    linearize_moe(model)
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, DefusedExperts)
    assert experts[3].gate_proj.weight.untyped_storage().data_ptr() == fused.untyped_storage().data_ptr()
    assert get_non_linearized_moes(model) == []
    torch.testing.assert_close(_logits(model, eval_ids), ref, rtol=0, atol=0)


def test_config_built_registry_blocks_pickle_into_a_fresh_process(tiny_dir, eval_ids, tmp_path):
    """``load_quantizable_moe`` builds experts from the config with the class our registry answers;
    that generated class pickles through its factory, so ``torch.save(model)`` loads anywhere."""
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D

    from defuser_quant import convert_model
    from defuser_quant.integrations.llmcompressor.linearize import linear_experts_class_for
    from fresh_process import load_in_fresh_process

    model = _stock(tiny_dir)
    fused_cls = type(model.model.layers[0].mlp.experts)
    convert_model(model)
    ref = _logits(model, eval_ids)
    registry_cls = LinearExperts2D._registry.get(fused_cls)
    assert registry_cls is linear_experts_class_for(fused_cls)
    for layer in model.model.layers:
        built = registry_cls(model.config).to(model.dtype)  # what Transformers builds while loading
        built.load_state_dict(layer.mlp.experts.state_dict())
        layer.mlp.experts = built
    torch.testing.assert_close(_logits(model, eval_ids), ref, rtol=0, atol=0)
    torch.save(model, tmp_path / "model.pt")
    (result,) = load_in_fresh_process([tmp_path / "model.pt"], eval_ids, tmp_path).values()
    assert any(c.startswith("defuser_quant.integrations.llmcompressor.linearize.") for c in result["classes"]), result
    torch.testing.assert_close(result["logits"].float(), ref, rtol=0, atol=0)


def test_blocks_llmcompressor_linearized_itself_are_adopted(tiny_dir, eval_ids):
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
    from llmcompressor.modeling.moe.linearize import linearize_moe

    from defuser_quant import fuse_model

    model = _stock(tiny_dir)
    ref = _logits(model, eval_ids)
    dq_llmc.uninstall_linearize_hook()
    try:
        linearize_moe(model)
    finally:
        dq_llmc.install_linearize_hook()
    stock = model.model.layers[1].mlp.experts
    assert isinstance(stock, LinearExperts2D)
    linear = stock[5].down_proj
    assert dq_llmc.adopt_linear_experts(model) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    adopted = model.model.layers[1].mlp.experts
    assert isinstance(adopted, DefusedExperts) and adopted[5].down_proj is linear
    torch.testing.assert_close(_logits(model, eval_ids), ref, rtol=0, atol=0)
    fuse_model(model)
    torch.testing.assert_close(_logits(model, eval_ids), ref, rtol=0, atol=0)


def test_blocks_our_core_cannot_defuse_fall_back_to_llmcompressor(tiny_dir, monkeypatch, caplog):
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
    from llmcompressor.modeling.moe.linearize import linearize_moe

    from defuser_quant import LayoutError
    from defuser_quant.integrations.llmcompressor import linearize as llmcompressor_linearize

    def refuse(experts, config):
        raise LayoutError("a layout the core does not know")

    monkeypatch.setattr(llmcompressor_linearize, "_defuse_one", refuse)
    model = _stock(tiny_dir)
    with caplog.at_level("WARNING", logger=llmcompressor_linearize.__name__):
        linearize_moe(model)
    assert isinstance(model.model.layers[0].mlp.experts, LinearExperts2D)
    assert "cannot defuse Qwen3MoeExperts (a layout the core does not know)" in caplog.text
    assert dq_llmc.linearize_hook_installed()


# ----- errors before any calibration ------------------------------------------------------------


def test_quantizer_listed_before_defuse_modifier_is_rejected(tiny_dir, tmp_path):
    from llmcompressor.modifiers.quantization import QuantizationModifier

    recipe = [QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=IGNORE), dq_llmc.DefuseModifier()]
    with pytest.raises(dq_llmc.RecipeOrderError, match=r"after QuantizationModifier.*List DefuseModifier first"):
        _oneshot(tiny_dir, None, recipe, tmp_path / "out")


@pytest.mark.parametrize(
    ("scheme", "why"),
    [("W4A16", "4-bit int, not float8"), ("FP8_DYNAMIC", "channel scales, not block scales")],
)
def test_scheme_that_cannot_refuse_to_fp8_fails_before_calibration(tiny_dir, tmp_path, scheme, why):
    from llmcompressor.modifiers.quantization import QuantizationModifier

    recipe = [
        dq_llmc.DefuseModifier(refuse="fp8_fused"),
        QuantizationModifier(targets="Linear", scheme=scheme, ignore=IGNORE),
    ]
    with pytest.raises(dq_llmc.RefuseError, match=f"{why}.*FP8_BLOCK.*or use refuse: dequantized"):
        _oneshot(tiny_dir, None, recipe, tmp_path / "out")
    assert not (tmp_path / "out" / "model.safetensors").exists()


# ----- end to end --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gptq_run(tiny_dir, calib_dataset, eval_ids, tmp_path_factory):
    """GPTQ W4A16, routing all, coverage report, refuse: dequantized (Python recipe)."""
    from llmcompressor.modifiers.gptq import GPTQModifier

    out = tmp_path_factory.mktemp("gptq") / "w4a16"
    coverage = out.parent / "coverage.json"
    defuse = dq_llmc.DefuseModifier(routing="all", coverage_report=str(coverage), refuse="dequantized", save_threads=3)
    recipe = [defuse, GPTQModifier(targets="Linear", scheme="W4A16", ignore=IGNORE)]
    with pytest.MonkeyPatch.context() as patch:  # a tiny model: split it as a large one would be (one shard per thread)
        patch.setattr(concurrent_save, "MIN_SHARD_BYTES", 64 * 1024)
        model = _oneshot(tiny_dir, calib_dataset, recipe, out)
    return {"out": out, "coverage": coverage, "modifier": defuse, "logits": _logits(model, eval_ids), "model": model}


@pytest.mark.slow
def test_gptq_w4a16_quantizes_every_expert_with_vllm_names(gptq_run):
    assert isinstance(gptq_run["model"].model.layers[0].mlp.experts, DefusedExperts)
    keys = _keys(gptq_run["out"])
    _assert_every_expert_quantized(keys, {"weight_packed": "I32", "weight_scale": "BF16", "weight_shape": "I64"})
    assert keys["model.layers.1.mlp.experts.7.down_proj.weight_packed"][0] == [HIDDEN, MOE_I // 8]
    config = json.loads((gptq_run["out"] / "config.json").read_text())["quantization_config"]
    assert config["format"] == "pack-quantized"
    assert not [name for name in config["ignore"] if "experts" in name]


@pytest.mark.slow
def test_gptq_checkpoint_shards_were_written_by_the_thread_pool(gptq_run):
    index = json.loads((gptq_run["out"] / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in gptq_run["out"].glob("*.safetensors"))
    assert len(shards) >= 3 and sorted(set(index["weight_map"].values())) == shards
    assert set(index["weight_map"]) == set(_keys(gptq_run["out"]))


@pytest.mark.slow
def test_gptq_routing_all_coverage_report_shows_every_expert_calibrated(gptq_run):
    report = CoverageReport.from_json(gptq_run["coverage"])
    assert report == gptq_run["modifier"].coverage
    assert report.totals.layers == LAYERS and report.totals.experts == LAYERS * EXPERTS
    assert report.under_threshold == [] and report.totals.forced_tokens > 0
    for layer in report.layers:
        tokens = layer.top_k_assignments // TOP_K
        assert tokens >= SAMPLES * 16
        assert [e.calibrated for e in layer.experts] == [tokens] * EXPERTS  # every expert saw every token once


@pytest.mark.slow
def test_gptq_checkpoint_loads_with_stock_transformers_with_in_memory_logits(gptq_run, eval_ids):
    reloaded = _stock(gptq_run["out"])
    assert type(reloaded.model.layers[0].mlp.experts).__name__ == "Qwen3MoeExperts"
    _close(_logits(reloaded, eval_ids), gptq_run["logits"], cos=0.9999, rel=0.01)


@pytest.mark.slow
def test_gptq_refuse_dequantized_writes_a_native_fused_bf16_checkpoint(gptq_run, eval_ids):
    dequantized = Path(f"{gptq_run['out']}-dequantized")
    config = json.loads((dequantized / "config.json").read_text())
    assert "quantization_config" not in config
    assert (dequantized / "tokenizer.json").exists()
    assert all(dtype == "BF16" for _, dtype in _keys(dequantized).values())
    model = _stock(dequantized)
    experts = model.model.layers[1].mlp.experts
    assert type(experts).__name__ == "Qwen3MoeExperts" and experts.gate_up_proj.shape == (EXPERTS, 2 * MOE_I, HIDDEN)
    _close(_logits(model, eval_ids), gptq_run["logits"], cos=0.9999, rel=0.01)


@pytest.mark.slow
def test_awq_w4a16_budgeted_end_to_end(tiny_dir, calib_dataset, eval_ids, tmp_path, monkeypatch):
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import AWQModifier
    from llmcompressor.pipelines.cache import IntermediatesCache

    if not torch.accelerator.is_available():
        # llm-compressor 0.14 AWQ pins its cached activations (IntermediatesCache.pin_memory), which raises
        # "Cannot access accelerator device when none is available" on a CPU-only machine. Test-only workaround.
        monkeypatch.setattr(IntermediatesCache, "pin_memory", lambda self, *a, **k: None)
    defuse = dq_llmc.DefuseModifier(routing="budgeted", min_tokens=160, coverage_policy="error")
    recipe = [defuse, AWQModifier(), QuantizationModifier(targets="Linear", scheme="W4A16", ignore=IGNORE)]
    model = _oneshot(tiny_dir, calib_dataset, recipe, tmp_path / "awq")
    in_memory = _logits(model, eval_ids)
    assert all(e.calibrated >= 160 for layer in defuse.coverage.layers for e in layer.experts)
    assert defuse.coverage.totals.forced_tokens > 0
    _assert_every_expert_quantized(_keys(tmp_path / "awq"), {"weight_packed": "I32", "weight_scale": "BF16"})
    _close(_logits(_stock(tmp_path / "awq"), eval_ids), in_memory, cos=0.9999, rel=0.01)


@pytest.mark.slow
def test_fp8_dynamic_end_to_end(tiny_dir, eval_ids, tmp_path):
    from llmcompressor.modifiers.quantization import QuantizationModifier

    recipe = [dq_llmc.DefuseModifier(), QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=IGNORE)]
    model = _oneshot(tiny_dir, None, recipe, tmp_path / "fp8")
    in_memory = _logits(model, eval_ids)
    keys = _keys(tmp_path / "fp8")
    _assert_every_expert_quantized(keys, {"weight": "F8_E4M3", "weight_scale": "BF16"})
    assert keys["model.layers.0.mlp.experts.2.up_proj.weight_scale"][0] == [MOE_I, 1]
    # stock reload dequantizes the experts (their activation quantization is lost): close, not equal
    _close(_logits(_stock(tmp_path / "fp8"), eval_ids), in_memory, cos=0.999, rel=0.05)


@pytest.mark.slow
def test_model_loaded_defused_by_the_pre_load_patch_skips_linearization(tiny_dir, eval_ids, tmp_path):
    from llmcompressor.modifiers.quantization import QuantizationModifier

    from defuser_quant import replace_fused_blocks

    replace_fused_blocks("qwen3_moe")  # oneshot's from_pretrained now builds DefusedExperts (restored by conftest)
    recipe = [dq_llmc.DefuseModifier(), QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=IGNORE)]
    model = _oneshot(tiny_dir, None, recipe, tmp_path / "out")
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts, DefusedExperts) and type(experts).__name__ == "DefusedQwen3MoeExperts"  # built at load
    _assert_every_expert_quantized(_keys(tmp_path / "out"), {"weight": "F8_E4M3", "weight_scale": "BF16"})


@pytest.mark.slow
def test_filtered_out_block_stays_fused_and_unquantized(tiny_dir, eval_ids, tmp_path):
    from llmcompressor.modifiers.quantization import QuantizationModifier

    original = _stock(tiny_dir).model.layers[1].mlp.experts.gate_up_proj.detach().clone()
    recipe = [
        dq_llmc.DefuseModifier(filter=["-:layers\\.1\\."]),
        QuantizationModifier(targets="Linear", scheme="FP8_DYNAMIC", ignore=IGNORE),
    ]
    model = _oneshot(tiny_dir, None, recipe, tmp_path / "out")
    assert isinstance(model.model.layers[0].mlp.experts, DefusedExperts)
    assert type(model.model.layers[1].mlp.experts).__name__ == "Qwen3MoeExperts"
    keys = _keys(tmp_path / "out")
    assert keys["model.layers.0.mlp.experts.4.up_proj.weight"][1] == "F8_E4M3"
    assert keys["model.layers.1.mlp.experts.4.up_proj.weight"][1] == "BF16"
    assert "model.layers.1.mlp.experts.4.up_proj.weight_scale" not in keys
    reloaded = _stock(tmp_path / "out")
    torch.testing.assert_close(reloaded.model.layers[1].mlp.experts.gate_up_proj.data, original, rtol=0, atol=0)


@pytest.fixture(scope="module")
def fp8_block_run(tiny_dir, eval_ids, tmp_path_factory):
    """FP8_BLOCK from a YAML recipe with refuse: fp8_fused."""
    out = tmp_path_factory.mktemp("fp8_block") / "ct"
    fused = out.parent / "fused"
    recipe = f"""
    quant_stage:
      quant_modifiers:
        DefuseModifier: {{refuse: fp8_fused, refuse_output_dir: "{fused}"}}
        QuantizationModifier: {{targets: [Linear], scheme: FP8_BLOCK, ignore: [lm_head, "re:.*mlp.gate$"]}}
    """
    model = _oneshot(tiny_dir, None, recipe, out)
    dequantized = dq_llmc.refuse_checkpoint(out, out.parent / "dequantized", "dequantized")
    logits = _logits(model, eval_ids)
    for module in model.modules():  # the same model with its activation quantization switched off
        if getattr(module, "quantization_scheme", None) is not None:
            module.quantization_scheme.input_activations = None
    weight_only = _logits(model, eval_ids)
    return {"out": out, "fused": fused, "dequantized": dequantized, "logits": logits, "weight_only": weight_only}


@pytest.mark.slow
def test_fp8_block_yaml_recipe_quantizes_every_expert(fp8_block_run, eval_ids):
    keys = _keys(fp8_block_run["out"])
    _assert_every_expert_quantized(keys, {"weight": "F8_E4M3", "weight_scale": "BF16"})
    assert keys["model.layers.0.mlp.experts.0.gate_proj.weight_scale"][0] == [MOE_I // 128, HIDDEN // 128]
    from llmcompressor.recipe import Recipe

    saved = Recipe.create_instance(str(fp8_block_run["out"] / "recipe.yaml"))  # oneshot's own recipe.yaml re-parses
    assert isinstance(saved.modifiers[0], dq_llmc.DefuseModifier) and saved.modifiers[0].refuse == "fp8_fused"
    _close(_logits(_stock(fp8_block_run["out"]), eval_ids), fp8_block_run["logits"], cos=0.999, rel=0.05)


@pytest.mark.slow
def test_fp8_block_refused_checkpoint_has_the_fp8experts_layout(fp8_block_run, tiny_dir):
    from transformers import AutoConfig, FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import replace_with_fp8_linear

    fused = fp8_block_run["fused"]
    config = json.loads((fused / "config.json").read_text())
    qc = config["quantization_config"]
    assert (qc["quant_method"], qc["weight_block_size"], qc["activation_scheme"]) == ("fp8", [128, 128], "dynamic")
    keys = _keys(fused)
    prefix = "model.layers.1.mlp.experts"
    assert keys[f"{prefix}.gate_up_proj"] == ([EXPERTS, 2 * MOE_I, HIDDEN], "F8_E4M3")
    assert keys[f"{prefix}.gate_up_proj_scale_inv"] == ([EXPERTS, 2 * MOE_I // 128, HIDDEN // 128], "F32")
    assert keys[f"{prefix}.down_proj"] == ([EXPERTS, HIDDEN, MOE_I], "F8_E4M3")
    assert keys[f"{prefix}.down_proj_scale_inv"] == ([EXPERTS, HIDDEN // 128, MOE_I // 128], "F32")
    assert keys["model.layers.0.self_attn.q_proj.weight_scale_inv"][1] == "F32"
    assert not [k for k in keys if ".experts." in k and k.split(".experts.")[1][0].isdigit()]
    # exactly the parameters Transformers' FP8 loader builds (FP8Experts / FP8Linear), same shapes and dtypes
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_dir), dtype=torch.bfloat16)
    fp8_config = FineGrainedFP8Config(**{k: v for k, v in qc.items() if k != "quant_method"})
    replace_with_fp8_linear(skeleton, qc["modules_to_not_convert"], fp8_config, pre_quantized=True)
    assert type(skeleton.model.layers[0].mlp.experts).__name__ == "FP8Experts"
    expected = {k: (list(v.shape), v.dtype) for k, v in skeleton.state_dict().items()}
    dtype_names = {torch.float8_e4m3fn: "F8_E4M3", torch.float32: "F32", torch.bfloat16: "BF16"}
    assert {k: (shape, dtype_names[dtype]) for k, (shape, dtype) in expected.items()} == keys


def _block_dequant(weight: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
    scale = scale_inv.repeat_interleave(block, -2)[..., : weight.shape[-2], :].repeat_interleave(block, -1)
    return (weight.float() * scale[..., : weight.shape[-1]]).to(torch.bfloat16)


@pytest.mark.slow
def test_fp8_fused_and_dequantized_checkpoints_agree_and_match_the_quantized_model(fp8_block_run, eval_ids):
    from safetensors.torch import load_file

    fused = {}
    for file in fp8_block_run["fused"].glob("*.safetensors"):
        fused.update(load_file(file))
    model = _stock(fp8_block_run["dequantized"])
    for layer in range(LAYERS):
        experts = model.model.layers[layer].mlp.experts
        assert type(experts).__name__ == "Qwen3MoeExperts"
        for name in ("gate_up_proj", "down_proj"):
            key = f"model.layers.{layer}.mlp.experts.{name}"
            torch.testing.assert_close(
                getattr(experts, name).data, _block_dequant(fused[key], fused[f"{key}_scale_inv"]), rtol=0, atol=0
            )
    # the quantized weights exactly; only the (dynamic) activation quantization is dropped
    _close(_logits(model, eval_ids), fp8_block_run["weight_only"], cos=0.99999, rel=0.005)
    _close(_logits(model, eval_ids), fp8_block_run["logits"], cos=0.998, rel=0.1)


@pytest.mark.slow
def test_coverage_policy_error_stops_the_run_before_saving(tiny_dir, calib_dataset, tmp_path):
    from llmcompressor.modifiers.gptq import GPTQModifier

    recipe = [
        dq_llmc.DefuseModifier(routing="routed", min_tokens=10**6, coverage_policy="error"),
        GPTQModifier(targets="Linear", scheme="W4A16", ignore=IGNORE),
    ]
    with pytest.raises(CoverageError, match="fewer than min_tokens=1000000"):
        _oneshot(tiny_dir, calib_dataset.select(range(2)), recipe, tmp_path / "out", num_calibration_samples=2)
    assert not (tmp_path / "out" / "model.safetensors").exists()


# ----- importing us leaves stock llm-compressor recipes as they were (issue 13 item 1) ----------


def _stock_linearize(model) -> None:
    """llm-compressor's own linearization (``LinearExperts2D``), our hook out of the way."""
    from llmcompressor.modeling.moe.linearize import linearize_moe

    dq_llmc.uninstall_linearize_hook()
    try:
        linearize_moe(model)
    finally:
        dq_llmc.install_linearize_hook()


def _rows_per_expert(block) -> list[int]:
    """Forward pre-hooks counting the rows every expert's up projection receives (a list, live)."""
    rows = [0] * block.num_experts  # len() of a stock block also counts its act_fn child
    for index in range(block.num_experts):
        up = block[index].up_proj if hasattr(block[index], "up_proj") else block[index].w3
        up.register_forward_pre_hook(lambda _m, args, i=index: rows.__setitem__(i, rows[i] + args[0].shape[0]))
    return rows


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_our_linearization_honours_moe_calibration_context_like_stock(family):
    """``oneshot`` enters ``moe_calibration_context()`` so every expert sees every token; blocks
    built through our hook must do what stock ``LinearExperts2D`` does, with or without the flag,
    and the model output must stay that of top-k routing."""
    from llmcompressor.modeling.moe.context import moe_calibration_context
    from llmcompressor.modeling.moe.linearize import linearize_moe

    import tiny

    ours, ids = tiny.build(family)
    stock, _ = tiny.build(family)
    ref = tiny.logits(ours, ids)
    linearize_moe(ours)
    _stock_linearize(stock)
    assert isinstance(ours.model.layers[0].mlp.experts, DefusedExperts)
    for flag in (False, True):
        counted = []
        for model in (ours, stock):
            rows = _rows_per_expert(model.model.layers[1].mlp.experts)
            with moe_calibration_context() if flag else contextlib.nullcontext():
                out = tiny.logits(model, ids)
            torch.testing.assert_close(out, ref, rtol=0, atol=0 if model is ours else 1e-5)
            counted.append(rows)
        assert counted[0] == counted[1], (flag, counted)
        assert (min(counted[0]) == ids.numel()) is flag, counted  # all tokens reach every expert exactly when set


def test_blocks_built_from_a_config_for_llmcompressor_follow_the_flag_too(tiny_dir, eval_ids):
    """``load_quantizable_moe`` builds blocks from the config with the class our registry answers."""
    from llmcompressor.modeling.moe.context import moe_calibration_context
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D

    from defuser_quant import convert_model

    model = _stock(tiny_dir)
    convert_model(model)
    layer = model.model.layers[0]
    built = LinearExperts2D.get_registration(type(layer.mlp.experts.fused_shell))(model.config).to(model.dtype)
    built.load_state_dict(layer.mlp.experts.state_dict())
    layer.mlp.experts = built
    rows = _rows_per_expert(built)
    with moe_calibration_context():
        _logits(model, eval_ids)
    assert rows == [eval_ids.numel()] * EXPERTS


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral", "gpt_oss"])
def test_our_blocks_offer_linear_experts_2d_attributes(family):
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D

    import tiny

    ours, _ = tiny.build(family)
    stock, _ = tiny.build(family)
    from llmcompressor.modeling.moe.linearize import linearize_moe

    linearize_moe(ours)
    _stock_linearize(stock)
    a, b = ours.model.layers[0].mlp.experts, stock.model.layers[0].mlp.experts
    assert isinstance(a, DefusedExperts) and isinstance(a, LinearExperts2D) and isinstance(b, LinearExperts2D)
    names = ["num_experts", "intermediate_size", "has_gate", "has_bias", "is_transposed", "is_concatenated", "alpha", "limit"]
    assert {n: getattr(a, n) for n in names} == {n: getattr(b, n) for n in names}
    assert type(a.act_fn) is type(b.act_fn)
    assert a._source_experts_cls is b._source_experts_cls
    assert a._source_config.to_dict() == b._source_config.to_dict()
    with pytest.raises(DefuserQuantError, match="REAP"):
        a.num_experts = a.num_experts - 1  # what REAP's in-place pruning does: refused, never half done
    assert len(a) == a.num_experts == b.num_experts


def test_repack_moe_packs_our_blocks_for_stock_transformers(tmp_path):
    """qwen3_vl_moe must be saved packed (llm-compressor issue 2699): ``repack_moe`` re-fuses our
    blocks, and stock Transformers loads the checkpoint with the experts' real weights."""
    from llmcompressor.modeling.moe.linearize import linearize_moe, repack_moe

    from model_zoo import build_tiny_model, run_main_output

    model, inputs = build_tiny_model("qwen3_vl_moe")
    with torch.no_grad():
        ref = run_main_output(model, inputs)
    fused_cls = type(next(m for m in model.modules() if type(m).__name__.endswith("Experts")))
    linearize_moe(model)
    assert [m for m in model.modules() if isinstance(m, DefusedExperts)]
    repack_moe(model)
    assert not [m for m in model.modules() if isinstance(m, DefusedExperts)]
    assert [m for m in model.modules() if type(m) is fused_cls]
    with torch.no_grad():
        torch.testing.assert_close(run_main_output(model, inputs), ref, rtol=0, atol=0)
    model.save_pretrained(tmp_path)
    reloaded = type(model).from_pretrained(
        tmp_path, dtype=torch.float32, attn_implementation="eager", experts_implementation="eager"
    ).eval()
    with torch.no_grad():
        torch.testing.assert_close(run_main_output(reloaded, inputs), ref, rtol=0, atol=0)


def test_repack_moe_packs_quantization_parameters_like_stock(tiny_dir):
    """After a real quantization pass, our blocks repack to the same fused tensors and qparams as
    llm-compressor's own ``LinearExperts2D``."""
    from compressed_tensors.quantization import QuantizationStatus
    from llmcompressor.modeling.moe.linearize import linearize_moe, repack_moe
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor import oneshot

    packed = []
    for hook in (True, False):
        model = _stock(tiny_dir)
        (linearize_moe if hook else _stock_linearize)(model)
        assert isinstance(model.model.layers[0].mlp.experts, DefusedExperts) is hook
        oneshot(model=model, recipe=[QuantizationModifier(targets="Linear", scheme="W4A16", ignore=IGNORE)])
        assert model.model.layers[0].mlp.experts[1].down_proj.quantization_status == QuantizationStatus.FROZEN
        repack_moe(model)
        experts = model.model.layers[1].mlp.experts
        assert type(experts).__name__ == "Qwen3MoeExperts"
        packed.append({k: v.detach().clone() for k, v in experts.state_dict().items()})
    ours, stock = packed
    assert sorted(ours) == sorted(stock) and {"gate_up_proj_scale", "down_proj_scale"} <= set(ours)
    for key in stock:
        torch.testing.assert_close(ours[key], stock[key], rtol=0, atol=0, msg=key)


# ----- the kernel rehearsal and the sync-free propagation ---------------------------------------------


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            for key in f.keys():
                out[key] = f.get_tensor(key)
    return out


_FRESH_RUN = """
import json, sys, threading, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
import test_llmcompressor_modifier as t
from llmcompressor.modifiers.gptq import GPTQModifier
from defuser_quant.calibration import grouped
from defuser_quant.integrations.llmcompressor import modifier
if {cpu_rehearsal!r}:
    modifier.cuda_device = lambda model: torch.device("cpu")
if {cpu_counts!r}:  # let the CPU stand in for a device: rows counted there stay unread until the report
    from defuser_quant.calibration import capture
    capture.HOST_COUNT_DEVICES = frozenset()
if {cpu_pack!r}:
    from defuser_quant.integrations.llmcompressor import batched_compress
    batched_compress.BATCHED_DEVICES = frozenset({{"cpu"}})
if {loop_twin!r}:  # a copy of the quantized model, taken just before the batched packing, packed by the loop alone
    import copy
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor
    from safetensors.torch import save_file
    from defuser_quant.integrations.llmcompressor import batched_compress
    loop, batches = ModelCompressor.compress_model, batched_compress.compress_in_batches
    def twin_then_batches(model, forced_format=None, **kw):
        twin = copy.deepcopy(model)
        loop(ModelCompressor.from_pretrained_model(twin, quantization_format=forced_format), twin, skip_compressed=True)
        save_file({{k: v.detach().clone().contiguous() for k, v in twin.state_dict().items()}}, {loop_twin!r})
        return batches(model, forced_format, **kw)
    batched_compress.compress_in_batches = twin_then_batches
threads, hookless, run, rehearsal_run = [], [0], grouped._run_hookless, modifier.Rehearsal._run
def counted(*a):
    hookless[0] += 1
    return run(*a)
def named(self, *a):
    threads.append(threading.current_thread().name)
    return rehearsal_run(self, *a)
grouped._run_hookless, modifier.Rehearsal._run = counted, named
defuse = t.dq_llmc.DefuseModifier(routing="all", **{fields!r})
t._oneshot({model!r}, t._calibration_dataset(), [defuse, GPTQModifier(targets="Linear", scheme="W4A16", ignore=t.IGNORE)],
           {out!r})
use = defuse.grouped_use
print("RESULT " + json.dumps({{"rehearsal": defuse.rehearsal, "hookless": hookless[0], "threads": threads,
                               "without_sync": use.without_sync if use is not None else None,
                               "compression": defuse.compression_batching,
                               "coverage": [[[e.routed, e.forced] for e in layer.experts] for layer in defuse.coverage.layers]
                               if defuse.coverage is not None else None}}))
"""


def _fresh_oneshot(model: Path, out: Path, cpu_rehearsal: bool = False, cpu_pack: bool = False, cpu_counts: bool = False,
                   loop_twin: Path | None = None, **fields) -> dict:
    """One ``oneshot`` (routing all, GPTQ W4A16, the calibration rows unshuffled: ``_oneshot``) in a process of
    its own, so that one run's patches and counters cannot reach the next."""
    script = _FRESH_RUN.format(tests=str(Path(__file__).parent), cpu_rehearsal=cpu_rehearsal, cpu_pack=cpu_pack,
                               cpu_counts=cpu_counts, loop_twin=None if loop_twin is None else str(loop_twin), fields=fields,
                               model=str(model), out=str(out))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])


def _same_tensors(a: Path, b: Path) -> list[str]:
    """The tensor names whose values differ between two checkpoints (both must hold the same names)."""
    first, second = _tensors(a), _tensors(b)
    assert first.keys() == second.keys()
    return [k for k in first if not torch.equal(first[k], second[k])]


@pytest.mark.slow
def test_rehearsal_runs_its_steps_beside_the_run_and_changes_no_tensor(tiny_dir, tmp_path):
    """Opt-in. On a CPU model the rehearsal is skipped; with the device check pointed at the CPU every step runs
    on its thread (the solve's for each distinct quantized shape, the attention through the modeling file's
    eager function, which llm-compressor calibrates with) and the checkpoint is the one without it."""
    import importlib.util

    off = _fresh_oneshot(tiny_dir, tmp_path / "off")
    assert off["rehearsal"] is None  # the default
    skipped = _fresh_oneshot(tiny_dir, tmp_path / "cpu", rehearse=True)["rehearsal"]
    assert skipped == {"seconds": {}, "not_run": [], "failed": {}, "skipped": "no model tensor on a CUDA device"}
    on = _fresh_oneshot(tiny_dir, tmp_path / "on", cpu_rehearsal=True, rehearse=True)
    rehearsed = on["rehearsal"]
    assert rehearsed["failed"] == {} and rehearsed["skipped"] is None
    steps = set(rehearsed["seconds"])
    assert {"attention", "grouped_experts", "linears", "hessian_products"} <= steps
    assert rehearsed["not_run"] == ([] if importlib.util.find_spec("triton") else ["triton_key"])
    # q, o and the experts (128 x 128), k and v (64 x 128): two distinct quantized weight shapes
    assert {s for s in steps if s.startswith("solve")} == {"solve (128, 128)", "solve (64, 128)"}
    assert on["threads"] == ["defuser-quant-rehearsal"] * 2
    assert _same_tensors(tmp_path / "off", tmp_path / "on") == []


@pytest.mark.slow
def test_sync_free_propagation_skips_the_host_sync_in_propagation_and_changes_no_tensor(tiny_dir, tmp_path):
    """Opt-in: the propagation passes' grouped forwards (every expert hook llm-compressor's, switched off)
    run without the rows per expert on the host; the calibration passes keep their sync (the token counts
    need it; their routed output runs the hook-free GEMMs and reads the counts after them); the checkpoint
    is the one without the option."""
    calls = LAYERS * SAMPLES  # block calls per pass
    synced = _fresh_oneshot(tiny_dir, tmp_path / "synced")
    assert synced["without_sync"] == 0 and synced["hookless"] == calls  # the calibration calls' routed outputs
    free = _fresh_oneshot(tiny_dir, tmp_path / "sync_free", sync_free_propagation=True)
    assert free["without_sync"] == calls and free["hookless"] == 2 * calls  # and every propagation call
    assert _same_tensors(tmp_path / "synced", tmp_path / "sync_free") == []


@pytest.mark.slow
def test_batched_packing_at_save_writes_the_per_module_checkpoint(tiny_dir, tmp_path):
    """The save's stacked packing (the default; let onto the CPU here) writes the checkpoint of compressed-tensors'
    per-module loop, every quantized Linear of one shape packed in one chunk and checked. The loop packs a copy of
    the same quantized model, taken just before the save's packing, so the comparison is of the packing alone."""
    twin = tmp_path / "loop_twin.safetensors"
    stacked = _fresh_oneshot(tiny_dir, tmp_path / "stacked", cpu_pack=True, loop_twin=twin)["compression"]
    # q, o and every expert projection are 128 x 128, k and v 64 x 128: two groups, one chunk each
    assert stacked == {"modules": LAYERS * (2 + 2 + 3 * EXPERTS), "groups": 2, "chunks": 2, "checked": 2, "mismatched": 0,
                       "left": {}}
    written = _tensors(tmp_path / "stacked")
    with safe_open(str(twin), "pt") as f:
        loop = {key: f.get_tensor(key) for key in f.keys()}
    packed = [key for key in written if key.endswith(".weight_packed")]
    assert len(packed) == stacked["modules"] and set(written) <= set(loop)
    assert [key for key in written if not torch.equal(written[key], loop[key])] == []


@pytest.mark.parametrize("batched", [True, False])
def test_the_save_packs_in_batches_only_with_batched_compress(batched, tmp_path):
    """``batched_compress=False`` leaves compressed-tensors' own ``compress_model`` in place during the save and
    reports nothing; the default wraps it for the save only."""
    from compressed_tensors.compressors.model_compressors.model_compressor import ModelCompressor

    stock, during = ModelCompressor.__dict__["compress_model"], []

    def save_pretrained(save_directory, **kwargs):  # stands in for compressed-tensors' save wrapper
        during.append(ModelCompressor.__dict__["compress_model"] is stock)

    save_pretrained._overridden = True
    model = torch.nn.Linear(2, 2)
    model.save_pretrained = save_pretrained
    defuse = dq_llmc.DefuseModifier(batched_compress=batched)
    defuse._arm_save(model)
    model.save_pretrained(str(tmp_path))
    assert during == [not batched] and ModelCompressor.__dict__["compress_model"] is stock
    assert (defuse.compression_batching is None) is not batched


@pytest.mark.slow
def test_sync_free_calibration_counts_on_the_device_and_changes_no_tensor(tiny_dir, tmp_path):
    """Opt-in, with sync-free propagation: no block call of either pass reads its rows per expert on the host
    (the CPU stands in for a device; the calibration calls' counts are added there and read at finalize); the
    checkpoint and the coverage report are the synced run's."""
    calls = LAYERS * SAMPLES
    synced = _fresh_oneshot(tiny_dir, tmp_path / "synced")
    free = _fresh_oneshot(tiny_dir, tmp_path / "free", cpu_counts=True, sync_free_calibration=True,
                          sync_free_propagation=True)
    assert synced["without_sync"] == 0 and free["without_sync"] == 2 * calls  # every call of both passes
    assert free["coverage"] == synced["coverage"] and sum(e[0] for layer in free["coverage"] for e in layer) > 0
    assert _same_tensors(tmp_path / "synced", tmp_path / "free") == []


def test_sync_free_calibration_needs_routing_all_and_grouped(tiny_dir, calib_dataset, tmp_path):
    """Refused in one line before anything is defused (the model is left as it was)."""
    from types import SimpleNamespace

    from llmcompressor.modifiers.gptq import GPTQModifier

    for fields in ({"routing": "routed"}, {"routing": "all", "grouped": False}):
        defuse = dq_llmc.DefuseModifier(sync_free_calibration=True, **fields)
        with pytest.raises(Exception, match="sync_free_calibration needs routing 'all' and grouped: true"):
            _oneshot(tiny_dir, calib_dataset, [defuse, GPTQModifier(targets="Linear", scheme="W4A16", ignore=IGNORE)],
                     tmp_path / "out")
        model = AutoModelForCausalLM.from_pretrained(tiny_dir)
        with pytest.raises(DefuserQuantError, match="sync_free_calibration needs"):
            dq_llmc.DefuseModifier(sync_free_calibration=True, **fields).on_initialize(SimpleNamespace(model=model))
        assert not any(isinstance(m, DefusedExperts) for m in model.modules())


@pytest.mark.parametrize("option", ["sync_free_calibration", "sync_free_propagation", None])
def test_finalize_raises_on_an_index_a_sync_free_call_flagged(option):
    """A sync-free call (either pass) that saw an expert index outside its block set a flag; finalize raises on it
    before oneshot saves anything. Without either option no call is sync-free and finalize reads no flag."""
    from types import SimpleNamespace

    import tiny

    from defuser_quant import convert_model
    from defuser_quant.calibration import grouped

    model, _ = tiny.build("qwen3_moe", torch.float32)
    convert_model(model)
    block = next(m for m in model.modules() if isinstance(m, DefusedExperts))
    grouped._flag_outside(block, torch.tensor([block.num_experts]))
    defuse = dq_llmc.DefuseModifier(routing="all", **({option: True} if option else {}))
    try:
        if option is None:
            defuse.on_finalize(SimpleNamespace(model=model))
        else:
            with pytest.raises(grouped.RoutedIndexError, match="sync_free_calibration=False"):
                defuse.on_finalize(SimpleNamespace(model=model))
    finally:
        grouped._INDEX_FLAGS.clear()


def test_expert_token_counts_fold_the_device_rows_on_any_read():
    from defuser_quant.calibration import add_rows
    from defuser_quant.integrations.llmcompressor.token_counts import ExpertTokenCounts

    counts = ExpertTokenCounts(4)
    counts.add_on_device([0, 1, 2, 3], [6, 6, 6, 6], torch.tensor([1, 0, 3, 2]))  # a whole call over every expert
    counts.add_on_device([1, 3], [5, 2], torch.tensor([9, 4, 9, 1]))  # some experts: only theirs count
    assert counts._pending  # rows still on the device
    assert counts["routed"] == [1, 4, 3, 3] and counts["forced"] == [5, 7, 3, 5] and not counts._pending
    add_rows(counts, 2, 4, "forced")
    counts.add_on_device([0, 1, 2, 3], [1, 1, 1, 1], torch.tensor([1, 1, 0, 0]))
    assert counts["forced"] == [5, 7, 8, 6] and counts["routed"] == [2, 5, 3, 3]


def test_a_failing_rehearsal_step_is_logged_and_the_next_step_runs(caplog):
    from defuser_quant.calibration.first_use import Rehearsal

    rehearsal = Rehearsal("cpu")
    rehearsal.start([("breaks", lambda: 1 / 0), ("runs", lambda: None), ("nothing to do", lambda: False)])
    rehearsal.start_from(lambda: [][0], "plan")
    with caplog.at_level("WARNING"):
        stats = rehearsal.join().as_dict()
    assert set(stats["seconds"]) == {"runs"} and stats["not_run"] == ["nothing to do"]
    assert stats["failed"] == {"breaks": "ZeroDivisionError: division by zero", "plan": "IndexError: list index out of range"}
    assert "kernel rehearsal 'breaks' failed" in caplog.text
