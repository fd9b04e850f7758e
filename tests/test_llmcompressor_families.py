"""DefuseModifier across the MoE families llm-compressor 0.14 linearizes (its registry of hand-written
classes: llama4, gpt_oss; its generic path: qwen3_moe, qwen3_vl_moe, deepseek_v3, glm4_moe, mixtral).

llama4 is the irregular one: llm-compressor registers its own ``Llama4LinearExperts``, which ``oneshot``
builds before the recipe is initialized. With ``DefuseModifier`` in the recipe our defusion takes its
place (``recipe_scope.py``); without it, llm-compressor stays exactly stock, its text-only llama4 bug
(``config.text_config`` on a ``Llama4TextConfig``) included.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

pytest.importorskip("llmcompressor")

from safetensors import safe_open  # noqa: E402

import defuser_quant  # noqa: E402
import defuser_quant.integrations.llmcompressor as dq_llmc  # noqa: E402
from defuser_quant import DefusedExperts  # noqa: E402
from defuser_quant.assets import CORPUS_DIR  # noqa: E402
from defuser_quant.integrations.llmcompressor.recipe_scope import (  # noqa: E402
    defuse_recipe_scope,
    recipe_has_defuse_modifier,
)

SAMPLES, SEQ, GROUP = 4, 32, 16
IGNORE = ["lm_head", "re:.*mlp.gate$", "re:.*router$", "re:.*visual.*", "re:.*vision.*", "re:.*multi_modal.*"]
SCHEME = {  # W4A16 with a group the tiny dims (64, 32) divide
    "group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP},
    }
}
FAMILIES = ["llama4", "llama4_multimodal", "gpt_oss", "qwen3_moe", "qwen3_vl_moe", "deepseek_v3", "glm4_moe", "mixtral"]


@pytest.fixture(scope="session")
def tokenizer():
    """A 256-token BPE trained on the shipped corpus (oneshot wants a processor; ids stay < every tiny vocab)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = [line for line in (CORPUS_DIR / "train.txt").read_text(encoding="utf-8").splitlines() if len(line) > 20]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=256, special_tokens=["<unk>", "<pad>", "<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(lines[:2000], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def _llama4_multimodal():
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    text = dict(
        vocab_size=256, hidden_size=64, intermediate_size=32, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=1, max_position_embeddings=128, tie_word_embeddings=False,
    )
    vision = dict(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28, patch_size=14,
        vision_output_dim=32, projector_input_dim=32, projector_output_dim=32,
    )
    torch.manual_seed(0)
    model = Llama4ForConditionalGeneration(Llama4Config(text_config=text, vision_config=vision)).eval()
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        for name, p in model.named_parameters():
            if "experts" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _build(family: str) -> torch.nn.Module:
    if family == "llama4_multimodal":
        return _llama4_multimodal()
    from model_zoo import build_tiny_model

    model, _ = build_tiny_model(family)
    return model


def _saved(model: torch.nn.Module, folder: Path, tokenizer) -> torch.nn.Module:
    """``model`` saved with ``tokenizer`` and loaded back from there (oneshot reads ``_name_or_path``)."""
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return type(model).from_pretrained(folder).eval()


def _dataset(vocab: int):
    from datasets import Dataset

    ids = torch.randint(3, vocab, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(1))
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def _ids() -> torch.Tensor:
    return torch.randint(3, 256, (2, 24), generator=torch.Generator().manual_seed(2))


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def _experts_paths(model) -> list[str]:
    from llmcompressor.modeling.moe.linearize import get_non_linearized_moes

    return [path for path, _ in get_non_linearized_moes(model)]


def _keys(folder: Path) -> set[str]:
    keys: set[str] = set()
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            keys.update(f.keys())
    return keys


def _oneshot(model, tokenizer, recipe, output_dir: Path):
    from llmcompressor import oneshot

    vocab = min(model.config.get_text_config().vocab_size, len(tokenizer))
    return oneshot(
        model=model, processor=tokenizer, dataset=_dataset(vocab), recipe=recipe, output_dir=str(output_dir),
        num_calibration_samples=SAMPLES, max_seq_length=SEQ, shuffle_calibration_samples=False,
    )


# ----- llama4: stock stays stock, DefuseModifier takes precedence ----------------------------------


def _run_error(model, tokenizer, recipe, output_dir) -> BaseException:
    with pytest.raises(Exception) as caught:
        _oneshot(model, tokenizer, recipe, output_dir)
    return caught.value


def test_llama4_text_stock_recipe_keeps_llmcompressors_own_behaviour(tokenizer, tmp_path):
    """Importing the integration changes nothing for a recipe without DefuseModifier: the text-only
    llama4 run fails inside llm-compressor exactly as it does with the integration unregistered."""
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
    from llmcompressor.modeling.moe.llama4 import Llama4LinearExperts
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers.models.llama4.modeling_llama4 import Llama4TextExperts

    assert LinearExperts2D.get_registration(Llama4TextExperts) is Llama4LinearExperts
    model = _saved(_build("llama4"), tmp_path / "model", tokenizer)
    ours = _run_error(model, tokenizer, [GPTQModifier(config_groups=SCHEME, ignore=IGNORE)], tmp_path / "ours")
    dq_llmc.unregister()
    try:
        assert not dq_llmc.oneshot_hook_installed() and not dq_llmc.linearize_hook_installed()
        model = type(model).from_pretrained(tmp_path / "model").eval()
        stock = _run_error(model, tokenizer, [GPTQModifier(config_groups=SCHEME, ignore=IGNORE)], tmp_path / "stock")
    finally:
        dq_llmc.register()
    assert (type(ours), str(ours)) == (type(stock), str(stock))
    assert "text_config" in str(stock)  # llm-compressor 0.14's own bug (Llama4LinearExperts reads config.text_config)


def test_llama4_multimodal_stock_recipe_still_builds_llmcompressors_class(tokenizer, tmp_path):
    from llmcompressor.modeling.moe.llama4 import Llama4LinearExperts
    from llmcompressor.modifiers.gptq import GPTQModifier

    model = _saved(_build("llama4_multimodal"), tmp_path / "model", tokenizer)
    paths = _experts_paths(model)
    out = _oneshot(model, tokenizer, [GPTQModifier(config_groups=SCHEME, ignore=IGNORE)], tmp_path / "out")
    assert paths and all(type(out.get_submodule(p)) is Llama4LinearExperts for p in paths)


@pytest.mark.parametrize("family", ["llama4", "llama4_multimodal"])
def test_llama4_linearization_in_a_defuse_recipe_is_exact_and_zero_copy(family):
    """Inside a DefuseModifier recipe llm-compressor's linearize_moe builds our blocks for llama4: same
    logits bit for bit (with and without llm-compressor's all-experts flag), views of the fused storage."""
    from llmcompressor.modeling.moe.context import moe_calibration_context
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D
    from llmcompressor.modeling.moe.linearize import linearize_moe

    model = _build(family)
    ids = _ids()
    ref = _logits(model, ids)
    paths = _experts_paths(model)
    storage = model.get_submodule(paths[0]).gate_up_proj.untyped_storage().data_ptr()
    with defuse_recipe_scope():
        linearize_moe(model)
    assert _experts_paths(model) == []
    block = model.get_submodule(paths[0])
    assert isinstance(block, DefusedExperts) and isinstance(block, LinearExperts2D)
    assert block[1].gate_proj.weight.untyped_storage().data_ptr() == storage
    torch.testing.assert_close(_logits(model, ids), ref, rtol=0, atol=0)
    with moe_calibration_context():
        torch.testing.assert_close(_logits(model, ids), ref, rtol=0, atol=0)


@pytest.mark.parametrize("with_config", [False, True])
def test_stock_linearized_llama4_is_refused_with_what_to_do(with_config):
    """A model llm-compressor linearized itself (load_quantizable_moe / linearize_moe outside a
    DefuseModifier recipe) holds Llama4LinearExperts: it records no config, and even with one its call
    contract (inputs grouped per expert) is not the plain block adoption builds: refused, with the fix."""
    from llmcompressor.modeling.moe.linearize import linearize_moe

    model = _build("llama4_multimodal")
    linearize_moe(model)  # outside the recipe scope: stock Llama4LinearExperts
    if with_config:
        for _, block in model.named_modules():
            if type(block).__name__ == "Llama4LinearExperts":
                block._source_config = model.config.get_text_config()
    fix = r"Llama4LinearExperts.*from_pretrained, not under load_quantizable_moe"
    with pytest.raises(defuser_quant.DefuserQuantError, match=fix):
        dq_llmc.adopt_linear_experts(model)


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        ("gptq", False),
        ("defuse_list", True),
        ("nested", True),
        ("yaml_stock", False),
        ("yaml_defuse", True),
        ("yaml_file", True),
        ("not yaml at all: [", False),
    ],
)
def test_recipe_detection(recipe, expected, tmp_path):
    from llmcompressor.modifiers.gptq import GPTQModifier

    gptq = GPTQModifier(scheme="W4A16", targets="Linear")
    yaml_defuse = (
        "quant_stage:\n  quant_modifiers:\n    DefuseModifier: {}\n"
        "    GPTQModifier:\n      scheme: W4A16\n      targets: [Linear]\n"
    )
    (tmp_path / "recipe.yaml").write_text(yaml_defuse)
    value = {
        "gptq": [gptq],
        "defuse_list": [dq_llmc.DefuseModifier(), gptq],
        "nested": [[dq_llmc.DefuseModifier()], gptq],
        "yaml_stock": yaml_defuse.replace("    DefuseModifier: {}\n", ""),
        "yaml_defuse": yaml_defuse,
        "yaml_file": str(tmp_path / "recipe.yaml"),
    }.get(recipe, recipe)
    assert recipe_has_defuse_modifier(value) is expected


