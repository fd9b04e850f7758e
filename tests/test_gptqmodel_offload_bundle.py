"""One disk-offload bundle per experts block (integrations/gptqmodel/offload_bundle.py): what
GPTQModel's save and accelerate's hooks read back is each module's tensors; a bundle is written
whole or not at all and never over an existing folder. (The whole GPTQModel run with the bundles
giving stock's checkpoint is tests/test_gptqmodel_overhead.py.)"""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _model(experts: int = 3, layers: int = 1):
    """``model.layers.<l>.mlp.experts.<e>.{gate,down}_proj`` Linears, each knowing its full name (as
    GPTQModel's quantized modules do)."""
    torch.manual_seed(0)
    root = nn.Module()
    root.model = nn.Module()
    root.model.layers = nn.ModuleList([nn.Module() for _ in range(layers)])
    paths = []
    for layer_index, layer in enumerate(root.model.layers):
        layer.mlp = nn.Module()
        layer.mlp.experts = nn.ModuleList()
        for e in range(experts):
            expert = nn.Module()
            for proj in ("gate_proj", "down_proj"):
                linear = nn.Linear(8, 4, bias=proj == "down_proj")
                linear.register_buffer("g_idx", torch.arange(8, dtype=torch.int32))
                linear.name = f"model.layers.{layer_index}.mlp.experts.{e}.{proj}"
                setattr(expert, proj, linear)
                paths.append(linear.name)
            layer.mlp.experts.append(expert)
    return root, frozenset(paths)


def _bundler(model, paths, calls, keep_last: bool = False):
    from defuser_quant.integrations.gptqmodel.offload_bundle import BundleStats, _Bundler

    def stock(module=None, model=None, disk_path=".", force=False):
        calls.append(module.name)

    stats = BundleStats()
    return _Bundler(model, paths, stats, stock, keep_last), stats


def _saved_tensor(root: str, name: str, like: torch.Tensor) -> torch.Tensor:
    """What GPTQModel's save reads for the meta tensor ``name`` under the offload folder ``root``."""
    from gptqmodel.utils.model import _resolve_offload_entry, _split_parameter_path

    module_path, leaf = _split_parameter_path(name)
    ref = _resolve_offload_entry(root, module_path, leaf, like.dtype, tuple(like.shape), {})
    assert ref is not None and ref.format == "safetensors"
    start, end = ref.data_offsets
    with open(ref.path, "rb") as fh:
        fh.seek(start)
        data = bytearray(fh.read(end - start))
    return torch.frombuffer(data, dtype=like.dtype).view(like.shape)


def test_a_block_is_bundled_once_all_its_modules_asked_and_reads_back_as_they_were(tmp_path):
    model, paths = _model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls: list[str] = []
    bundler, stats = _bundler(model, paths, calls)
    modules = [model.get_submodule(p) for p in sorted(paths)]
    for i, module in enumerate(modules):
        bundler.offload(module=module, model=model, disk_path=str(tmp_path), force=True)
        assert stats.bundles == (1 if i == len(modules) - 1 else 0)  # written when the last one asked
        if i < len(modules) - 1:
            assert module.weight.device.type == "cpu"  # kept as it is until then
    assert calls == [] and stats.modules == 6 and stats.tensors == len(before) and stats.at_end == 0
    assert sorted(os.listdir(tmp_path)) == ["model.layers.0.mlp.experts"]
    for name, tensor in before.items():
        module = model.get_submodule(name.rsplit(".", 1)[0])
        assert getattr(module, name.rsplit(".", 1)[1]).device.type == "meta"  # offloaded, as disk_offload leaves it
        assert torch.equal(_saved_tensor(str(tmp_path), name, tensor), tensor)  # GPTQModel's save reads it back
    # accelerate's hooks bring the tensors back for a forward, as after GPTQModel's own offload
    x = torch.randn(2, 8)
    linear = model.get_submodule("model.layers.0.mlp.experts.1.down_proj")
    expected = x @ before["model.layers.0.mlp.experts.1.down_proj.weight"].T + before["model.layers.0.mlp.experts.1.down_proj.bias"]
    assert torch.allclose(linear(x), expected)


def test_other_modules_and_existing_folders_take_gptqmodels_offload(tmp_path):
    model, paths = _model()
    calls: list[str] = []
    bundler, stats = _bundler(model, paths, calls)
    other = nn.Linear(2, 2)
    other.name = "model.layers.0.self_attn.q_proj"
    bundler.offload(module=other, model=model, disk_path=str(tmp_path), force=True)
    (tmp_path / "model.layers.0.mlp.experts").mkdir()  # left by an earlier run: never overwritten
    first = model.get_submodule(sorted(paths)[0])
    bundler.offload(module=first, model=model, disk_path=str(tmp_path), force=True)
    assert calls == [other.name, first.name] and stats.bundles == 0
    assert dict(stats.stock) == {"not an expert projection of our blocks": 1, "the block's offload folder exists": 1}


