"""The pre-load patch across model types that share classes, and conversion mappings that
Transformers registers under a sub-model scope or a class key."""

from __future__ import annotations

import pytest
import torch

import defuser_quant as dq
from model_zoo import build_tiny_model, run_main_output


def _load(model, path):
    return type(model).from_pretrained(path, experts_implementation="eager", attn_implementation="eager").eval()


def _assert_loads_exactly(model, path, inputs, ref, expected, defused: bool):
    loaded = _load(model, path)
    blocks = [b for b in dq.find_fused_blocks(loaded) if b.kind == "experts"]
    assert blocks and all(b.defused == defused for b in blocks), [(b.path, b.defused) for b in blocks]
    torch.testing.assert_close(run_main_output(loaded, inputs), ref, rtol=1e-5, atol=1e-5)
    if defused:
        dq.fuse_model(loaded)
    state = loaded.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in expected)


@pytest.mark.parametrize(("kept", "restored"), [("qwen3_5_moe_text", "qwen3_5_moe"), ("qwen3_5_moe", "qwen3_5_moe_text")])
def test_restoring_one_model_type_keeps_the_other_sharing_its_classes(kept, restored, tmp_path):
    model, inputs = build_tiny_model(kept)
    ref = run_main_output(model, inputs)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path)
    assert dq.replace_fused_blocks(kept) and dq.replace_fused_blocks(restored)
    dq.restore_fused_blocks(restored)
    _assert_loads_exactly(model, tmp_path, inputs, ref, expected, defused=True)
    dq.restore_fused_blocks(kept)  # the last patch on the shared classes goes: stock again
    _assert_loads_exactly(model, tmp_path, inputs, ref, expected, defused=False)


def test_untied_fused_keys_come_back_only_with_the_last_patch():
    """diffusion_gemma ties its encoder/decoder fused experts by key; two patches over the same
    classes (as model types sharing a modeling file) untie once and re-tie at the last restore."""
    from defuser_quant.core import patching

    owners = patching._untie_fused_keys("diffusion_gemma")
    assert owners
    original = {o: patching._UNTIED[o][0] for o in owners}
    assert all(not any(patching._FUSED_KEY.search(k) for k in o._tied_weights_keys) for o in owners)
    assert patching._untie_fused_keys("diffusion_gemma") == owners
    patching._retie_fused_keys(owners)
    assert all(not any(patching._FUSED_KEY.search(k) for k in o._tied_weights_keys) for o in owners)
    patching._retie_fused_keys(owners)
    assert all(o._tied_weights_keys is original[o] for o in owners) and not patching._UNTIED


@pytest.mark.parametrize("model_type", ["qwen3_omni_moe", "inkling2", "unlimited_ocr"])
def test_scoped_and_class_keyed_mappings_are_patched_and_restored(model_type):
    """Transformers applies the mapping of each sub-model (its model type or class name) scoped to
    it: a merge left there would build fused tensors the patched model does not have."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from defuser_quant.core import patching
    from defuser_quant.core.split_ops import is_expert_merge

    if model_type not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"this Transformers has no {model_type}")
    keys = patching._scoped_mapping_keys(model_type, dense=True)
    if not keys:
        pytest.skip(f"this Transformers registers {model_type}'s mappings under its model type only")
    before = {k: repr(get_checkpoint_conversion_mapping(k)) for k in keys}
    assert dq.replace_fused_blocks(model_type)
    for key in keys:
        assert not any(is_expert_merge(t) for t in get_checkpoint_conversion_mapping(key)), key
    dq.restore_fused_blocks(model_type)
    assert {k: repr(get_checkpoint_conversion_mapping(k)) for k in keys} == before
    assert not patching._MAPPINGS


def test_sub_config_scoped_mapping_found_when_the_sub_model_has_no_config_class_of_its_own(tmp_path, monkeypatch):
    """Transformers 5.22 gives MistralLarge4TextModel the composite config class (5.24 its own),
    yet looks its conversion mapping up under the text config's type: the patch must find that
    scope from the config's sub_configs, or fused checkpoints do not split (load check raises)."""
    modeling = pytest.importorskip("transformers.models.mistral_large4.modeling_mistral_large4")
    model, inputs = build_tiny_model("mistral_large4")
    ref = run_main_output(model, inputs)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    # As in 5.22: the text model's config_class is inherited from the composite PreTrainedModel.
    monkeypatch.setattr(modeling.MistralLarge4TextModel, "config_class", modeling.MistralLarge4PreTrainedModel.config_class)
    assert dq.replace_fused_blocks(model.config.model_type)
    _assert_loads_exactly(model, tmp_path / "fused", inputs, ref, expected, defused=True)
