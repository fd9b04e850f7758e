"""The ``rehome`` lean part (integrations.gptqmodel.rehome): ``run_single``'s per-batch rehome of a layer holding our
experts returns after one walk when GPTQModel's function would change nothing; a tensor elsewhere, an accelerate
hook, another module or other arguments go to GPTQModel's function; the patch is restored on Ctrl-C; other
internals are refused; inside a real run every skipped call is one GPTQModel's function leaves unchanged."""

from __future__ import annotations

import pytest
import torch
from torch import nn

pytest.importorskip("gptqmodel")

from gptqmodel.looper import forward_executor  # noqa: E402
from transformers import Qwen3MoeConfig  # noqa: E402
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM  # noqa: E402

from defuser_quant.core import convert_model  # noqa: E402
from defuser_quant.integrations.gptqmodel import rehome  # noqa: E402
from test_gptqmodel_layer_ahead import _run, _same  # noqa: E402
from test_gptqmodel_plugin import plugin, tiny  # noqa: E402, F401  (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CPU = torch.device("cpu")


@pytest.fixture
def model():
    config = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                            num_experts=4, num_experts_per_tok=2)
    m = Qwen3MoeForCausalLM(config)
    convert_model(m)
    return m


def _tensors(module: nn.Module) -> dict[str, tuple[int, torch.device]]:
    return {name: (id(t), t.device) for name, t in (*module.named_parameters(), *module.named_buffers())}


def _call(module: nn.Module, device: torch.device, root: nn.Module, **kwargs):
    """The call as ``run_single`` makes it, through whatever ``forward_executor`` holds now."""
    return forward_executor.rehome_module_to_device(module, device, move_parameters=True, move_buffers=True,
                                                    root_module=root, **kwargs)


def test_a_layer_already_in_place_is_answered_by_one_walk(model, monkeypatch):
    layer = model.model.layers[0]
    assert rehome.internals_refusal() is None
    assert rehome.reason_to_call_stock(layer, CPU) is None
    calls = []
    original = forward_executor.rehome_module_to_device
    monkeypatch.setattr(forward_executor, "rehome_module_to_device", lambda *a, **k: calls.append(a) or original(*a, **k))
    before = _tensors(layer)
    with rehome.lean_rehome() as stats:
        _call(layer, CPU, model)
        _call(layer, CPU, model)
    assert calls == [] and stats.as_dict() == {"skipped": 2, "stock": 0, "reasons": {}}
    assert _tensors(layer) == before
    original(layer, CPU, move_parameters=True, move_buffers=True, root_module=model)  # GPTQModel's own: a no-op too
    assert _tensors(layer) == before


def test_a_tensor_on_another_device_goes_to_gptqmodel_which_moves_it(model):
    layer = model.model.layers[0]
    indexed = torch.device("cpu", 0)  # unequal to every tensor's device (cpu): GPTQModel wraps each param again
    assert rehome.reason_to_call_stock(layer, indexed) == "a tensor on another device"
    before = _tensors(layer)
    with rehome.lean_rehome() as stats:
        _call(layer, indexed, model)
    after = _tensors(layer)
    assert stats.as_dict() == {"skipped": 0, "stock": 1, "reasons": {"a tensor on another device": 1}}
    moved = [name for name in before if name in dict(layer.named_parameters()) and before[name][0] != after[name][0]]
    assert moved and len(moved) == len(dict(layer.named_parameters()))  # GPTQModel's move ran


def test_an_accelerate_hook_goes_to_gptqmodel_which_retargets_it(model):
    from accelerate.hooks import AlignDevicesHook

    layer = model.model.layers[1]
    hook = AlignDevicesHook(execution_device=torch.device("meta"))
    layer.mlp.experts[2].up_proj._hf_hook = hook  # a plain attribute, as accelerate sets it
    assert rehome.reason_to_call_stock(layer, CPU) == "an accelerate hook"
    with rehome.lean_rehome() as stats:
        _call(layer, CPU, model)
    assert stats.reasons == {"an accelerate hook": 1}
    assert hook.execution_device == CPU  # GPTQModel's realignment ran


def test_other_modules_and_other_calls_go_to_gptqmodel(model):
    attention = model.model.layers[0].self_attn
    assert rehome.reason_to_call_stock(attention, CPU) == "not a layer holding our experts"
    layer = model.model.layers[0]
    with rehome.lean_rehome() as stats:
        _call(attention, CPU, model)
        forward_executor.rehome_module_to_device(layer, CPU, move_buffers=True, root_module=model)  # no parameters
        _call(layer, CPU, None)  # no root: GPTQModel skips its hook realignment, this leaves it to it
        _call(layer, CPU, model, only_mismatched=False)
    assert stats.skipped == 0
    assert stats.reasons == {"not a layer holding our experts": 1, "another call": 3}


def test_the_patch_is_restored_on_ctrl_c():
    original = forward_executor.rehome_module_to_device
    with pytest.raises(KeyboardInterrupt):
        with rehome.lean_rehome():
            assert forward_executor.rehome_module_to_device is not original
            raise KeyboardInterrupt
    assert forward_executor.rehome_module_to_device is original


def test_other_internals_are_refused(monkeypatch):
    monkeypatch.setitem(rehome.SOURCE_DIGESTS, "rehome_module_to_device", "0" * 16)
    assert "rehome_module_to_device differs from GPTQModel 7.6.0's source" in rehome.internals_refusal()
    monkeypatch.undo()
    monkeypatch.setattr(forward_executor, "rehome_module_to_device", lambda *a, **k: None)
    assert "forward_executor to import" in rehome.internals_refusal()


def test_the_bookkeeping_check_names_the_rehome_part(monkeypatch):
    from defuser_quant.integrations.gptqmodel import overhead

    monkeypatch.setitem(rehome.SOURCE_DIGESTS, "_realign_materialized_hooks", "0" * 16)
    assert "_realign_materialized_hooks differs" in overhead.internals_mismatch()["rehome"]


@pytest.mark.slow
def test_inside_gptqmodels_run_every_skipped_call_is_one_gptqmodel_leaves_unchanged(plugin, tiny, tmp_path,  # noqa: F811
                                                                                    monkeypatch):
    from defuser_quant.integrations.gptqmodel.overhead import DEFAULT_PARTS

    checked = []
    lean = rehome._lean

    def checked_lean(original, lock, stats, stats_lock):
        answered = lean(original, lock, stats, stats_lock)

        def call(module, device, **kwargs):
            skipped, before = stats.skipped, _tensors(module)
            answered(module, device, **kwargs)
            if stats.skipped > skipped:  # answered by the walk: GPTQModel's own call must leave every tensor in place
                original(module, device, **kwargs)
                checked.append(_tensors(module) == before)

        return call

    monkeypatch.setattr(rehome, "_lean", checked_lean)
    assert "rehome" in DEFAULT_PARTS
    stats, lean = _run(plugin, tiny, tmp_path, "rehome", parts=DEFAULT_PARTS)
    assert stats.disabled == {} and stats.rehome.skipped == len(checked) > 0 and all(checked)
    assert stats.rehome.stock == 0  # every layer forward of this run holds our experts, already in place
    without, stock_run = _run(plugin, tiny, tmp_path, "norehome", parts=DEFAULT_PARTS - {"rehome"})
    assert without.rehome is None and _same(lean, stock_run)
