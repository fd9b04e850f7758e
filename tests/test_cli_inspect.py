"""``defuser-quant inspect``: fused blocks listed from a meta-device build, text and JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import build
from transformers import LlamaConfig, Qwen3VLMoeConfig

from defuser_quant.cli import main
from defuser_quant.tools.inspect_model import inspect_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """qwen3_moe saved per-expert (sharded), gpt_oss saved fused, mixtral and qwen3_vl_moe config only."""
    root = tmp_path_factory.mktemp("inspect")
    out = {}
    model, _ = build("qwen3_moe")
    model.save_pretrained(root / "qwen3_moe", max_shard_size="60KB")
    out["qwen3_moe"] = root / "qwen3_moe"
    out["qwen3_moe_model"] = model
    gpt, _ = build("gpt_oss")
    gpt.save_pretrained(root / "gpt_oss")
    out["gpt_oss"] = root / "gpt_oss"
    mixtral, _ = build("mixtral")
    mixtral.config.save_pretrained(root / "mixtral")
    out["mixtral"] = root / "mixtral"
    Qwen3VLMoeConfig(
        text_config=dict(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, moe_intermediate_size=16, num_experts=8, num_experts_per_tok=2),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64),
    ).save_pretrained(root / "qwen3_vl_moe")
    out["qwen3_vl_moe"] = root / "qwen3_vl_moe"
    LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2).save_pretrained(root / "dense")
    out["dense"] = root / "dense"
    return out


def inspect_json(path: Path, capsys, *extra: str) -> dict:
    assert main(["inspect", str(path), "--json", *extra]) == 0
    return json.loads(capsys.readouterr().out)


def test_text_lists_blocks_and_actions(saved, capsys):
    assert main(["inspect", str(saved["qwen3_moe"])]) == 0
    text = capsys.readouterr().out
    for line in ("model.layers.0.mlp.experts", "model.layers.1.mlp.experts", "Qwen3MoeExperts", "gated/concat/[E,out,in]",
                 "gate_proj 32x64", "down_proj 64x32", "convert_model: 2 block(s) -> defuse (zero copy",
                 "replace_fused_blocks('qwen3_moe'): patches Qwen3MoeExperts", "experts stored per-expert",
                 "convert --to fused: merged 2 block(s): 48 tensors -> 4", "convert --to per-expert: nothing to do"):
        assert line in text, line


def test_json_counts_match_the_real_model(saved, capsys):
    data = inspect_json(saved["qwen3_moe"], capsys)
    model = saved["qwen3_moe_model"]
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    assert data["model_type"] == "qwen3_moe" and data["architecture"] == "Qwen3MoeForCausalLM"
    assert data["total_params"] == sum(p.numel() for p in model.parameters())
    assert data["expert_params"] == experts and data["expert_bytes"] == experts * 4
    assert data["expert_fraction"] == pytest.approx(experts / data["total_params"])
    assert [b["path"] for b in data["blocks"]] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    block = data["blocks"][0]
    assert block["num_experts"] == 8 and block["hidden"] == 64 and block["intermediate"] == 32
    assert [(p["name"], p["shape"]) for p in block["per_expert"]] == [
        ("gate_proj", [32, 64]), ("up_proj", [32, 64]), ("down_proj", [64, 32])]
    assert block["fused_tensors"] == {"gate_up_proj": [8, 64, 64], "down_proj": [8, 64, 32]}
    assert block["on_disk"] == "per-expert"
    assert data["checkpoint"]["files"] > 1 and data["checkpoint"]["format"] == "per-expert"
    assert data["replace_fused_blocks"]["patchable"] is True


def test_family_quirks(saved, capsys):
    gpt = inspect_json(saved["gpt_oss"], capsys)
    block = gpt["blocks"][0]
    assert block["layout"] == "gated/interleaved/[E,in,out]/bias"
    assert block["flags"] == {"has_gate": True, "has_bias": True, "is_transposed": True, "is_concatenated": False}
    assert all(p["bias"] for p in block["per_expert"]) and "relayout" in block["convert_model"]
    assert "temporarily_fused" in gpt["saving"] and gpt["checkpoint"]["format"] == "fused"

    mixtral = inspect_json(saved["mixtral"], capsys)  # config only: no weights needed at all
    assert [p["name"] for p in mixtral["blocks"][0]["per_expert"]] == ["w1", "w3", "w2"]
    assert "neither" in mixtral["checkpoint"]["note"] and mixtral["blocks"][0]["on_disk"] is None

    vl = inspect_json(saved["qwen3_vl_moe"], capsys)
    assert [b["path"] for b in vl["blocks"]] == [f"model.language_model.layers.{i}.mlp.experts" for i in range(2)]
    assert vl["replace_fused_blocks"]["classes"] == ["Qwen3VLMoeTextExperts"]

    dense = inspect_json(saved["dense"], capsys)
    assert dense["blocks"] == [] and dense["expert_params"] == 0 and dense["checkpoint"] is None


def test_filter_marks_skipped_blocks(saved, capsys):
    data = inspect_json(saved["qwen3_moe"], capsys, r"--filter=-:layers\.1\.")
    assert data["blocks"][0]["convert_model"].startswith("defuse")
    assert data["blocks"][1]["convert_model"] == "skip (excluded by filter)"
    assert inspect_model(saved["qwen3_moe"], filter=[r"-:layers\.0\."]).blocks[0].convert_model.startswith("skip")


def test_errors_are_clear(saved, tmp_path, capsys):
    assert main(["inspect", "some-org/some-moe-model"]) == 2  # HF_HUB_OFFLINE=1 (conftest): no hub
    err = capsys.readouterr().err
    assert "some-org/some-moe-model does not exist as a local folder" in err and "the hub cannot be used" in err
    assert main(["inspect", str(tmp_path)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_subprocess(saved):
    proc = subprocess.run(
        [sys.executable, "-m", "defuser_quant", "inspect", str(saved["gpt_oss"]), "--json"],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert [b["class_name"] for b in json.loads(proc.stdout)["blocks"]] == ["GptOssExperts"] * 2


def test_irregular_family_blocks_are_listed_with_their_own_storage(tmp_path, capsys):
    """dbrx keeps its experts flattened in a child module: the block, its per-expert Linears, the
    relayout, the patch and the convert plan all come from its adapter."""
    from model_zoo import build_tiny_model

    model, _ = build_tiny_model("dbrx")
    model.save_pretrained(tmp_path / "dbrx")
    data = inspect_json(tmp_path / "dbrx", capsys)
    blocks = data["blocks"]
    assert [b["path"] for b in blocks] == [f"transformer.blocks.{i}.ffn.experts" for i in range(len(blocks))]
    block = blocks[0]
    experts = model.transformer.blocks[0].ffn.experts
    inter, hidden = experts.mlp.ffn_hidden_size, experts.mlp.hidden_size
    assert block["layout"] == "flattened w1/v1/w2 [E*I,H]"
    assert block["fused_tensors"] == {n: [experts.num_experts * inter, hidden] for n in ("mlp.w1", "mlp.v1", "mlp.w2")}
    assert [(x["name"], x["shape"]) for x in block["per_expert"]] == [
        ("gate_proj", [inter, hidden]), ("up_proj", [inter, hidden]), ("down_proj", [hidden, inter])]
    assert "relayout of mlp.w2" in block["convert_model"]
    assert data["irregular"] and data["irregular"][0]["class"] == "DbrxExperts"
    assert data["replace_fused_blocks"]["classes"] == ["DbrxExperts"]
    assert "only fused" in data["saving"]
    assert data["checkpoint"]["convert"]["per-expert"] == f"split {len(blocks)} block(s): {3 * len(blocks)} tensors -> {3 * experts.num_experts * len(blocks)}"
