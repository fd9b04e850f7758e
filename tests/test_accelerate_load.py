"""Convert before load: FUSED checkpoints through accelerate's loaders (and Transformers' device_map
loading) into models defused before loading. Every path either loads the experts the checkpoint
holds or raises naming the keys; none leaves them random or on ``meta``."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from accelerate import dispatch_model, init_empty_weights, load_checkpoint_and_dispatch
from accelerate.utils import load_checkpoint_in_model  # bound before any block is defused
from accelerate.utils import modeling as accelerate_modeling
from safetensors.torch import save_file

import defuser_quant as dq
from defuser_quant.core import accelerate_load
from tiny import FAMILIES, build, logits

FAMILY_NAMES = ["mixtral", "gpt_oss", "qwen3_moe"]  # w1/w3/w2 names; transposed+interleaved+bias; gate_proj names
# Layer 1 on disk, the rest on the CPU: the offload path on a machine without a GPU.
DISK_MAP = {
    "model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
    "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu",
}


def _fused_checkpoint(family, tmp_path, shards=False):
    """(file or index, reference state of the defused reference, its logits, ids): a FUSED checkpoint."""
    reference, ids = build(family)
    fused = {k: v.contiguous() for k, v in reference.state_dict().items()}
    assert any(v.dim() == 3 for v in fused.values())
    if shards:  # gate_up in one shard, down in the other: a fused tensor never spans files
        parts = ({k: v for k, v in fused.items() if "down_proj" not in k}, {k: v for k, v in fused.items() if "down_proj" in k})
        index = {"weight_map": {}}
        for i, part in enumerate(parts):
            name = f"model-{i + 1:05d}-of-00002.safetensors"
            save_file(part, str(tmp_path / name), metadata={"format": "pt"})
            index["weight_map"].update(dict.fromkeys(part, name))
        path = tmp_path / "model.safetensors.index.json"
        path.write_text(json.dumps(index))
    else:
        path = tmp_path / "model.safetensors"
        save_file(fused, str(path), metadata={"format": "pt"})
    dq.convert_model(reference)
    return str(path), {k: v.clone() for k, v in reference.state_dict().items()}, logits(reference, ids), ids


def _defused_before_load(family, meta=False):
    make_config, cls = FAMILIES[family]
    config = make_config()
    config._experts_implementation = "eager"
    if meta:
        with init_empty_weights():
            model = cls(config).eval()
    else:
        torch.manual_seed(123)
        model = cls(config).eval()
    assert dq.convert_model(model)
    return model


def _assert_loaded(model, expected_state, ref, ids):
    """Every tensor real and equal to the defused reference's, and the same logits."""
    assert not [n for n, p in model.named_parameters() if p.is_meta]
    state = model.state_dict()
    assert state.keys() == expected_state.keys()
    assert all(torch.equal(state[k], v) for k, v in expected_state.items())
    assert torch.equal(logits(model, ids), ref)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_load_checkpoint_in_model_with_a_device_map_carves_fused_experts(family, tmp_path):
    path, expected, ref, ids = _fused_checkpoint(family, tmp_path)
    model = _defused_before_load(family)
    load_checkpoint_in_model(model, path, device_map={"": "cpu"})
    _assert_loaded(model, expected, ref, ids)


def test_meta_model_loads_through_load_checkpoint_in_model_with_a_device_map(tmp_path):
    path, expected, ref, ids = _fused_checkpoint("mixtral", tmp_path)
    model = _defused_before_load("mixtral", meta=True)
    load_checkpoint_in_model(model, path, device_map={"": "cpu"})
    _assert_loaded(model, expected, ref, ids)


def test_offload_state_dict_and_sharded_checkpoint(tmp_path):
    path, expected, ref, ids = _fused_checkpoint("gpt_oss", tmp_path, shards=True)
    model = _defused_before_load("gpt_oss", meta=True)
    load_checkpoint_in_model(model, path, device_map={"": "cpu"}, offload_state_dict=True)
    _assert_loaded(model, expected, ref, ids)


