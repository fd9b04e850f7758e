"""Calibration data: real files through real `datasets`, a tiny trained BPE tokenizer."""

from __future__ import annotations

import json
import sys
import time
import types

import pytest
import torch

datasets = pytest.importorskip("datasets")
tokenizers = pytest.importorskip("tokenizers")

from pydantic import ValidationError  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from defuser_quant.calibration.data import (  # noqa: E402
    CalibrationDataConfig,
    CalibrationDataError,
    build_calibration_batches,
    build_gptqmodel_examples,
    build_llmcompressor_dataset,
    load_texts,
    make_batches,
    resolve_builtin,
    tokenize_samples,
    to_gptqmodel_examples,
    to_hf_dataset,
)

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)
SPECIALS = ["<|endoftext|>", "<pad>", "<|im_start|>", "<|im_end|>"]


def _prose() -> list[str]:
    from pydoc_data.topics import topics

    paragraphs = []
    for key in sorted(topics)[:40]:
        paragraphs.extend(p.strip() for p in topics[key].split("\n\n") if len(p.strip()) > 40)
    return paragraphs


@pytest.fixture(scope="session")
def prose() -> list[str]:
    return _prose()


@pytest.fixture(scope="session")
def bpe(prose: list[str]) -> tokenizers.Tokenizer:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False)
    tok.train_from_iterator(prose, trainer=trainer)
    return tok


def _wrap(bpe: tokenizers.Tokenizer, **kwargs) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=bpe.__class__.from_str(bpe.to_str()), **kwargs)


@pytest.fixture()
def tokenizer(bpe: tokenizers.Tokenizer) -> PreTrainedTokenizerFast:
    """EOS, no pad token, no chat template (a fresh copy per test)."""
    return _wrap(bpe, eos_token="<|endoftext|>")


@pytest.fixture()
def chat_tokenizer(bpe: tokenizers.Tokenizer) -> PreTrainedTokenizerFast:
    tok = _wrap(bpe, eos_token="<|endoftext|>", pad_token="<pad>")
    tok.chat_template = CHAT_TEMPLATE
    return tok


def _cfg(source, tmp_path, **kw) -> CalibrationDataConfig:
    return CalibrationDataConfig(source=source, cache_dir=str(tmp_path / "hf-cache"), **kw)


# ------------------------------------------------------------------------------ config


def test_config_defaults_and_validation_names_field():
    cfg = CalibrationDataConfig()
    assert cfg.source == "builtin:pydoc" and cfg.mode == "pack" and cfg.num_samples == 128
    for bad, field in [
        ({"seq_len": 0}, "seq_len"),
        ({"mode": "chunk"}, "mode"),
        ({"num_samples": -1}, "num_samples"),
        ({"batch_size": 0}, "batch_size"),
        ({"source": ""}, "source"),
        ({"source": "builtin:nope"}, "source"),
        ({"source": 3}, "source"),
        ({"seqlen": 8}, "seqlen"),
    ]:
        with pytest.raises(ValidationError) as info:
            CalibrationDataConfig(**bad)
        assert field in str(info.value)
    assert CalibrationDataConfig(subset="en").config_name == "en"


# ------------------------------------------------------------------------------ loading


def test_load_text_file_by_paragraph_and_line(tmp_path, prose):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\n".join(prose[:10]) + "\n", encoding="utf-8")
    texts = load_texts(_cfg(str(path), tmp_path))
    assert len(texts) == 10
    assert texts[0].split()[0] == prose[0].split()[0]
    lines = load_texts(_cfg(str(path), tmp_path, text_sample_by="line"))
    assert len(lines) >= 10 and all(line.strip() for line in lines)


def test_load_jsonl_json_csv_tsv_parquet(tmp_path, prose):
    rows = [{"id": i, "body": t} for i, t in enumerate(prose[:12])]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    js = tmp_path / "d.json"
    js.write_text(json.dumps(rows), encoding="utf-8")
    import pandas as pd

    frame = pd.DataFrame(rows)
    csv = tmp_path / "d.csv"
    frame.to_csv(csv, index=False)
    tsv = tmp_path / "d.tsv"
    frame.to_csv(tsv, index=False, sep="\t")
    parquet = tmp_path / "d.parquet"
    frame.to_parquet(parquet)
    for path in (jsonl, js, csv, tsv, parquet):
        texts = load_texts(_cfg(str(path), tmp_path, text_field="body"))
        assert texts == prose[:12], path.suffix


