"""Concurrent shard writes around Transformers' save_pretrained: same files, bounded memory,
nothing left that looks whole after a failed or interrupted save."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file as safe_save_file
from transformers import AutoModelForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM, modeling_utils

from defuser_quant.checkpoint import concurrent_save
from defuser_quant.checkpoint import tensor_file
from defuser_quant.checkpoint.concurrent_save import concurrent_shards
from defuser_quant.checkpoint.tensor_file import write_safetensors

CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))


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


def _mixed_tensors(device: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    cpu = {
        "b.bf16": torch.randn(33, 17, generator=g).to(torch.bfloat16),
        "a.f32": torch.randn(5, 3, generator=g),
        "packed.i32": torch.randint(-2**31, 2**31 - 1, (9, 4), dtype=torch.int32, generator=g),
        "shape.i64": torch.tensor([768, 2048]),
        "scale.f8": torch.randn(7, 6, generator=g).to(torch.float8_e4m3fn),
        "mask.bool": torch.rand(11, generator=g) > 0.5,
        "bytes.u8": torch.randint(0, 255, (13,), dtype=torch.uint8, generator=g),
        "empty.f16": torch.empty(0, 4, dtype=torch.float16),
        "scalar.f32": torch.tensor(3.5),
        "strided.bf16": torch.randn(8, 6, generator=g).to(torch.bfloat16).t(),
    }
    if hasattr(torch, "float8_e8m0fnu"):
        cpu["mx.e8m0"] = torch.randint(100, 140, (6,), dtype=torch.uint8, generator=g).view(torch.float8_e8m0fnu)
    return {k: v.to(device) for k, v in cpu.items()}


@pytest.mark.parametrize("device", ["cpu", CUDA])
def test_tensor_file_is_byte_for_byte_what_safetensors_writes(tmp_path, monkeypatch, device):
    monkeypatch.setattr(tensor_file, "STAGING_BYTES", 64)  # GPU tensors go through the pinned buffer in pieces
    tensors = _mixed_tensors(device)
    safe_save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    write_safetensors(tensors, tmp_path / "ours.safetensors", metadata={"format": "pt"})
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    # several metadata keys: safetensors' own order of them varies between its releases (a hash map)
    write_safetensors(tensors, tmp_path / "meta.safetensors", metadata={"format": "pt", "x": "y"})
    with safe_open(str(tmp_path / "meta.safetensors"), "pt") as handle:
        assert handle.metadata() == {"format": "pt", "x": "y"}
        assert all(torch.equal(handle.get_tensor(k), v.cpu()) for k, v in tensors.items())


def test_a_shard_our_writer_cannot_write_goes_through_safetensors_own_writer(model, tmp_path):
    tensors = {"w": torch.randn(4, 4, dtype=torch.complex64), "b": torch.ones(3, dtype=torch.bfloat16)}
    writes = concurrent_save._Writes(2, write_safetensors)
    writes.submit(tensors, str(tmp_path / "odd.safetensors"), {"format": "pt"})
    writes.wait()
    with safe_open(str(tmp_path / "odd.safetensors"), "pt") as handle:
        assert all(torch.equal(handle.get_tensor(k), v) for k, v in tensors.items())


def test_tensor_file_refuses_what_it_cannot_write(tmp_path):
    with pytest.raises(TypeError, match="w: dtype torch.complex64 has no safetensors name"):
        write_safetensors({"w": torch.zeros(2, dtype=torch.complex64)}, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="m: .* on meta has no bytes"):
        write_safetensors({"m": torch.zeros(2, device="meta")}, tmp_path / "y.safetensors")
    assert not list(tmp_path.iterdir())


def test_shards_are_the_files_transformers_writes_itself(model, tmp_path, monkeypatch):
    # what Transformers calls now: importing gptqmodel swaps safetensors' save_file for a locked wrapper,
    # so the name this module imported may not be the one Transformers holds
    transformers_write = modeling_utils.safe_save_file
    model.save_pretrained(tmp_path / "plain", max_shard_size="60KB")
    recorder = _Recorder(concurrent_save.write_safetensors)
    monkeypatch.setattr(concurrent_save, "write_safetensors", recorder)
    concurrent_shards(model.save_pretrained, 3)(tmp_path / "pooled", max_shard_size="60KB")
    plain, pooled = _files(tmp_path / "plain"), _files(tmp_path / "pooled")
    assert len(plain) > 4 and plain == pooled  # byte for byte, index included
    assert len(recorder.threads) > 1 and all(name.startswith("dq-shard") for name in recorder.threads)
    assert modeling_utils.safe_save_file is transformers_write  # Transformers' own writer is back after the call


def test_with_a_limit_the_shards_in_flight_stay_within_it():
    recorder = _Recorder(lambda tensors, filename, metadata=None: None, delay=0.05)
    writes = concurrent_save._Writes(4, recorder)
    writes.limit = 3000
    for number in range(8):
        writes.submit({"w": torch.zeros(250 * (1 + number % 3))}, f"shard-{number}", None)  # 1000, 2000 or 3000 bytes
    writes.wait()
    assert 2000 <= recorder.peak <= 3000 and len(recorder.threads) > 1


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
    inner = concurrent_save.write_safetensors
    calls = []

    def fail_third(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 3:
            Path(filename).write_bytes(b"half a shard")
            raise OSError(28, "No space left on device")
        return inner(tensors, filename, metadata=metadata)

    monkeypatch.setattr(concurrent_save, "write_safetensors", fail_third)
    with pytest.raises(RuntimeError, match=r"writing checkpoint shard .*model-00003-of-.* failed.*No space left"):
        concurrent_shards(model.save_pretrained, 2)(tmp_path / "out", max_shard_size="60KB")
    left = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert left and not [name for name in left if "safetensors" in name], left


def test_an_interrupt_while_writing_removes_what_the_save_started(model, tmp_path, monkeypatch):
    other = tmp_path / "out" / "notes.txt"  # something the save did not write stays
    other.parent.mkdir()
    other.write_text("mine")
    model.save_pretrained(tmp_path / "plain", max_shard_size="60KB")
    count = len(list((tmp_path / "plain").glob("model-*.safetensors")))
    later = tmp_path / "out" / f"model-00003-of-{count:05d}.safetensors"  # an earlier save's file whose turn never comes
    later.write_bytes(b"earlier")
    real_tqdm = modeling_utils.logging.tqdm

    def interrupted(items, *args, **kwargs):
        for number, item in enumerate(real_tqdm(items, *args, **kwargs)):
            if number == 3:
                raise KeyboardInterrupt
            yield item

    monkeypatch.setattr(modeling_utils.logging, "tqdm", interrupted)
    # two threads busy with shards 1 and 2 when the interrupt comes; shard 3 is queued, never begun
    monkeypatch.setattr(concurrent_save, "write_safetensors", _Recorder(concurrent_save.write_safetensors, delay=0.5))
    with pytest.raises(KeyboardInterrupt):
        concurrent_shards(model.save_pretrained, 2)(tmp_path / "out", max_shard_size="60KB")
    assert sorted(p.name for p in (tmp_path / "out").glob("*.safetensors*")) == [later.name]
    assert later.read_bytes() == b"earlier" and other.read_text() == "mine"


def test_a_last_shard_failing_after_the_index_was_written_removes_the_index_too(model, tmp_path, monkeypatch):
    model.save_pretrained(tmp_path / "plain", max_shard_size="60KB")
    count = len(list((tmp_path / "plain").glob("model-*.safetensors")))
    inner = concurrent_save.write_safetensors

    def fail_last(tensors, filename, metadata=None):
        if f"-{count:05d}-of-" in Path(filename).name:
            time.sleep(0.3)  # the save's main thread writes the index meanwhile
            raise OSError(5, "Input/output error")
        return inner(tensors, filename, metadata=metadata)

    monkeypatch.setattr(concurrent_save, "write_safetensors", fail_last)
    with pytest.raises(RuntimeError, match="Input/output error"):
        concurrent_shards(model.save_pretrained, 2)(tmp_path / "out", max_shard_size="60KB")
    assert (tmp_path / "out" / "config.json").exists()
    assert not list((tmp_path / "out").glob("*.safetensors*"))