def test_dtype_is_applied_to_the_carved_experts(tmp_path):
    path, expected, _, ids = _fused_checkpoint("mixtral", tmp_path)
    model = _defused_before_load("mixtral", meta=True)
    load_checkpoint_in_model(model, path, device_map={"": "cpu"}, dtype=torch.bfloat16)
    block = model.model.layers[1].mlp.experts
    assert block[5].w2.weight.dtype == torch.bfloat16
    assert torch.equal(block[5].w2.weight, expected["model.layers.1.mlp.experts.5.w2.weight"].to(torch.bfloat16))


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_load_checkpoint_and_dispatch_into_a_meta_model(family, tmp_path):
    path, expected, ref, ids = _fused_checkpoint(family, tmp_path)
    model = load_checkpoint_and_dispatch(_defused_before_load(family, meta=True), path, device_map={"": "cpu"})
    _assert_loaded(model, expected, ref, ids)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_load_checkpoint_and_dispatch_offloads_carved_experts_to_disk(family, tmp_path):
    path, _, ref, ids = _fused_checkpoint(family, tmp_path)
    model = _defused_before_load(family, meta=True)
    model = load_checkpoint_and_dispatch(model, path, device_map=DISK_MAP, offload_folder=str(tmp_path / "offload"))
    offloaded = json.loads((tmp_path / "offload" / "index.json").read_text())
    names = model.model.layers[1].mlp.experts.names
    assert f"model.layers.1.mlp.experts.7.{names.down}.weight" in offloaded
    assert not any(k.endswith(("gate_up_proj", "experts.down_proj")) for k in offloaded)
    assert model.model.layers[1].mlp.experts[0].projection("down").weight.is_meta  # on disk until a forward
    assert torch.equal(logits(model, ids), ref)


def test_load_checkpoint_in_model_to_disk_then_dispatch_model(tmp_path):
    path, _, ref, ids = _fused_checkpoint("qwen3_moe", tmp_path)
    model = _defused_before_load("qwen3_moe", meta=True)
    load_checkpoint_in_model(model, path, device_map=DISK_MAP, offload_folder=str(tmp_path / "offload"))
    model = dispatch_model(model, device_map=DISK_MAP, offload_dir=str(tmp_path / "offload"))
    assert torch.equal(logits(model, ids), ref)


def test_load_checkpoint_and_dispatch_with_auto_device_map(tmp_path):
    path, expected, ref, ids = _fused_checkpoint("qwen3_moe", tmp_path)
    model = load_checkpoint_and_dispatch(
        _defused_before_load("qwen3_moe", meta=True), path, device_map="auto", offload_folder=str(tmp_path / "off")
    )
    _assert_loaded(model, expected, ref, ids)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_cuda_dispatch_with_experts_offloaded_to_the_cpu(family, tmp_path):
    """The cpu-offload path proper: execution on the GPU, layer 1's carved experts kept on the CPU
    and moved in by accelerate's hook for each forward."""
    path, _, ref, ids = _fused_checkpoint(family, tmp_path)
    device_map = {"model.embed_tokens": 0, "model.rotary_emb": 0, "model.layers.0": 0, "model.layers.1": "cpu", "model.norm": 0, "lm_head": 0}
    model = load_checkpoint_and_dispatch(_defused_before_load(family, meta=True), path, device_map=device_map)
    assert model.model.layers[1].mlp.experts[3].projection("down").weight.is_meta  # offloaded
    assert model.model.layers[0].mlp.experts[3].projection("down").weight.device.type == "cuda"
    torch.testing.assert_close(logits(model, ids.cuda()).cpu(), ref, rtol=1e-4, atol=1e-5)


