"""The shipped corpus and tiny trained qwen3_moe (defuser_quant/assets), checked from the repo.

Fast (a few seconds): one load of the model, a heldout slice of 16 x 128 tokens.
"""
from __future__ import annotations

import json
import math
import re

import pytest
import torch

from defuser_quant.assets import CORPUS_DIR, TINY_MOE_PATH

DOC_SEP = "\n\n\n"
SEQ_LEN = 128
N_SEQS = 16
MAX_PPL_RATIO = 0.5  # model perplexity / unigram perplexity on held-out text


def _docs(name: str) -> list[str]:
    text = (CORPUS_DIR / name).read_text(encoding="utf-8")
    return [d for d in text.strip("\n").split(DOC_SEP) if d.strip()]


def _paragraphs(doc: str, min_len: int = 80) -> set[str]:
    out = set()
    for p in re.split(r"\n\s*\n", doc):
        norm = re.sub(r"\s+", " ", p).strip()
        if len(norm) >= min_len:
            out.add(norm)
    return out


def _ids(tok, docs: list[str]) -> list[int]:
    ids: list[int] = []
    for d in docs:
        ids.extend(tok(d, add_special_tokens=False, verbose=False)["input_ids"])
        ids.append(tok.eos_token_id)
    return ids


@pytest.fixture(scope="module")
def loaded(monkeypatch_module):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch_module.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch_module.setenv("TRANSFORMERS_OFFLINE", "1")
    model = AutoModelForCausalLM.from_pretrained(
        TINY_MOE_PATH, local_files_only=True, experts_implementation="eager"
    )
    model.eval()
    tok = AutoTokenizer.from_pretrained(TINY_MOE_PATH, local_files_only=True)
    return model, tok


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


@pytest.fixture(scope="module")
def heldout_slice(loaded) -> torch.Tensor:
    _, tok = loaded
    ids = _ids(tok, _docs("heldout.txt"))
    assert len(ids) >= N_SEQS * SEQ_LEN
    return torch.tensor(ids[: N_SEQS * SEQ_LEN]).view(N_SEQS, SEQ_LEN)


# --------------------------------------------------------------------------- corpus


def test_corpus_license_and_files():
    lic = (CORPUS_DIR / "LICENSE.md").read_text(encoding="utf-8")
    assert "pydoc_data" in lic and "Python Software Foundation" in lic and "PSF License" in lic
    assert "scripts/build_corpus.py" in lic
    total = sum(p.stat().st_size for p in CORPUS_DIR.iterdir())
    assert total < 1_000_000
    train, held = _docs("train.txt"), _docs("heldout.txt")
    held_chars = sum(map(len, held))
    assert 0.05 < held_chars / (held_chars + sum(map(len, train))) < 0.15


def test_corpus_train_heldout_disjoint():
    split = json.loads((CORPUS_DIR / "split.json").read_text(encoding="utf-8"))
    assert not set(split["train"]["topics"]) & set(split["heldout"]["topics"])
    train, held = _docs("train.txt"), _docs("heldout.txt")
    assert len(train) == len(split["train"]["topics"]) and len(held) == len(split["heldout"]["topics"])
    train_text = (CORPUS_DIR / "train.txt").read_text(encoding="utf-8")
    train_pars = set().union(*map(_paragraphs, train))
    for doc in held:
        assert doc not in train_text
        assert not _paragraphs(doc) & train_pars


# --------------------------------------------------------------------------- model


def test_folder_contents_and_size():
    names = {p.name for p in TINY_MOE_PATH.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "training_report.json", "README.md"} <= names
    assert sum(p.stat().st_size for p in TINY_MOE_PATH.iterdir()) < 20_000_000


def test_config_shape(loaded):
    model, tok = loaded
    cfg = model.config
    assert cfg.model_type == "qwen3_moe"
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok) == (4, 128, 16, 2)
    assert (cfg.moe_intermediate_size, cfg.intermediate_size) == (128, 256)
    assert cfg.hidden_size % 128 == 0 and cfg.moe_intermediate_size % 128 == 0
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 32)
    assert cfg.tie_word_embeddings and cfg.max_position_embeddings == 512
    assert cfg.vocab_size == len(tok) == 4096
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    experts = model.model.layers[0].mlp.experts
    assert tuple(experts.gate_up_proj.shape) == (16, 256, 128)
    assert tuple(experts.down_proj.shape) == (16, 128, 128)


def test_heldout_perplexity_beats_unigram(loaded, heldout_slice):
    model, tok = loaded
    counts = torch.bincount(torch.tensor(_ids(tok, _docs("train.txt"))), minlength=len(tok)).double() + 1.0
    logp_uni = torch.log(counts / counts.sum())
    targets = heldout_slice[:, 1:]
    uni_ppl = math.exp(float(-logp_uni[targets].mean()))
    with torch.no_grad():
        logits = model(input_ids=heldout_slice).logits.float()
    nll = -torch.log_softmax(logits[:, :-1], -1).gather(-1, targets[..., None]).mean()
    ppl = math.exp(float(nll))
    assert ppl < MAX_PPL_RATIO * uni_ppl, (ppl, uni_ppl)


def test_generate(loaded):
    model, tok = loaded
    enc = tok("The assert statement", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 8 or tok.eos_token_id in out[0].tolist()
    assert isinstance(tok.decode(out[0]), str)


def test_routing_uses_experts(loaded, heldout_slice):
    model, _ = loaded
    cfg = model.config
    with torch.no_grad():
        out = model(input_ids=heldout_slice, output_router_logits=True)
    assert len(out.router_logits) == cfg.num_hidden_layers
    for layer, logits in enumerate(out.router_logits):
        top = torch.topk(logits.float(), cfg.num_experts_per_tok, dim=-1).indices
        share = torch.bincount(top.reshape(-1), minlength=cfg.num_experts).double()
        share /= share.sum()
        assert int((share > 0).sum()) >= 12, (layer, share.tolist())
        assert float(share.max()) < 0.5, (layer, share.tolist())