def test_a_failed_or_interrupted_write_leaves_the_modules_and_no_folder(tmp_path, monkeypatch):
    import safetensors.torch

    model, paths = _model(experts=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls: list[str] = []
    bundler, stats = _bundler(model, paths, calls)

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    for path in sorted(paths):
        bundler.offload(module=model.get_submodule(path), model=model, disk_path=str(tmp_path), force=True)
    assert sorted(calls) == sorted(paths) and stats.stock["the bundle failed to write"] == 2  # GPTQModel's offload
    assert os.listdir(tmp_path) == [] and stats.bundles == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    bundler, _ = _bundler(model, paths, calls)
    with pytest.raises(KeyboardInterrupt):
        for path in sorted(paths):
            bundler.offload(module=model.get_submodule(path), model=model, disk_path=str(tmp_path), force=True)
    assert os.listdir(tmp_path) == []  # no half-written bundle that looks whole
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_modules_of_an_unfinished_block_are_bundled_when_the_block_ends(tmp_path, monkeypatch):
    from gptqmodel.looper import stage_layer

    from defuser_quant.integrations.gptqmodel.offload_bundle import bundled_offload

    model, paths = _model()
    original = stage_layer.offload_to_disk
    with bundled_offload(model, paths) as stats:
        assert stage_layer.offload_to_disk is not original
        first = model.get_submodule(sorted(paths)[0])
        stage_layer.offload_to_disk(module=first, model=model, disk_path=str(tmp_path), force=True)
        assert stats.bundles == 0
    assert stage_layer.offload_to_disk is original
    assert (stats.bundles, stats.modules, stats.at_end) == (1, 1, 1)
    assert first.weight.device.type == "meta"


def test_an_interrupted_run_leaves_unbundled_modules_as_they_are(tmp_path):
    from gptqmodel.looper import stage_layer

    from defuser_quant.integrations.gptqmodel.offload_bundle import bundled_offload

    model, paths = _model()
    original = stage_layer.offload_to_disk
    first = model.get_submodule(sorted(paths)[0])
    with pytest.raises(KeyboardInterrupt):
        with bundled_offload(model, paths) as stats:
            stage_layer.offload_to_disk(module=first, model=model, disk_path=str(tmp_path), force=True)
            raise KeyboardInterrupt
    assert stage_layer.offload_to_disk is original and stats.bundles == 0
    assert first.weight.device.type == "cpu" and os.listdir(tmp_path) == []


def test_the_index_is_split_per_member_in_one_pass():
    from defuser_quant.integrations.gptqmodel.offload_bundle import entries_by_member

    index = {"3.gate_proj.qweight": {"dtype": "int32"}, "3.gate_proj.scales": {"dtype": "float16"},
             "12.down_proj.qweight": {"dtype": "int32"}, "3.up_proj.g_idx": {"dtype": "int32"}}
    entries = entries_by_member(index)
    assert entries == {"3.gate_proj": {"qweight": {"dtype": "int32"}, "scales": {"dtype": "float16"}},
                       "12.down_proj": {"qweight": {"dtype": "int32"}}, "3.up_proj": {"g_idx": {"dtype": "int32"}}}
    entries["3.gate_proj"]["qweight"]["dtype"] = "changed"  # each member's weights map owns its entries
    assert index["3.gate_proj.qweight"]["dtype"] == "int32"


def test_a_module_missing_from_its_bundles_index_takes_gptqmodels_offload(tmp_path, monkeypatch):
    from defuser_quant.integrations.gptqmodel import offload_bundle

    model, paths = _model(experts=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    write = offload_bundle._write_bundle

    def without_expert_1_down(*args, **kwargs):
        index, nbytes = write(*args, **kwargs)
        return {k: v for k, v in index.items() if not k.startswith("1.down_proj.")}, nbytes

    monkeypatch.setattr(offload_bundle, "_write_bundle", without_expert_1_down)
    calls: list[str] = []
    bundler, stats = _bundler(model, paths, calls)
    for path in sorted(paths):
        bundler.offload(module=model.get_submodule(path), model=model, disk_path=str(tmp_path), force=True)
    missing = "model.layers.0.mlp.experts.1.down_proj"
    assert calls == [missing] and stats.stock["its hooks failed to attach"] == 1 and stats.modules == 3
    kept = model.get_submodule(missing)  # its tensors where they were, for GPTQModel's own offload
    assert kept.weight.device.type == "cpu" and torch.equal(kept.weight, before[missing + ".weight"])
    assert model.get_submodule("model.layers.0.mlp.experts.0.down_proj").weight.device.type == "meta"


def _layer_paths(paths, layer: int) -> list[str]:
    return sorted(p for p in paths if p.startswith(f"model.layers.{layer}."))


@pytest.mark.parametrize("order", ["layer 0 first", "layer 1 first"])
def test_keep_last_leaves_the_block_that_completes_last_in_memory(tmp_path, order):
    model, paths = _model(experts=2, layers=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls: list[str] = []
    bundler, stats = _bundler(model, paths, calls, keep_last=True)
    first, last = (0, 1) if order == "layer 0 first" else (1, 0)
    asks = _layer_paths(paths, last)[:-1] + _layer_paths(paths, first) + _layer_paths(paths, last)[-1:]
    for path in asks:  # the last block's modules ask before and after the other block completes
        bundler.offload(module=model.get_submodule(path), model=model, disk_path=str(tmp_path), force=True)
    assert calls == [] and (stats.bundles, stats.modules, stats.kept_in_memory) == (1, 4, 4)
    assert os.listdir(tmp_path) == [f"model.layers.{first}.mlp.experts"]  # nothing written for the last block
    for name, tensor in before.items():
        kept = name.startswith(f"model.layers.{last}.")
        module = model.get_submodule(name.rsplit(".", 1)[0])
        current = getattr(module, name.rsplit(".", 1)[1])
        assert current.device.type == ("cpu" if kept else "meta")
        if kept:  # in memory, unchanged: GPTQModel's save takes it from there
            assert torch.equal(current, tensor)
        else:
            assert torch.equal(_saved_tensor(str(tmp_path), name, tensor), tensor)


def test_keep_last_writes_every_block_while_another_has_not_been_bundled(tmp_path):
    model, paths = _model(experts=2, layers=2)
    calls: list[str] = []
    bundler, stats = _bundler(model, paths, calls, keep_last=True)
    (tmp_path / "model.layers.0.mlp.experts").mkdir()  # left by an earlier run: layer 0 goes to GPTQModel
    for path in _layer_paths(paths, 0) + _layer_paths(paths, 1):
        bundler.offload(module=model.get_submodule(path), model=model, disk_path=str(tmp_path), force=True)
    assert calls == _layer_paths(paths, 0)
    assert (stats.bundles, stats.modules, stats.kept_in_memory) == (1, 4, 0)  # layer 1 is not known to be last
    assert model.get_submodule(_layer_paths(paths, 1)[0]).weight.device.type == "meta"


def test_without_keep_last_every_block_is_bundled(tmp_path):
    model, paths = _model(experts=2, layers=2)
    calls: list[str] = []
    bundler, stats = _bundler(model, paths, calls)
    for path in sorted(paths):
        bundler.offload(module=model.get_submodule(path), model=model, disk_path=str(tmp_path), force=True)
    assert (stats.bundles, stats.modules, stats.kept_in_memory) == (2, 8, 0)
    assert sorted(os.listdir(tmp_path)) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]


def test_gptqmodels_checkpointing_leaves_the_offload_parts_stock():
    from types import SimpleNamespace

    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from defuser_quant import convert_model
    from defuser_quant.integrations.gptqmodel.overhead import lean_bookkeeping

    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
        vocab_size=64, hidden_size=32, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=2, num_experts_per_tok=1))
    convert_model(model)
    gptq_model = SimpleNamespace(model=model, quantize_config=SimpleNamespace(offload_to_disk=True))
    with lean_bookkeeping(gptq_model, frozenset({"offload_bundle", "keep_last_block"}), checkpointed=True) as stats:
        pass
    assert set(stats.disabled) == {"offload_bundle", "keep_last_block"} and stats.offload_bundle is None
    assert "checkpoint=" in stats.disabled["keep_last_block"]
    with lean_bookkeeping(gptq_model, frozenset({"keep_last_block"})) as stats:
        pass
    assert stats.disabled == {"keep_last_block": "needs the offload_bundle part"}
    with lean_bookkeeping(gptq_model, frozenset({"recopy", "shard_handles"})) as stats:  # both live inside materialize
        pass
    assert stats.disabled == {"recopy": "needs the materialize part", "shard_handles": "needs the materialize part"}
