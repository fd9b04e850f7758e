"""Multimodal and nested models: experts under ``model.language_model.``, thinker and talker.

* Saving a defused composite model writes the experts under the same prefixes as every other
  tensor of their layer (``model.language_model.layers.N.`` for the Qwen3-VL/Qwen3.5/GLM-4.V
  families; the family's original format where its reverse renamings rewrite them), and the
  checkpoint loads back through the pre-load patch with identical weights.
* qwen3_omni_moe: the thinker's and the talker's experts are both defused and ``generate()``
  (text, and text + speech) gives the same tokens and waveform as the fused model.
"""

from __future__ import annotations

import os
import re

import pytest
import torch
from safetensors import safe_open

import defuser_quant as dq
from model_zoo import _reinit_experts, tiny_config, torch_threads

NESTED = ["qwen3_vl_moe", "qwen3_5_moe", "glm4v_moe", "ernie4_5_vl_moe", "qwen3_omni_moe", "deepseek_ocr2"]
# Families whose original checkpoint format keeps the ``model.language_model.`` prefix.
KEEPS_LANGUAGE_MODEL_PREFIX = {"qwen3_vl_moe", "qwen3_5_moe", "glm4v_moe"}
_EXPERT_KEY = re.compile(r"^(?P<layer>.*\.layers\.\d+\.).*\bexperts\.\d+\.")
_LAYER_KEY = re.compile(r"^(?P<layer>.*\.layers\.\d+\.)")
_FUSED_KEY = re.compile(r"(^|\.)experts\.(gate_up_proj|up_proj|down_proj)(_bias)?$")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def _omni_config():
    cfg = tiny_config("qwen3_omni_moe")
    talker = cfg.talker_config
    # Real checkpoints carry these; the defaults do not fit a 2-layer, 256-token model.
    talker.speaker_id = {"ethan": 5}
    talker.accept_hidden_layer = 1
    talker.text_config.vocab_size = 1280  # generate() suppresses the top 1024 ids of the codec vocabulary
    talker.num_code_groups = talker.code_predictor_config.num_code_groups = cfg.code2wav_config.num_quantizers
    return cfg


def _build(model_type: str):
    """The full composite model of ``model_type`` (vision/audio towers included), tiny and seeded."""
    from transformers import AutoModelForImageTextToText, Qwen3OmniMoeForConditionalGeneration

    torch.manual_seed(0)
    if model_type == "qwen3_omni_moe":
        model = Qwen3OmniMoeForConditionalGeneration(_omni_config())
    else:
        model = AutoModelForImageTextToText.from_config(tiny_config(model_type))
    _reinit_experts(model, torch.Generator().manual_seed(0))
    return model.eval()


def _keys(path) -> list[str]:
    keys = []
    for name in os.listdir(path):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(path, name), "pt") as f:
                keys += list(f.keys())
    return keys


@pytest.mark.parametrize("model_type", NESTED)
def test_saved_experts_keep_their_layer_prefix_and_load_back(model_type, tmp_path):
    model = _build(model_type)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "stock")
    stock = _keys(tmp_path / "stock")
    report = dq.convert_model(model)
    assert report.experts_blocks
    model.save_pretrained(tmp_path / "defused")
    saved = _keys(tmp_path / "defused")

    experts = [k for k in saved if _EXPERT_KEY.match(k)]
    others = [k for k in saved if not _EXPERT_KEY.match(k)]
    assert experts
    # Defusing renames nothing but expert tensors, and experts sit under their layer's prefix.
    assert sorted(others) == sorted(k for k in stock if not _EXPERT_KEY.match(k) and not _FUSED_KEY.search(k))
    layer_prefixes = {m["layer"] for k in others if (m := _LAYER_KEY.match(k))}
    assert {_EXPERT_KEY.match(k)["layer"] for k in experts} <= layer_prefixes
    if model_type in KEEPS_LANGUAGE_MODEL_PREFIX:
        assert all(k.startswith("model.language_model.layers.") for k in experts), experts[:3]

    dq.replace_fused_blocks(model.config.model_type)  # tests/conftest.py restores it
    loaded = type(model).from_pretrained(tmp_path / "defused", attn_implementation="eager").eval()
    assert all(b.defused for b in dq.find_fused_blocks(loaded))
    dq.fuse_model(loaded)
    got = loaded.state_dict()
    assert got.keys() == expected.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)


def _generate(model, ids, **kwargs):
    torch.manual_seed(0)
    with torch.no_grad():
        return model.generate(
            input_ids=ids, attention_mask=torch.ones_like(ids), thinker_max_new_tokens=4, talker_max_new_tokens=4,
            talker_do_sample=False, **kwargs,
        )


def test_qwen3_omni_thinker_and_talker_defused_generate_unchanged():
    model = _build("qwen3_omni_moe")
    c = model.config
    ids = torch.tensor([[c.im_start_token_id, c.user_token_id, 11, 12, 13, 14, c.im_start_token_id, c.assistant_token_id]])
    text_ref = _generate(model, ids, return_audio=False)
    tokens_ref, wav_ref = _generate(model, ids, return_audio=True, speaker="Ethan")

    report = dq.convert_model(model)
    paths = [r.path for r in report.experts_blocks]
    assert any(p.startswith("thinker.") for p in paths) and any(p.startswith("talker.") for p in paths), paths
    assert torch.equal(_generate(model, ids, return_audio=False), text_ref)
    tokens, wav = _generate(model, ids, return_audio=True, speaker="Ethan")
    assert torch.equal(tokens, tokens_ref) and torch.equal(wav, wav_ref)

    dq.fuse_model(model)
    tokens, wav = _generate(model, ids, return_audio=True, speaker="Ethan")
    assert torch.equal(tokens, tokens_ref) and torch.equal(wav, wav_ref)
