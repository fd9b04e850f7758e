"""Offline checkpoint conversion (``defuser-quant convert``): round trips, loading, safety.

Per-expert sources come from independent writers: stock ``save_pretrained`` for families with a
per-expert format (qwen3_moe; mixtral's w1/w3/w2 under ``block_sparse_moe``), and the
``save_pretrained`` of a defused model for the families stock Transformers stores fused only
(gpt_oss: interleaved, transposed, biases; qwen3_vl_moe: nested ``model.language_model``).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tiny import build
from transformers import AutoModelForCausalLM, Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

import defuser_quant as dq
from defuser_quant.checkpoint import CheckpointError, DestinationError, convert_checkpoint
from defuser_quant.cli import main

FAMILIES = ["qwen3_moe", "mixtral", "gpt_oss", "qwen3_vl_moe"]
STOCK_PER_EXPERT = {"qwen3_moe", "mixtral"}


def build_qwen3_vl_moe():
    """Tiny nested multimodal MoE; moe_intermediate 16 keeps gate_up_proj non-square."""
    text = dict(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, moe_intermediate_size=16, num_experts_per_tok=2, num_experts=8,
        max_position_embeddings=64, rope_parameters={"rope_theta": 5e5, "rope_type": "default", "mrope_section": [3, 3, 2]},
    )
    vision = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64,
                  num_position_embeddings=16, deepstack_visual_indexes=[0])
    config = Qwen3VLMoeConfig(text_config=text, vision_config=vision, image_token_id=127, video_token_id=126,
                              vision_start_token_id=125, vision_end_token_id=124)
    config.text_config._experts_implementation = "eager"
    torch.manual_seed(0)
    model = Qwen3VLMoeForConditionalGeneration(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 3:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model, torch.randint(0, 120, (2, 12), generator=gen)


def model_class(family: str):
    return Qwen3VLMoeForConditionalGeneration if family == "qwen3_vl_moe" else AutoModelForCausalLM


def tensors_of(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                assert key not in out
                out[key] = handle.get_tensor(key)
    return out


def hashes(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key], b[key]), key


def load(family: str, folder: Path):
    model, info = model_class(family).from_pretrained(folder, experts_implementation="eager", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model.eval()


def run_logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


class Family:
    """A tiny model, its reference logits and a multi-shard per-expert checkpoint of it."""

    def __init__(self, family: str, root: Path):
        self.family = family
        model, self.ids = build_qwen3_vl_moe() if family == "qwen3_vl_moe" else build(family)
        self.ref = run_logits(model, self.ids)
        self.src = root / "src"
        if family in STOCK_PER_EXPERT:
            model.save_pretrained(self.src, max_shard_size="40KB")
        else:  # stock saves these fused only: a defused model writes the per-expert layout
            dq.convert_model(model)
            model.save_pretrained(self.src, max_shard_size="40KB")
            dq.fuse_model(model)
        (self.src / "tokenizer_config.json").write_text('{"model_max_length": 64}\n')
        self.model = model
        self.root = root


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request, tmp_path_factory) -> Family:
    return Family(request.param, tmp_path_factory.mktemp(request.param))


def test_round_trip_identical_and_loads(fam: Family):
    before = hashes(fam.src)
    assert len(list(fam.src.glob("*.safetensors"))) > 3
    fused, back = fam.root / "fused", fam.root / "back"
    r1 = convert_checkpoint(fam.src, fused, to="fused", max_shard_size="50KB")
    r2 = convert_checkpoint(fused, back, to="per-expert", max_shard_size="30KB")
    assert hashes(fam.src) == before  # SRC never touched

    # every block converted, tensor counts add up, several shards with a correct index
    assert [b.action for b in r1.blocks] == ["merged", "merged"]
    assert [b.action for b in r2.blocks] == ["split", "split"]
    assert r1.tensors_out == r1.tensors_in - sum(b.tensors_in - b.tensors_out for b in r1.blocks)
    assert r2.tensors_out == r1.tensors_in and r1.bytes_out == r1.bytes_in
    for folder, report in ((fused, r1), (back, r2)):
        index = json.loads((folder / "model.safetensors.index.json").read_text())
        assert report.shards_out == len(set(index["weight_map"].values())) > 1
        assert index["metadata"]["total_size"] == report.bytes_out
        assert sorted(index["weight_map"]) == sorted(tensors_of(folder))
        assert (folder / "tokenizer_config.json").read_text() == '{"model_max_length": 64}\n'
        assert json.loads((folder / "config.json").read_text()) == json.loads((fam.src / "config.json").read_text())
    assert not list(fam.root.glob(".*"))  # no staging directory left behind

    # per-expert -> fused -> per-expert: the same keys and the same tensors, bit for bit
    assert_same_tensors(tensors_of(back), tensors_of(fam.src))
    fused_keys = tensors_of(fused)
    assert not any(".experts.0." in k for k in fused_keys)

    # the fused result equals the model's own state and loads with stock from_pretrained
    loaded = load(fam.family, fused)
    assert_same_tensors(loaded.state_dict(), fam.model.state_dict())
    assert torch.equal(run_logits(loaded, fam.ids), fam.ref)

    # the per-expert result loads stock where Transformers has a per-expert format,
    # and through pre-load patching where it stores the family fused only
    if fam.family in STOCK_PER_EXPERT:
        assert r2.stock_loadable
        assert torch.equal(run_logits(load(fam.family, back), fam.ids), fam.ref)
    else:
        assert not r2.stock_loadable and any("replace_fused_blocks" in w for w in r2.warnings)
        dq.replace_fused_blocks(fam.family)
        try:
            defused = load(fam.family, back)
        finally:
            dq.restore_fused_blocks()
        assert isinstance(defused.get_submodule(r2.blocks[0].path), dq.DefusedExperts)
        torch.testing.assert_close(run_logits(defused, fam.ids), fam.ref, rtol=1e-5, atol=1e-5)
        dq.fuse_model(defused)
        assert_same_tensors(defused.state_dict(), fam.model.state_dict())


def test_fused_input_from_stock_save(fam: Family):
    """A checkpoint saved fused by stock Transformers splits into exactly the per-expert source."""
    native = fam.root / "native"
    fam.model.save_pretrained(native, save_original_format=False)
    out = fam.root / "from-native"
    report = convert_checkpoint(native, out, to="per-expert")
    assert report.shards_out == 1 and (out / "model.safetensors").is_file()
    assert not (out / "model.safetensors.index.json").exists()
    got, want = tensors_of(out), tensors_of(fam.src)
    if fam.family == "mixtral":  # stock per-expert saves rename mlp -> block_sparse_moe; the converter keeps prefixes
        want = {k.replace(".block_sparse_moe.", ".mlp."): v for k, v in want.items()}
    assert_same_tensors(got, want)
    again = convert_checkpoint(native, fam.root / "native-again", to="fused")  # already fused: a verified copy
    assert [b.action for b in again.blocks] == ["kept", "kept"]
    assert_same_tensors(tensors_of(fam.root / "native-again"), tensors_of(native))


def test_transposed_fused_input(tmp_path):
    """Original Qwen3-VL-MoE releases store fused experts with the last two dims swapped."""
    model, _ = build_qwen3_vl_moe()
    native = tmp_path / "native"
    model.save_pretrained(native, save_original_format=False)
    swapped = {k: (v.transpose(1, 2).contiguous() if k.endswith(("gate_up_proj", "down_proj")) else v)
               for k, v in tensors_of(native).items()}
    assert swapped["model.language_model.layers.0.mlp.experts.gate_up_proj"].shape == (8, 64, 32)
    (native / "model.safetensors").unlink()
    save_file(swapped, native / "model.safetensors", metadata={"format": "pt"})
    convert_checkpoint(native, tmp_path / "per-expert", to="per-expert")
    convert_checkpoint(tmp_path / "per-expert", tmp_path / "fused", to="fused")
    assert_same_tensors(tensors_of(tmp_path / "fused"), model.state_dict())


@pytest.fixture(scope="module")
def qwen(tmp_path_factory) -> Family:
    return Family("qwen3_moe", tmp_path_factory.mktemp("safety"))


def test_refuses_unsafe_destinations(qwen: Family, tmp_path):
    src = qwen.src
    with pytest.raises(DestinationError, match="DST is SRC"):
        convert_checkpoint(src, src, to="fused")
    with pytest.raises(DestinationError, match="inside SRC"):
        convert_checkpoint(src, src / "out", to="fused")
    with pytest.raises(DestinationError, match="inside DST"):
        convert_checkpoint(src, src.parent, to="fused", overwrite=True)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    with pytest.raises(DestinationError, match="not empty"):
        convert_checkpoint(src, busy, to="fused")
    assert (busy / "keep.txt").read_text() == "mine" and len(list(busy.iterdir())) == 1
    report = convert_checkpoint(src, busy, to="fused", overwrite=True)
    assert not (busy / "keep.txt").exists() and report.converted
    empty = tmp_path / "empty"
    empty.mkdir()
    convert_checkpoint(src, empty, to="fused")  # an empty directory is fine
    assert (empty / "config.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize("exc", [RuntimeError("disk full"), KeyboardInterrupt()])
@pytest.mark.parametrize("existing", [False, True])
@pytest.mark.parametrize("workers", [1, 2])
def test_interrupted_write_leaves_nothing(qwen: Family, tmp_path, monkeypatch, exc, existing, workers):
    from defuser_quant.checkpoint import stream

    real, calls = stream.write_shard, []

    def failing(path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 3:
            raise exc
        return real(path, *args, **kwargs)

    monkeypatch.setattr(stream, "write_shard", failing)
    dst = tmp_path / "out"
    if existing:
        dst.mkdir()
        (dst / "old.txt").write_text("old")
    before = hashes(qwen.src)
    with pytest.raises(type(exc)):
        convert_checkpoint(qwen.src, dst, to="fused", max_shard_size="20KB", overwrite=existing, workers=workers)
    assert len(calls) >= 3
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out"] if existing else [])
    if existing:
        assert [p.name for p in dst.iterdir()] == ["old.txt"]
    assert hashes(qwen.src) == before


def test_without_kernel_copies(qwen: Family, tmp_path, monkeypatch):
    """Filesystems without copy_file_range fall back to buffered copies, byte for byte."""
    import errno

    from defuser_quant.checkpoint import source

    def unsupported(*args, **kwargs):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(source.os, "copy_file_range", unsupported)
    convert_checkpoint(qwen.src, tmp_path / "fused", to="fused", workers=1)
    convert_checkpoint(tmp_path / "fused", tmp_path / "back", to="per-expert", workers=1)
    assert_same_tensors(tensors_of(tmp_path / "back"), tensors_of(qwen.src))


def test_bad_checkpoints_are_refused(qwen: Family, tmp_path):
    tensors = tensors_of(qwen.src)
    broken = tmp_path / "broken"
    broken.mkdir()
    shutil.copy(qwen.src / "config.json", broken)
    missing = dict(tensors)
    del missing["model.layers.1.mlp.experts.5.up_proj.weight"]
    save_file(missing, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"experts\.5\.up_proj\.weight is missing"):
        convert_checkpoint(broken, tmp_path / "out", to="fused")
    quantized = dict(tensors)
    quantized["model.layers.0.mlp.experts.0.gate_proj.weight_scale"] = torch.ones(1)
    save_file(quantized, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match="quantized"):
        convert_checkpoint(broken, tmp_path / "out", to="fused")
    reshaped = dict(tensors)
    reshaped["model.layers.0.mlp.experts.3.down_proj.weight"] = torch.zeros(3, 3)
    save_file(reshaped, broken / "model.safetensors")
    with pytest.raises(CheckpointError, match="has shape"):
        convert_checkpoint(broken, tmp_path / "out", to="fused")
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="neither"):
        convert_checkpoint(broken, tmp_path / "out", to="fused")  # no weights
    with pytest.raises(CheckpointError, match="no config.json"):
        convert_checkpoint(tmp_path, tmp_path.parent / "nowhere", to="fused")
    assert not (tmp_path / "out").exists() and not (tmp_path.parent / "nowhere").exists()


def test_cli_convert_main_and_subprocess(qwen: Family, tmp_path, capsys):
    out = tmp_path / "fused"
    assert main(["convert", str(qwen.src), str(out), "--to", "fused", "--max-shard-size", "60KB"]) == 0
    text = capsys.readouterr().out
    assert "merged" in text and "model.layers.0.mlp.experts" in text
    assert main(["convert", str(qwen.src), str(out), "--to", "fused"]) == 2  # non-empty DST refused
    assert "not empty" in capsys.readouterr().err
    assert main(["convert", str(out), str(out), "--to", "per-expert", "--overwrite"]) == 2  # DST == SRC

    back = tmp_path / "back"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "defuser_quant", "convert", str(out), str(back), "--to", "per-expert", "--json"],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["to"] == "per-expert" and report["converted_blocks"] == 2
    assert_same_tensors(tensors_of(back), tensors_of(qwen.src))


# ----- families with a family-specific storage (defuser_quant/core/irregular) ----------------------

from model_zoo import build_tiny_model, irregular_model_types, run_main_output  # noqa: E402

IRREGULAR = irregular_model_types()


@pytest.mark.parametrize("model_type", IRREGULAR)
def test_irregular_family_round_trip(model_type, tmp_path):
    """Fused save -> convert per-expert == what a defused model saves, loads defused through the
    pre-load patch with the same output -> convert fused == the fused save, which stock
    Transformers loads with the same output. The family's own save format converts too, or is
    refused with the way out."""
    model, inputs = build_tiny_model(model_type)
    ref = run_main_output(model, inputs)
    model.save_pretrained(tmp_path / "fused_save", save_original_format=False)
    model.save_pretrained(tmp_path / "stock")
    fused_save = tensors_of(tmp_path / "fused_save")

    report = convert_checkpoint(tmp_path / "fused_save", tmp_path / "per_expert", to="per-expert")
    assert report.blocks and all(b.action == "split" for b in report.blocks), report.blocks
    unused = sum(b.unused_slabs for b in report.blocks)
    defused = model.__class__.from_pretrained(tmp_path / "fused_save", experts_implementation="eager").eval()
    dq.convert_model(defused)
    defused.save_pretrained(tmp_path / "defused_save")
    assert_same_tensors(tensors_of(tmp_path / "per_expert"), tensors_of(tmp_path / "defused_save"))

    model_type_on_disk = json.loads((tmp_path / "fused_save" / "config.json").read_text())["model_type"]
    assert dq.replace_fused_blocks(model_type_on_disk)
    try:
        loaded = model.__class__.from_pretrained(tmp_path / "per_expert", experts_implementation="eager").eval()
    finally:
        dq.restore_fused_blocks(model_type_on_disk)
    assert all(b.defused for b in dq.find_fused_blocks(loaded))
    torch.testing.assert_close(run_main_output(loaded, inputs), ref, rtol=1e-5, atol=1e-6)

    back = convert_checkpoint(tmp_path / "per_expert", tmp_path / "fused", to="fused")
    assert all(b.action == "merged" for b in back.blocks)
    fused = tensors_of(tmp_path / "fused")
    assert sorted(fused) == sorted(fused_save)
    differ = [k for k in fused_save if not torch.equal(fused_save[k], fused[k])]
    if unused:  # longcat_flash: the identity experts' unused gate_up_proj slabs come back as zeros
        assert any("no expert uses" in w for w in back.warnings), back.warnings
        for key in differ:
            routed = int(fused[key].shape[0]) - unused // len(report.blocks)
            assert torch.equal(fused_save[key][:routed], fused[key][:routed]) and not fused[key][routed:].any(), key
    else:
        assert not differ, differ[:3]
    reloaded = model.__class__.from_pretrained(tmp_path / "fused", experts_implementation="eager").eval()
    torch.testing.assert_close(run_main_output(reloaded, inputs), ref, rtol=1e-5, atol=1e-6)

    # The family's own format (what a plain save_pretrained writes).
    try:
        own = convert_checkpoint(tmp_path / "stock", tmp_path / "own_fused", to="fused")
    except CheckpointError as exc:
        assert "save_original_format=False" in str(exc)
        assert not (tmp_path / "own_fused").exists()
    else:
        assert all(b.action in ("merged", "kept") for b in own.blocks)
        if all(b.action == "merged" for b in own.blocks):  # longcat_flash: stock saves every slab per expert
            assert not any("no expert uses" in w for w in own.warnings), own.warnings
            assert_same_tensors(tensors_of(tmp_path / "own_fused"), fused_save)
        reloaded = model.__class__.from_pretrained(tmp_path / "own_fused", experts_implementation="eager").eval()
        torch.testing.assert_close(run_main_output(reloaded, inputs), ref, rtol=1e-5, atol=1e-6)