def test_fused_checkpoint_of_another_shape_is_refused_naming_the_key(tmp_path):
    reference, _ = build("mixtral")
    fused = {k: v.contiguous() for k, v in reference.state_dict().items()}
    fused["model.layers.0.mlp.experts.down_proj"] = torch.zeros(8, 64, 16)
    save_file(fused, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model = _defused_before_load("mixtral")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(accelerate_load.FusedCheckpointError, match=r"model\.layers\.0\.mlp\.experts\.down_proj.*\[8, 64, 16\].*\[8, 64, 32\]"):
        load_checkpoint_in_model(model, str(tmp_path / "model.safetensors"), device_map={"": "cpu"})
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing was set


def test_fused_next_to_per_expert_keys_is_refused_naming_both(tmp_path):
    reference, _ = build("mixtral")
    fused = {k: v.contiguous() for k, v in reference.state_dict().items()}
    fused["model.layers.1.mlp.experts.3.w1.weight"] = torch.zeros(32, 64)
    save_file(fused, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(accelerate_load.FusedCheckpointError, match=r"experts\.gate_up_proj and model\.layers\.1\.mlp\.experts\.3\.w1\.weight are both"):
        load_checkpoint_and_dispatch(_defused_before_load("mixtral", meta=True), str(tmp_path / "model.safetensors"), device_map={"": "cpu"})


def test_fused_models_and_other_callers_get_accelerates_own_result(tmp_path):
    path, _, _, ids = _fused_checkpoint("mixtral", tmp_path)
    model = _defused_before_load("mixtral")  # the reader is installed; a defused `model` in this frame
    assert getattr(accelerate_modeling.load_state_dict, "_defuser_quant_carves", False)
    raw = accelerate_modeling.load_state_dict(path)  # not called by load_checkpoint_in_model: untouched
    assert "model.layers.0.mlp.experts.gate_up_proj" in raw and isinstance(model.model.layers[0].mlp.experts, dq.DefusedExperts)
    reference, _ = build("mixtral")
    make_config, cls = FAMILIES["mixtral"]
    config = make_config()
    config._experts_implementation = "eager"
    with init_empty_weights():
        stock = cls(config).eval()
    load_checkpoint_in_model(stock, path, device_map={"": "cpu"})  # a fused model loads its fused tensors
    assert torch.equal(stock.model.layers[0].mlp.experts.gate_up_proj, reference.model.layers[0].mlp.experts.gate_up_proj)
    assert torch.equal(logits(stock, ids), logits(reference, ids))


def test_an_accelerate_that_reads_files_otherwise_is_warned_about(monkeypatch, caplog):
    accelerate_load.uninstall()
    try:
        def load_checkpoint_in_model(model, checkpoint, device_map=None):  # reads files some other way
            return None

        monkeypatch.setattr(accelerate_modeling, "load_checkpoint_in_model", load_checkpoint_in_model)
        monkeypatch.setitem(accelerate_load._STATE, "warned", False)
        with caplog.at_level(logging.WARNING, logger="defuser_quant.core.accelerate_load"):
            assert accelerate_load.install() is False
        assert "cannot load a FUSED checkpoint" in caplog.text
        assert not getattr(accelerate_modeling.load_state_dict, "_defuser_quant_carves", False)
    finally:
        monkeypatch.undo()
        assert accelerate_load.install()


_FRESH = """
import sys, torch
torch.set_num_threads(1)  # as the suite: same summation order, exact logits
from accelerate.utils import load_checkpoint_in_model  # before defuser_quant is imported
model = torch.load(sys.argv[1], weights_only=False)  # defused before loading, never converted here
load_checkpoint_in_model(model, sys.argv[2], device_map={"": "cpu"})
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[3])).logits, sys.argv[4])
"""


def test_unpickled_defused_model_in_a_fresh_process_loads_a_fused_checkpoint(tmp_path):
    import subprocess
    import sys

    path, _, ref, ids = _fused_checkpoint("mixtral", tmp_path)
    torch.save(_defused_before_load("mixtral"), tmp_path / "model.pt")
    torch.save(ids, tmp_path / "ids.pt")
    proc = subprocess.run(
        [sys.executable, "-c", _FRESH, str(tmp_path / "model.pt"), path, str(tmp_path / "ids.pt"), str(tmp_path / "out.pt")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.equal(torch.load(tmp_path / "out.pt"), ref)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
@pytest.mark.parametrize("layout", ["fused", "per_expert"])
@pytest.mark.parametrize("device_map", ["cpu", "disk"])
def test_from_pretrained_with_a_device_map_under_the_preload_patch(family, layout, device_map, tmp_path):
    """Transformers' own device_map loading of a class patched by replace_fused_blocks."""
    from transformers import AutoModelForCausalLM

    reference, ids = build(family)
    ref = logits(reference, ids)
    if layout == "fused":
        reference.save_pretrained(tmp_path / "ckpt", save_original_format=False)
    else:
        reference.save_pretrained(tmp_path / "ckpt")
    assert dq.replace_fused_blocks(reference.config.model_type)
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "ckpt", experts_implementation="eager", offload_folder=str(tmp_path / "offload"),
        device_map={"": "cpu"} if device_map == "cpu" else DISK_MAP,
    ).eval()
    blocks = [layer.mlp.experts for layer in model.model.layers]
    assert all(isinstance(b, dq.DefusedExperts) for b in blocks)
    if device_map == "disk":
        assert blocks[1][0].projection("down").weight.is_meta and hasattr(model.model.layers[1], "_hf_hook")
    else:
        assert not [n for n, p in model.named_parameters() if p.is_meta]
    out = logits(model, ids)
    if family == "gpt_oss":  # fused eager x @ W vs per-expert Linear: not bit-identical (tests/tiny.py EXACT)
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
    else:
        assert torch.equal(out, ref)