def test_missing_column_lists_available(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a b c", "answer": "d"}\n', encoding="utf-8")
    with pytest.raises(CalibrationDataError) as info:
        load_texts(_cfg(str(path), tmp_path))
    msg = str(info.value)
    assert "'text'" in msg and "prompt" in msg and "answer" in msg


def test_non_text_column_is_an_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": 3, "s": "x"}\n', encoding="utf-8")
    with pytest.raises(CalibrationDataError, match="not text"):
        load_texts(_cfg(str(path), tmp_path))


def test_glob_and_directory_sources(tmp_path, prose):
    folder = tmp_path / "data"
    (folder / "sub").mkdir(parents=True)
    (folder / "a.txt").write_text(prose[0], encoding="utf-8")
    (folder / "sub" / "b.txt").write_text(prose[1], encoding="utf-8")
    (folder / "notes.bin").write_bytes(b"\x00")
    assert load_texts(_cfg(str(folder), tmp_path)) == [prose[0], prose[1]]
    assert load_texts(_cfg(str(folder / "*.txt"), tmp_path)) == [prose[0]]
    with pytest.raises(CalibrationDataError, match="matches no files"):
        load_texts(_cfg(str(folder / "*.jsonl"), tmp_path))
    (folder / "c.jsonl").write_text('{"text": "x"}', encoding="utf-8")
    with pytest.raises(CalibrationDataError, match="different kinds"):
        load_texts(_cfg(str(folder), tmp_path))


def test_missing_local_path_is_clear(tmp_path):
    for source in (str(tmp_path / "nope.jsonl"), "./nope", "a/b/c"):
        with pytest.raises(CalibrationDataError, match="not an existing file"):
            load_texts(_cfg(source, tmp_path))


def test_dataset_and_datasetdict_sources(tmp_path, prose):
    ds = datasets.Dataset.from_dict({"text": prose[:5] + ["", "   "], "n": list(range(7))})
    assert load_texts(CalibrationDataConfig(source=ds)) == prose[:5]
    dd = datasets.DatasetDict(
        {"train": ds, "validation": datasets.Dataset.from_dict({"text": prose[5:7]})}
    )
    assert load_texts(CalibrationDataConfig(source=dd, split="validation")) == prose[5:7]
    with pytest.raises(CalibrationDataError, match="available splits: train, validation"):
        load_texts(CalibrationDataConfig(source=dd, split="test"))
    with pytest.raises(CalibrationDataError, match="available columns: text, n"):
        load_texts(CalibrationDataConfig(source=ds, text_field="body"))
    saved = tmp_path / "saved"
    dd.save_to_disk(str(saved))
    assert load_texts(_cfg(str(saved), tmp_path, split="validation")) == prose[5:7]


def test_builtin_resolves_at_call_time(tmp_path, monkeypatch, prose):
    fake = types.ModuleType("defuser_quant.assets")
    fake.CORPUS_DIR = tmp_path / "corpus"
    monkeypatch.setitem(sys.modules, "defuser_quant.assets", fake)
    with pytest.raises(CalibrationDataError, match="missing"):
        load_texts(_cfg("builtin:pydoc", tmp_path))
    fake.CORPUS_DIR.mkdir()
    (fake.CORPUS_DIR / "train.txt").write_text("\n\n".join(prose[:4]), encoding="utf-8")
    (fake.CORPUS_DIR / "heldout.txt").write_text(prose[9], encoding="utf-8")
    assert len(load_texts(_cfg("builtin:pydoc", tmp_path))) == 4
    assert resolve_builtin("builtin:pydoc", "heldout") == fake.CORPUS_DIR / "heldout.txt"
    assert len(load_texts(_cfg("builtin:pydoc", tmp_path, split="heldout"))) == 1
    with pytest.raises(ValidationError, match="split"):
        CalibrationDataConfig(source="builtin:pydoc", split="dev")


@pytest.mark.parametrize("var", ["HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"])
@pytest.mark.parametrize("source", ["hf:allenai/c4", "wikitext", "Salesforce/wikitext"])
def test_hub_offline_fails_fast(tmp_path, monkeypatch, var, source):
    for other in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(other, raising=False)  # conftest sets HF_HUB_OFFLINE for every test
    monkeypatch.setenv(var, "1")
    start = time.monotonic()
    with pytest.raises(CalibrationDataError) as info:
        load_texts(_cfg(source, tmp_path))
    assert time.monotonic() - start < 2
    msg = str(info.value)
    assert "unreachable" in msg and var in msg and "local file" in msg


def test_hub_unreachable_endpoint_fails_fast(tmp_path, monkeypatch):
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    start = time.monotonic()
    with pytest.raises(CalibrationDataError, match="unreachable"):
        load_texts(_cfg("hf:allenai/c4", tmp_path, hub_timeout=1.0))
    assert time.monotonic() - start < 5


# ------------------------------------------------------------------------------ tokenizing


def test_pack_gives_full_blocks_with_eos_separators(tokenizer, prose, tmp_path):
    cfg = _cfg("unused.txt", tmp_path, num_samples=6, seq_len=32, mode="pack")
    samples = tokenize_samples(prose, tokenizer, cfg)
    assert len(samples) == 6
    assert all(s.dtype == torch.long and s.shape == (32,) for s in samples)
    eos = tokenizer.eos_token_id
    # unshuffled packing is the plain concatenation of texts joined by EOS
    plain = tokenize_samples(prose, tokenizer, cfg.model_copy(update={"shuffle": False}))
    stream: list[int] = []
    for text in prose[:50]:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]
    assert torch.cat(plain).tolist() == stream[: 6 * 32]
    assert eos in stream[: 6 * 32]


