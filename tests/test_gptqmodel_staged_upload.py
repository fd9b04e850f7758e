"""The staged checkpoint upload (integrations.gptqmodel.staged_upload): the bytes ``Tensor.copy_``
writes, through staging buffers small enough to split tensors across pieces and buffers; every
copy it does not stage is ``copy_``'s own; only the calling thread, only inside the block; routed
to GPTQModel's checkpoint loads only for our modules; and a real GPTQModel run with it gives the
checkpoint of a run without it."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch

from defuser_quant.integrations.gptqmodel import staged_upload
from defuser_quant.integrations.gptqmodel.layer_offload import Staging
from defuser_quant.integrations.gptqmodel.staged_upload import StagedUpload, UploadStats, lean_checkpoint_copy
from test_gptqmodel_plugin import plugin, tiny  # noqa: F401  (fixtures)


@pytest.fixture
def cpu_targets(monkeypatch):
    """Stage copies into CPU tensors too (the tests' stand-in for a GPU), with unpinned buffers."""
    monkeypatch.setattr(staged_upload, "DEVICE_TYPES", frozenset({"cpu", "cuda"}))


def _sources() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [
        torch.randn(37, 5, generator=g).to(torch.bfloat16),  # 370 bytes: split over buffers of 100
        torch.randn(300, generator=g),  # 1200 bytes
        torch.randint(0, 255, (1000,), dtype=torch.uint8, generator=g),
        torch.randn(3, generator=g),  # 12 bytes: fits what is left of a buffer
        torch.randn(0, 4, generator=g),  # empty
        torch.tensor([True, False, True]),
    ]


def test_staged_copies_write_the_bytes_copy_writes(cpu_targets):
    staging = Staging(100, pin=False)
    sources = _sources()
    targets = [torch.zeros_like(s) for s in sources]
    with StagedUpload(staging, min_bytes=0) as mode:
        for target, source in zip(targets, sources, strict=True):
            assert target.copy_(source) is target  # copy_ returns its target
    assert all(torch.equal(t, s) for t, s in zip(targets, sources, strict=True))
    assert mode.tensors == len(sources) and mode.left == 0
    assert mode.bytes == sum(s.numel() * s.element_size() for s in sources)
    # The pieces went round both buffers: the last source's bytes sit in one of them.
    assert not staging.lock.locked()


def test_copies_it_does_not_stage_are_copys_own(cpu_targets):
    staging = Staging(64, pin=False)
    big = torch.arange(40, dtype=torch.float32)
    cases = [
        (torch.zeros(4, 3), torch.arange(3.0)),  # broadcasting
        (torch.zeros(40, dtype=torch.bfloat16), big),  # dtype conversion
        (torch.zeros(8, 5).t(), torch.arange(40.0).view(5, 8)),  # non-contiguous target
        (torch.zeros(5, 8), torch.arange(40.0).view(8, 5).t()),  # non-contiguous source
        (torch.zeros(2), torch.ones(2)),  # under min_bytes
    ]
    expected = [dst.clone().copy_(src) for dst, src in cases]
    with StagedUpload(staging, min_bytes=16) as mode:
        for dst, src in cases:
            dst.copy_(src)
        with pytest.raises(RuntimeError):  # copy_'s own error, not swallowed
            torch.zeros(3).copy_(torch.ones(4))
    assert mode.tensors == 0 and mode.left == len(cases) + 1
    assert all(torch.equal(dst, want) for (dst, _), want in zip(cases, expected, strict=True))


def test_only_the_calling_thread_inside_the_block_is_staged(cpu_targets):
    staging = Staging(64, pin=False)
    source = torch.arange(32, dtype=torch.float32)
    outside, other = torch.zeros(32), torch.zeros(32)
    with StagedUpload(staging, min_bytes=0) as mode:
        thread = threading.Thread(target=lambda: other.copy_(source))
        thread.start()
        thread.join()
    outside.copy_(source)
    assert mode.tensors == 0 and torch.equal(other, source) and torch.equal(outside, source)


def test_an_error_inside_the_block_leaves_no_mode_and_frees_the_buffers(cpu_targets):
    staging = Staging(64, pin=False)
    target = torch.zeros(32)
    with pytest.raises(KeyboardInterrupt), StagedUpload(staging, min_bytes=0):
        target.copy_(torch.ones(32))
        raise KeyboardInterrupt
    assert not staging.lock.locked()
    assert not torch.overrides._get_current_function_mode_stack()
    with StagedUpload(staging, min_bytes=0) as mode:  # usable again
        target.copy_(torch.full((32,), 2.0))
    assert mode.tensors == 1 and torch.equal(target, torch.full((32,), 2.0))


def _loader(record: list):
    def _copy_checkpoint_tensors_into_submodule(self, *, target_model, target_submodule, module_path, device,
                                                recurse=False):
        staged = bool(torch.overrides._get_current_function_mode_stack())
        target_submodule.weight.detach().copy_(torch.full_like(target_submodule.weight, 3.0))
        record.append((module_path, staged))
        return 1

    return _copy_checkpoint_tensors_into_submodule


def test_checkpoint_loads_are_staged_only_for_our_modules_on_staged_devices(monkeypatch):
    monkeypatch.setattr(staged_upload, "MIN_BYTES", 0)
    record: list = []
    stats, ours, theirs = UploadStats(), object(), object()
    copy = lean_checkpoint_copy(_loader(record), lambda model, sub, path: model is ours and path == "mine",
                                Staging(64, pin=False), stats, threading.Lock())
    module = SimpleNamespace(weight=torch.zeros(16))
    monkeypatch.setattr(staged_upload, "DEVICE_TYPES", frozenset({"cpu"}))
    assert copy(None, target_model=ours, target_submodule=module, module_path="mine", device="cpu", recurse=True) == 1
    copy(None, target_model=ours, target_submodule=module, module_path="other", device="cpu")
    copy(None, target_model=theirs, target_submodule=module, module_path="mine", device="cpu")
    monkeypatch.setattr(staged_upload, "DEVICE_TYPES", frozenset({"cuda"}))
    copy(None, target_model=ours, target_submodule=module, module_path="mine", device="cpu")
    assert record == [("mine", True), ("other", False), ("mine", False), ("mine", False)]
    assert (stats.calls, stats.stock, stats.failed) == (1, 3, 0)
    assert (stats.tensors, stats.bytes) == (1, 64)  # the one staged call's copy
    assert torch.equal(module.weight, torch.full((16,), 3.0))


def test_a_staging_that_cannot_allocate_leaves_the_loads_to_gptqmodel(monkeypatch, cpu_targets, caplog):
    class NoPinnedMemory(Staging):
        def get(self):
            raise RuntimeError("no pinned memory")

    record: list = []
    stats = UploadStats()
    copy = lean_checkpoint_copy(_loader(record), lambda *a: True, NoPinnedMemory(64), stats, threading.Lock())
    module = SimpleNamespace(weight=torch.zeros(16))
    with caplog.at_level("WARNING"):
        for _ in range(3):
            copy(None, target_model=None, target_submodule=module, module_path="m", device="cpu")
    assert record == [("m", False)] * 3 and torch.equal(module.weight, torch.full((16,), 3.0))
    assert (stats.calls, stats.stock, stats.failed) == (0, 3, 1)
    assert [r.getMessage() for r in caplog.records if "staged checkpoint upload failed" in r.getMessage()] == [
        "staged checkpoint upload failed (no pinned memory); GPTQModel's own copies load the layers instead"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_uploads_arrive_before_the_block_ends():
    staging = Staging(1 << 20)  # pinned, 1 MiB: the large tensors split over both buffers
    g = torch.Generator().manual_seed(1)
    sources = [torch.randn(n, generator=g).to(torch.bfloat16) for n in (3 << 20, 5, 700_000, 1 << 19)]
    targets = [torch.empty_like(s, device="cuda") for s in sources]
    with StagedUpload(staging, min_bytes=0) as mode:
        for t, s in zip(targets, sources, strict=True):
            t.copy_(s)
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):  # another stream, no wait: the block's end already waited
        back = [t.to("cpu", non_blocking=False) for t in targets]
    assert mode.tensors == len(sources)
    assert all(torch.equal(b, s) for b, s in zip(back, sources, strict=True))


@pytest.mark.slow
def test_a_gptqmodel_run_with_staged_loads_gives_the_checkpoint_without(plugin, tiny, tmp_path, monkeypatch):  # noqa: F811
    from test_gptqmodel_overhead import _run

    from defuser_quant.integrations.gptqmodel.overhead import PARTS

    monkeypatch.setattr(staged_upload, "DEVICE_TYPES", frozenset({"cpu", "cuda"}))  # stage on the CPU run too
    monkeypatch.setattr(staged_upload, "MIN_BYTES", 0)
    without, without_tensors, without_configs = _run(plugin, tiny, tmp_path / "without", source="src", offload=True,
                                                     lean=PARTS - {"upload"})
    staged, staged_tensors, staged_configs = _run(plugin, tiny, tmp_path / "staged", source="src", offload=True,
                                                  lean=True)
    assert without.bookkeeping.upload == UploadStats()
    upload = staged.bookkeeping.upload
    # Both loads of every layer (pre_quantize) and of every expert projection (its forward) staged.
    assert upload.calls >= len(staged.projections) and upload.tensors >= upload.calls and upload.failed == 0
    assert staged_tensors.keys() == without_tensors.keys()
    assert not [k for k in staged_tensors if not torch.equal(staged_tensors[k], without_tensors[k])]
    assert staged_configs == without_configs


def test_a_gptqmodel_whose_checkpoint_copy_differs_keeps_it_stock(monkeypatch):
    pytest.importorskip("gptqmodel")
    from gptqmodel.utils import structure

    from defuser_quant.integrations.gptqmodel.overhead import internals_mismatch

    assert "upload" not in internals_mismatch()
    monkeypatch.setattr(structure.LazyTurtle, "_copy_checkpoint_tensors_into_submodule",
                        lambda self, *, target_model, target_submodule, module_path, device: 0)
    assert "Tensor.copy_" in internals_mismatch()["upload"]
    monkeypatch.setattr(structure.LazyTurtle, "_copy_checkpoint_tensors_into_submodule", lambda self, module_path: 0)
    assert "parameters" in internals_mismatch()["upload"]


def test_quantize_with_defuser_refuses_a_string_of_parts(plugin, tiny):  # noqa: F811
    with pytest.raises(TypeError, match="lean_bookkeeping must be a bool or a collection of part names"):
        plugin.quantize_with_defuser(object(), [], lean_bookkeeping="upload")
