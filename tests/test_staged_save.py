"""Staged shard writes (``integrations/llmcompressor/staged_save.py``): the same bytes, fewer copies."""

from __future__ import annotations

import hashlib

import pytest
import torch

pytest.importorskip("llmcompressor")

import transformers.modeling_utils as modeling_utils  # noqa: E402

from defuser_quant.integrations.llmcompressor import staged_save  # noqa: E402
from defuser_quant.integrations.llmcompressor.staged_save import host_copies, staged_shard_writes  # noqa: E402

DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.int32, torch.int8, torch.uint8, torch.bool, torch.int64)


def _tensors(device: str = "cpu") -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(DTYPES):
        for shape in [(3,), (5, 7), (2, 3, 4), ()]:
            t = torch.randint(-100, 100, shape, generator=g) if dtype is not torch.bool else torch.randint(0, 2, shape, generator=g)
            out[f"t{i}_{len(shape)}"] = t.to(dtype).to(device)
    return out


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert a[name].cpu().reshape(-1).view(torch.uint8).tolist() == b[name].cpu().reshape(-1).view(torch.uint8).tolist(), name


def test_a_chunk_splits_back_into_the_same_tensors_with_storages_of_their_own():
    tensors = _tensors()
    out: dict = {}
    staged_save._copy_chunk(list(tensors.items()), out)
    _same(out, tensors)
    storages = {t.untyped_storage().data_ptr() for t in out.values()}
    assert len(storages) == len(out), "every tensor has its own storage (safetensors refuses shared ones)"


def test_chunks_hold_whole_tensors_up_to_the_limit(monkeypatch):
    tensors = {f"w{i}": torch.zeros(n, dtype=torch.uint8) for i, n in enumerate([10, 30, 24, 70, 5, 5, 200, 1])}
    tensors["meta"] = torch.empty(4, device="meta")
    tensors["strided"] = torch.zeros(4, 4)[:, 1]
    chunks = []
    monkeypatch.setattr(staged_save, "_stageable", lambda t: t.device.type == "cpu" and t.is_contiguous())
    monkeypatch.setattr(staged_save, "_copy_chunk", lambda items, out: chunks.append([n for n, _ in items]))
    out = host_copies(tensors, chunk_bytes=64)
    assert chunks == [["w0", "w1", "w2"], ["w3"], ["w4", "w5"], ["w6"], ["w7"]]  # exactly 64 bytes fit
    assert out["meta"] is tensors["meta"] and out["strided"] is tensors["strided"], "unstageable tensors pass as they are"


def test_cpu_tensors_are_left_alone():
    tensors = _tensors()
    out = host_copies(tensors)
    assert all(out[n] is tensors[n] for n in tensors)


def _digests(folder) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.suffix == ".safetensors"}


def test_the_patch_is_installed_for_the_block_only_and_restored_on_errors(tmp_path):
    original = modeling_utils.safe_save_file
    with staged_shard_writes() as found:
        assert found and modeling_utils.safe_save_file is not original
        with staged_shard_writes() as again:  # nested: not wrapped twice
            assert again and modeling_utils.safe_save_file._defuser_quant_staged
    assert modeling_utils.safe_save_file is original
    with pytest.raises(KeyboardInterrupt):
        with staged_shard_writes():
            raise KeyboardInterrupt
    assert modeling_utils.safe_save_file is original


def _tiny_model(device: str):
    from transformers import AutoModelForCausalLM

    from defuser_quant.assets import TINY_MOE_PATH

    return AutoModelForCausalLM.from_pretrained(TINY_MOE_PATH, dtype=torch.bfloat16).to(device)


def test_a_save_under_the_patch_writes_the_same_files(tmp_path):
    model = _tiny_model("cpu")
    model.save_pretrained(tmp_path / "plain", max_shard_size="2MB")
    with staged_shard_writes():
        model.save_pretrained(tmp_path / "staged", max_shard_size="2MB")
    plain, staged = _digests(tmp_path / "plain"), _digests(tmp_path / "staged")
    assert len(plain) > 1 and staged == plain


def test_defuse_modifier_arms_the_staged_save_once(monkeypatch):
    import defuser_quant.integrations.llmcompressor as dq_llmc
    from defuser_quant.integrations.llmcompressor import modifier

    entered = []

    class Model(torch.nn.Module):
        def save_pretrained(self, *args, **kwargs):
            entered.append(modeling_utils.safe_save_file)
            return "saved"

    model = Model()
    monkeypatch.setattr(modifier, "staged_shard_writes", staged_shard_writes)
    dq_llmc.DefuseModifier._arm_staged_save(model)
    first = model.save_pretrained
    dq_llmc.DefuseModifier._arm_staged_save(model)
    assert model.save_pretrained is first
    assert model.save_pretrained("x") == "saved"
    assert getattr(entered[0], "_defuser_quant_staged", False), "the save ran inside staged_shard_writes"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
def test_gpu_tensors_reach_the_host_unchanged_and_the_files_are_identical(tmp_path):
    tensors = _tensors("cuda")
    out = host_copies(tensors, chunk_bytes=64)
    assert all(t.device.type == "cpu" for t in out.values())
    _same(out, tensors)
    model = _tiny_model("cuda")
    model.save_pretrained(tmp_path / "plain", max_shard_size="2MB")
    with staged_shard_writes():
        model.save_pretrained(tmp_path / "staged", max_shard_size="2MB")
    plain, staged = _digests(tmp_path / "plain"), _digests(tmp_path / "staged")
    assert len(plain) > 1 and staged == plain