def test_pack_too_little_text(tokenizer, tmp_path):
    cfg = _cfg("x.txt", tmp_path, seq_len=4096)
    with pytest.raises(CalibrationDataError, match="fewer than seq_len"):
        tokenize_samples(["a short text"], tokenizer, cfg)


def test_pack_fewer_than_requested_warns(tokenizer, prose, tmp_path, caplog):
    cfg = _cfg("x.txt", tmp_path, seq_len=64, num_samples=10_000)
    with caplog.at_level("WARNING", logger="defuser_quant.calibration.data"):
        samples = tokenize_samples(prose[:20], tokenizer, cfg)
    assert 0 < len(samples) < 10_000
    assert "gives only" in caplog.text
    assert len(tokenize_samples(prose[:20], tokenizer, cfg.model_copy(update={"num_samples": None}))) == len(samples)


def test_truncate_one_sample_per_text(tokenizer, tmp_path):
    texts = ["word " * 100, "tiny", "the quick brown fox jumps over the lazy dog " * 2]
    cfg = _cfg("x.txt", tmp_path, mode="truncate", seq_len=24, min_tokens=8, num_samples=None, shuffle=False)
    samples = tokenize_samples(texts, tokenizer, cfg)
    assert [len(s) for s in samples][0] == 24
    assert len(samples) == 2  # "tiny" is below min_tokens and dropped
    assert 8 <= len(samples[1]) <= 24
    assert samples[1].tolist() == tokenizer(texts[2], truncation=True, max_length=24)["input_ids"]
    # min_tokens is capped at seq_len
    short = cfg.model_copy(update={"seq_len": 4, "min_tokens": 16})
    assert all(len(s) == 4 for s in tokenize_samples(texts, tokenizer, short)[:1])
    with pytest.raises(CalibrationDataError, match="min_tokens"):
        tokenize_samples(["tiny"], tokenizer, cfg)


def test_sampling_is_deterministic_by_seed(tokenizer, prose, tmp_path):
    for mode in ("pack", "truncate"):
        cfg = _cfg("x.txt", tmp_path, num_samples=8, seq_len=32, mode=mode, seed=1)
        a = tokenize_samples(prose, tokenizer, cfg)
        b = tokenize_samples(prose, tokenizer, cfg)
        c = tokenize_samples(prose, tokenizer, cfg.model_copy(update={"seed": 2}))
        assert [s.tolist() for s in a] == [s.tolist() for s in b]
        assert [s.tolist() for s in a] != [s.tolist() for s in c]