# ----- every family llm-compressor linearizes: real GPTQ oneshot under DefuseModifier -------------


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_defuse_modifier_gptq_quantizes_every_expert_and_reloads(family, tokenizer, tmp_path):
    from llmcompressor.modifiers.gptq import GPTQModifier

    model = _saved(_build(family), tmp_path / "model", tokenizer)
    paths = _experts_paths(model)
    assert paths
    defuse = dq_llmc.DefuseModifier(routing="all")
    out = _oneshot(model, tokenizer, [defuse, GPTQModifier(config_groups=SCHEME, ignore=IGNORE)], tmp_path / "out")
    ids = _ids()
    quantized = _logits(out, ids)

    # every expert projection of every block is a quantized nn.Linear in the checkpoint (under the
    # family's checkpoint names: mixtral saves block_sparse_moe.experts.{e}.w1, ...)
    keys = _keys(tmp_path / "out")
    saved = {k for k in keys if re.search(r"\.experts\.\d+\.\w+\.weight_packed$", k)}
    expected = 0
    for path in paths:
        block = out.get_submodule(path)
        assert isinstance(block, DefusedExperts), (path, type(block))
        for index, expert in enumerate(block):
            for role in ("gate", "up", "down"):
                if expert.projection(role) is not None:
                    expected += 1
    assert len(saved) == expected > 0, (len(saved), expected)
    assert not [k for k in keys if k.endswith(("experts.gate_up_proj", "experts.down_proj", "experts.up_proj"))]
    assert not [k for k in keys if ".experts." in k and k.endswith(".weight")]

    # every expert was calibrated
    assert defuse.coverage is not None
    assert defuse.coverage.totals.experts == sum(len(out.get_submodule(p)) for p in paths)
    assert defuse.coverage.under_threshold == []
    assert all(e.calibrated > 0 for layer in defuse.coverage.layers for e in layer.experts)

    # the checkpoint loads with defuser_quant.load, experts still defused, same logits as in memory
    loaded = defuser_quant.load(tmp_path / "out", model_class=type(model)).eval()
    assert all(isinstance(loaded.get_submodule(p), DefusedExperts) for p in paths)
    reloaded = _logits(loaded, ids)
    cos = torch.nn.functional.cosine_similarity(reloaded.flatten(), quantized.flatten(), dim=0).item()
    assert cos > 0.9999 and (reloaded - quantized).abs().max() <= 0.02 * quantized.abs().max(), cos


def test_stock_recipes_leave_the_scope_closed(tokenizer, tmp_path, monkeypatch):
    """The oneshot wrapper opens the DefuseModifier scope only for a DefuseModifier recipe."""
    import importlib

    from llmcompressor.modifiers.gptq import GPTQModifier

    from defuser_quant.integrations.llmcompressor import recipe_scope

    oneshot_module = importlib.import_module("llmcompressor.entrypoints.oneshot")  # the attribute is the function
    seen = []
    real = oneshot_module.linearize_moe
    def spy(model):
        seen.append(recipe_scope.in_defuse_recipe_scope())
        return real(model)

    monkeypatch.setattr(oneshot_module, "linearize_moe", spy)
    def gptq():
        return GPTQModifier(config_groups=SCHEME, ignore=IGNORE)

    for recipe in ([gptq()], [dq_llmc.DefuseModifier(), gptq()]):
        model = _saved(_build("qwen3_moe"), tmp_path / f"m{len(seen)}", tokenizer)
        _oneshot(model, tokenizer, recipe, tmp_path / f"out{len(seen)}")
    assert seen == [False, True]
    assert not recipe_scope.in_defuse_recipe_scope()
