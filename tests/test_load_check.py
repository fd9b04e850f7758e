"""Issue 13 item 5: under the pre-load patch, expert keys that do not load raise, naming the keys."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.modeling_utils import PreTrainedModel

import defuser_quant as dq
from defuser_quant.assets import TINY_MOE_PATH
from defuser_quant.core.load_check import ExpertLoadError
from quantized_checkpoints import broken_copy

ORIGINAL = PreTrainedModel.__dict__["_finalize_model_loading"]


def _rename(old, new):
    def edit(t):
        for k in [k for k in t if old in k]:
            t[k.replace(old, new)] = t.pop(k)
    return edit


def test_renamed_expert_keys_raise_naming_them(tmp_path):
    broken = broken_copy(TINY_MOE_PATH, tmp_path / "b", _rename("experts.3.gate_proj", "experts.3.w1"))
    dq.replace_fused_blocks("qwen3_moe")
    with pytest.raises(ExpertLoadError) as err:
        AutoModelForCausalLM.from_pretrained(broken)
    message = str(err.value)
    assert "4 missing: model.layers.0.mlp.experts.3.gate_proj.weight, model.layers.1.mlp.experts.3.gate_proj.weight" in message
    assert "4 unexpected: model.layers.0.mlp.experts.3.w1.weight" in message
    assert "defuser-quant check" in message


def test_a_missing_expert_raises(tmp_path):
    broken = broken_copy(TINY_MOE_PATH, tmp_path / "b", lambda t: t.pop("model.layers.2.mlp.experts.11.down_proj.weight"))
    dq.replace_fused_blocks("qwen3_moe")
    with pytest.raises(ExpertLoadError, match=r"1 missing: model\.layers\.2\.mlp\.experts\.11\.down_proj\.weight\."):
        AutoModelForCausalLM.from_pretrained(broken)


def test_expert_keys_under_another_prefix_raise(tmp_path):
    # A prefix the family's mapping does not rename: every expert key unexpected, every weight missing.
    broken = broken_copy(TINY_MOE_PATH, tmp_path / "b", _rename("model.layers.1.mlp.experts.", "model.language_model.layers.1.mlp.experts."))
    dq.replace_fused_blocks("qwen3_moe")
    with pytest.raises(ExpertLoadError, match=r"48 missing: .*48 unexpected: model\.language_model\.layers\.1\.mlp\.experts\.0\.down_proj"):
        AutoModelForCausalLM.from_pretrained(broken)


def test_a_complete_checkpoint_loads_and_matches_stock(tmp_path):
    ids = torch.arange(1, 17).unsqueeze(0)
    stock = AutoModelForCausalLM.from_pretrained(TINY_MOE_PATH)
    dq.replace_fused_blocks("qwen3_moe")
    patched = AutoModelForCausalLM.from_pretrained(TINY_MOE_PATH)
    with torch.no_grad():
        assert torch.equal(stock(ids).logits, patched(ids).logits)


def test_the_check_is_installed_only_while_patched(tmp_path):
    extra = "model.layers.0.mlp.experts.extra_scale"
    broken = broken_copy(TINY_MOE_PATH, tmp_path / "b", lambda t: t.__setitem__(extra, torch.ones(16)))
    assert PreTrainedModel.__dict__["_finalize_model_loading"] is ORIGINAL
    dq.replace_fused_blocks("qwen3_moe")
    assert PreTrainedModel.__dict__["_finalize_model_loading"] is not ORIGINAL
    with pytest.raises(ExpertLoadError, match=f"1 unexpected: {extra}"):
        AutoModelForCausalLM.from_pretrained(broken)
    dq.restore_fused_blocks()
    assert PreTrainedModel.__dict__["_finalize_model_loading"] is ORIGINAL
    # Stock loading is unchanged: Transformers reports the key and loads.
    _, info = AutoModelForCausalLM.from_pretrained(broken, output_loading_info=True)
    assert info["unexpected_keys"] == {extra}


def test_unread_identity_expert_slabs_are_not_a_load_error(tmp_path):
    from model_zoo import build_tiny_model, skip_unless_longcat_identity_experts_in_block

    skip_unless_longcat_identity_experts_in_block()

    model, _ = build_tiny_model("longcat_flash")
    model.save_pretrained(tmp_path / "longcat")
    dq.replace_fused_blocks(model.config.model_type)
    _, info = type(model).from_pretrained(tmp_path / "longcat", output_loading_info=True)
    assert info["unexpected_keys"] and not info["missing_keys"]  # the identity slabs, and nothing else
    broken = broken_copy(tmp_path / "longcat", tmp_path / "b", lambda t: t.pop("model.layers.0.mlp.experts.1.down_proj.weight"))
    with pytest.raises(ExpertLoadError, match=r"1 missing: model\.layers\.0\.mlp\.experts\.1\.down_proj\.weight"):
        type(model).from_pretrained(broken)