def test_chat_template(chat_tokenizer, tokenizer, tmp_path):
    texts = ["Explain the with statement in a few words, please."]
    cfg = _cfg("x.txt", tmp_path, mode="truncate", chat_template=True, min_tokens=1, num_samples=1)
    (sample,) = tokenize_samples(texts, chat_tokenizer, cfg)
    rendered = f"<|im_start|>user\n{texts[0]}<|im_end|>\n"
    assert sample.tolist() == chat_tokenizer(rendered, add_special_tokens=False)["input_ids"]
    start = chat_tokenizer.convert_tokens_to_ids("<|im_start|>")
    assert sample[0].item() == start
    packed = tokenize_samples(texts * 20, chat_tokenizer, cfg.model_copy(update={"mode": "pack", "seq_len": 16}))
    assert all(len(s) == 16 for s in packed) and any((s == start).any() for s in packed)
    with pytest.raises(CalibrationDataError, match="no chat template"):
        tokenize_samples(texts, tokenizer, cfg)


# ------------------------------------------------------------------------------ batching


def test_make_batches_right_and_left_padding(tokenizer):
    samples = [torch.tensor([5, 6, 7]), torch.tensor([8]), torch.tensor([9, 10])]
    eos = tokenizer.eos_token_id
    right = make_batches(samples, 2, tokenizer=tokenizer, padding_side="right")
    assert len(right) == 2
    assert right[0]["input_ids"].tolist() == [[5, 6, 7], [8, eos, eos]]
    assert right[0]["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right[1]["input_ids"].tolist() == [[9, 10]] and right[1]["attention_mask"].tolist() == [[1, 1]]
    left = make_batches(samples, 3, pad_token_id=0, padding_side="left")
    assert left[0]["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8], [0, 9, 10]]
    assert left[0]["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert all(b["input_ids"].dtype == torch.long and b["attention_mask"].dtype == torch.long for b in left)


def test_pad_token_preferred_and_missing_pad_error(bpe, chat_tokenizer):
    samples = [torch.tensor([5, 6]), torch.tensor([7])]
    pad = chat_tokenizer.pad_token_id
    assert pad != chat_tokenizer.eos_token_id
    assert make_batches(samples, 2, tokenizer=chat_tokenizer)[0]["input_ids"].tolist() == [[5, 6], [7, pad]]
    bare = _wrap(bpe)
    assert bare.pad_token_id is None and bare.eos_token_id is None
    with pytest.raises(CalibrationDataError, match="no pad or EOS"):
        make_batches(samples, 2, tokenizer=bare)
    # equal lengths need no pad token
    assert make_batches([torch.tensor([1, 2])] * 2, 2, tokenizer=bare)[0]["attention_mask"].all()


def test_build_calibration_batches_end_to_end(tmp_path, tokenizer, prose):
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in prose), encoding="utf-8")
    cfg = _cfg(str(path), tmp_path, num_samples=5, seq_len=16, batch_size=2)
    batches = build_calibration_batches(cfg, tokenizer)
    assert [b["input_ids"].shape for b in batches] == [(2, 16), (2, 16), (1, 16)]
    assert all(b["attention_mask"].all() for b in batches)
    cfg_t = cfg.model_copy(update={"mode": "truncate", "padding_side": "left", "batch_size": 5})
    (batch,) = build_calibration_batches(cfg_t, tokenizer)
    assert batch["input_ids"].shape[0] == 5 and batch["attention_mask"][:, -1].all()


def test_quantizer_formats(tmp_path, tokenizer, prose):
    samples = [torch.tensor([1, 2, 3]), torch.tensor([4, 5])]
    examples = to_gptqmodel_examples(samples)
    assert examples == [
        {"input_ids": [1, 2, 3], "attention_mask": [1, 1, 1]},
        {"input_ids": [4, 5], "attention_mask": [1, 1]},
    ]
    ds = to_hf_dataset(samples)
    assert isinstance(ds, datasets.Dataset)
    assert ds.column_names == ["input_ids", "attention_mask"] and ds[1]["input_ids"] == [4, 5]
    src = datasets.Dataset.from_dict({"text": prose})
    cfg = CalibrationDataConfig(source=src, num_samples=3, seq_len=16)
    gptq = build_gptqmodel_examples(cfg, tokenizer)
    assert len(gptq) == 3 and all(len(e["input_ids"]) == 16 for e in gptq)
    llmc = build_llmcompressor_dataset(cfg, tokenizer)
    assert len(llmc) == 3 and llmc["input_ids"][0] == gptq[0]["input_ids"]
