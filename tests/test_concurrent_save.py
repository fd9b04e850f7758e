"""Concurrent shard writes around Transformers' save_pretrained: same files, bounded memory,
nothing left that looks whole after a failed or interrupted save."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM, modeling_utils

from defuser_quant.checkpoint import concurrent_save
from defuser_quant.checkpoint.concurrent_save import concurrent_shards


@pytest.fixture(scope="module")
def model() -> Qwen3MoeForCausalLM:
    config = Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(config).to(torch.bfloat16).eval()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name.startswith("model.safetensors")
            or p.name.startswith("model-")}


class _Recorder:
    """A safe_save_file stand-in that records threads and the bytes being written at once."""

    def __init__(self, inner, delay: float = 0.02):
        self.inner, self.delay = inner, delay
        self.threads: set[str] = set()
        self.now = self.peak = 0
        self.lock = threading.Lock()

    def __call__(self, tensors, filename, metadata=None):
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        with self.lock:
            self.threads.add(threading.current_thread().name)
            self.now += size
            self.peak = max(self.peak, self.now)
        try:
            time.sleep(self.delay)  # hold the shard long enough for others to start
            return self.inner(tensors, filename, metadata=metadata)
        finally:
            with self.lock:
                self.now -= size


def test_shards_are_the_files_transformers_writes_itself(model, tmp_path, monkeypatch):
    model.save_pretrained(tmp_path / "plain", max_shard_size="60KB")
    recorder = _Recorder(modeling_utils.safe_save_file)
    monkeypatch.setattr(modeling_utils, "safe_save_file", recorder)
    concurrent_shards(model.save_pretrained, 3)(tmp_path / "pooled", max_shard_size="60KB")
    plain, pooled = _files(tmp_path / "plain"), _files(tmp_path / "pooled")
    assert len(plain) > 4 and plain == pooled  # byte for byte, index included
    assert len(recorder.threads) > 1 and all(name.startswith("dq-shard") for name in recorder.threads)
    assert modeling_utils.safe_save_file is recorder  # restored after the call


def test_bytes_in_flight_stay_within_max_shard_size(model, tmp_path, monkeypatch):
    recorder = _Recorder(modeling_utils.safe_save_file)
    monkeypatch.setattr(modeling_utils, "safe_save_file", recorder)
    concurrent_shards(model.save_pretrained, 4)(tmp_path / "out", max_shard_size="100KB")
    sizes = [p.stat().st_size for p in (tmp_path / "out").glob("model-*.safetensors")]
    assert recorder.peak <= max(100_000, max(sizes)) and len(recorder.threads) > 1


def test_without_max_shard_size_the_split_gives_each_thread_a_shard(model, tmp_path, monkeypatch):
    monkeypatch.setattr(concurrent_save, "MIN_SHARD_BYTES", 1024)
    concurrent_shards(model.save_pretrained, 4)(tmp_path / "out")
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert 4 <= len(shards) <= 8
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    original = model.state_dict()
    assert all(torch.equal(v, original[k]) for k, v in reloaded.state_dict().items())


def test_a_small_model_without_max_shard_size_stays_one_file(model, tmp_path):
    concurrent_shards(model.save_pretrained, 4)(tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").glob("model*")) == ["model.safetensors"]


def test_one_thread_is_transformers_own_save(model):
    assert concurrent_shards(model.save_pretrained, 1) == model.save_pretrained


def test_a_failed_shard_write_removes_every_shard_and_the_index(model, tmp_path, monkeypatch):
    inner = modeling_utils.safe_save_file
    calls = []

    def fail_third(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            Path(filename).write_bytes(b"half a shard")
            raise OSError(28, "No space left on device")
        return inner(tensors, filename, metadata=metadata)

    monkeypatch.setattr(modeling_utils, "safe_save_file", fail_third)
    with pytest.raises(RuntimeError, match=r"writing checkpoint shard .*model-00003-of-.* failed.*No space left"):
        concurrent_shards(model.save_pretrained, 2)(tmp_path / "out", max_shard_size="60KB")
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left and not [name for name in left if "safetensors" in name], left


def test_an_interrupt_while_writing_removes_what_the_save_started(model, tmp_path, monkeypatch):
    other = tmp_path / "out" / "notes.txt"  # something the save did not write stays
    other.parent.mkdir()
    other.write_text("mine")
    real_tqdm = modeling_utils.logging.tqdm

    def interrupted(items, *args, **kwargs):
        for number, item in enumerate(real_tqdm(items, *args, **kwargs)):
            if number == 3:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(modeling_utils.logging, "tqdm", interrupted)
    monkeypatch.setattr(modeling_utils, "safe_save_file", _Recorder(modeling_utils.safe_save_file, delay=0.05))
    with pytest.raises(KeyboardInterrupt):
        concurrent_shards(model.save_pretrained, 2)(tmp_path / "out", max_shard_size="60KB")
    assert not list((tmp_path / "out").glob("*.safetensors*")) and other.read_text() == "mine"


def test_a_last_shard_failing_after_the_index_was_written_removes_the_index_too(model, tmp_path, monkeypatch):
    model.save_pretrained(tmp_path / "plain", max_shard_size="60KB")
    count = len(list((tmp_path / "plain").glob("model-*.safetensors")))
    inner = modeling_utils.safe_save_file

    def fail_last(tensors, filename, metadata=None):
        if f"-{count:05d}-of-" in Path(filename).name:
            time.sleep(0.3)  # the save's main thread writes the index meanwhile
            raise OSError(5, "Input/output error")
        return inner(tensors, filename, metadata=metadata)

    monkeypatch.setattr(modeling_utils, "safe_save_file", fail_last)
    with pytest.raises(RuntimeError, match="Input/output error"):
        concurrent_shards(model.save_pretrained, 2)(tmp_path / "out", max_shard_size="60KB")
    assert (tmp_path / "out" / "config.json").exists()
    assert not list((tmp_path / "out").glob("*.safetensors*"))
