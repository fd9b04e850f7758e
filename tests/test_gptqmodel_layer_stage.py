"""The ``layer_stage`` part: after a layer's last subset forward the next layer's read-ahead pieces are copied to the
device its load goes to, and that load is served views of the copies.

Without CUDA neither ``layer_reads`` nor this part serves anything; the tests below let both act on CPU loads
(``SERVED_DEVICES``, ``DEVICES``), which runs every line of the part but the CUDA stream's. The end-to-end checks
compare the quantized checkpoint with stock's, and prove the copies are what the load used by spoiling them."""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import pytest
import torch

from test_gptqmodel_layer_reads import _quantize, _raw_shard, _reader_threads
from test_gptqmodel_plugin import plugin, tiny  # noqa: F401  (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def stage_cpu(monkeypatch):
    """Let layer_reads serve CPU loads and layer_stage copy to the CPU (without CUDA neither acts)."""
    from defuser_quant.integrations.gptqmodel import layer_reads, layer_stage

    monkeypatch.setattr(layer_reads, "SERVED_DEVICES", frozenset({"cpu", "cuda"}))
    monkeypatch.setattr(layer_stage, "DEVICES", frozenset({"cpu", "cuda"}))
    return layer_stage


def test_copies_are_whole_and_a_stop_gives_up_before_the_next_piece():
    from defuser_quant.integrations.gptqmodel.layer_stage import copy_pieces

    pieces = [torch.arange(n, dtype=torch.uint8) for n in (5, 64, 3)]
    copies = copy_pieces(pieces, torch.device("cpu"))
    assert [torch.equal(a, b) for a, b in zip(copies, pieces)] == [True] * 3
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(copies, pieces))
    stop = threading.Event()
    stop.set()
    with pytest.raises(RuntimeError, match="stopped"):
        copy_pieces(pieces, torch.device("cpu"), stop)


def test_a_read_serves_views_of_its_copies_only_once_the_load_asks(tmp_path):
    from defuser_quant.integrations.gptqmodel import layer_reads

    path = tmp_path / "model.safetensors"
    tensors = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16),
               "c": torch.tensor([1, 2, 3], dtype=torch.int64)}
    _raw_shard(path, tensors)
    read = layer_reads.read_tensors({str(path): list(tensors)}, pin=False, piece_bytes=32)
    assert len(read.pieces) >= 2  # several pieces: the layout points each name at its own
    copies = [p.clone() for p in read.pieces]
    assert read.staged_device is None
    read.set_staged(copies)
    assert read.staged_device == torch.device("cpu")
    ok, host = read.take(str(path), "a")
    assert ok and torch.equal(host, tensors["a"]) and not any(host.data_ptr() == c.data_ptr() for c in copies)
    read.use_staged = True
    for name in ("b", "c"):
        ok, staged = read.take(str(path), name)
        assert ok and torch.equal(staged, tensors[name]) and staged.dtype == tensors[name].dtype
        assert any(c.data_ptr() <= staged.data_ptr() < c.data_ptr() + c.numel() for c in copies)
    assert read.take(str(path), "b") == (False, None)  # each name served once


@pytest.mark.slow
def test_the_next_layers_load_is_served_from_its_device_copy(plugin, tiny, tmp_path, stage_cpu, monkeypatch):  # noqa: F811
    from defuser_quant.integrations.gptqmodel.overhead import OPT_IN, PARTS

    assert "layer_stage" in OPT_IN
    parts = PARTS - {"capture_lazy"}
    _, stock = _quantize(plugin, tiny, tmp_path / "stock", PARTS - {"layer_reads", "layer_stage"})
    lean, tensors = _quantize(plugin, tiny, tmp_path / "lean", parts)
    assert not [k for k in tensors if not torch.equal(tensors[k], stock[k])]
    staged, reads = lean.bookkeeping.layer_stage, lean.bookkeeping.layer_reads
    assert "layer_stage" in lean.bookkeeping.parts and staged is not None
    # layer 1 was read ahead after layer 0's load, copied after layer 0's last subset forward, its load served from it;
    # after layer 1's there was nothing to copy
    assert staged.staged == 1 and staged.failed == 0 and staged.bytes > 0
    assert staged.refused == {"no read of the next layer ahead (the last layer, or a layer not read)": 1}
    assert reads.read_ahead == 1 and reads.staged_loads == 1
    assert lean.bookkeeping.as_dict()["layer_stage"]["staged"] == 1

    # the load really used the copies: spoiled copies give another checkpoint
    real = stage_cpu.copy_pieces
    monkeypatch.setattr(stage_cpu, "copy_pieces", lambda *a, **k: [c.zero_() for c in real(*a, **k)])
    _, spoiled = _quantize(plugin, tiny, tmp_path / "spoiled", parts)
    layer1 = [k for k in spoiled if k.startswith("model.layers.1.") and "experts" in k]
    assert layer1 and [k for k in layer1 if not torch.equal(spoiled[k], stock[k])]


@pytest.mark.slow
def test_with_capture_lazy_the_first_layer_is_copied_as_soon_as_it_is_read(plugin, tiny, tmp_path, stage_cpu, monkeypatch):  # noqa: F811
    from defuser_quant.integrations.gptqmodel.overhead import PARTS

    _, stock = _quantize(plugin, tiny, tmp_path / "stock", PARTS - {"layer_reads", "layer_stage"})
    lean, tensors = _quantize(plugin, tiny, tmp_path / "lean", PARTS)
    assert not [k for k in tensors if not torch.equal(tensors[k], stock[k])]
    staged, reads = lean.bookkeeping.layer_stage, lean.bookkeeping.layer_reads
    # layer 0 read from the start and copied to the quantize device, layer 1 after layer 0's last forward
    assert reads.first == "model.layers.0" and lean.bookkeeping.capture_lazy.kept_lazy == 1
    assert staged.staged == 2 and reads.staged_loads == 2 and staged.failed == 0
    assert staged.refused == {"no read of the next layer ahead (the last layer, or a layer not read)": 1}

    real = stage_cpu.copy_pieces
    monkeypatch.setattr(stage_cpu, "copy_pieces", lambda *a, **k: [c.zero_() for c in real(*a, **k)])
    _, spoiled = _quantize(plugin, tiny, tmp_path / "spoiled", PARTS)
    for layer in (0, 1):  # both loads used their copies
        names = [k for k in spoiled if k.startswith(f"model.layers.{layer}.") and "experts" in k]
        assert names and [k for k in names if not torch.equal(spoiled[k], stock[k])], layer


@pytest.mark.slow
@pytest.mark.parametrize("trouble", ["no room", "copy raises", "not a staged device"])
def test_a_read_not_copied_is_served_from_host_memory(plugin, tiny, tmp_path, stage_cpu, monkeypatch, caplog, trouble):  # noqa: F811
    from defuser_quant.integrations.gptqmodel.overhead import PARTS

    parts = PARTS - {"capture_lazy"}
    _, stock = _quantize(plugin, tiny, tmp_path / "stock", PARTS - {"layer_reads", "layer_stage"})
    if trouble == "no room":
        monkeypatch.setattr(stage_cpu, "room_for", lambda *a, **k: False)
    elif trouble == "copy raises":
        def oom(*args, **kwargs):
            raise RuntimeError("CUDA out of memory")

        monkeypatch.setattr(stage_cpu, "copy_pieces", oom)
    else:
        monkeypatch.setattr(stage_cpu, "DEVICES", frozenset({"cuda"}))
    with caplog.at_level(logging.WARNING, logger=stage_cpu.__name__):
        lean, tensors = _quantize(plugin, tiny, tmp_path / "lean", parts)
    assert not [k for k in tensors if not torch.equal(tensors[k], stock[k])]
    staged, reads = lean.bookkeeping.layer_stage, lean.bookkeeping.layer_reads
    assert staged.staged == 0 and reads.staged_loads == 0 and reads.read_ahead == 1 and reads.tensors_stock == 0
    if trouble == "copy raises":
        assert staged.failed == 1 and "CUDA out of memory" in caplog.text
    else:
        (why,) = set(staged.refused) - {"no read of the next layer ahead (the last layer, or a layer not read)"}
        assert ("no room" in why) if trouble == "no room" else ("loaded to cpu" in why)


@pytest.mark.slow
def test_without_layer_reads_the_part_is_disabled_and_says_why(plugin, tiny, tmp_path, stage_cpu):  # noqa: F811
    from defuser_quant.integrations.gptqmodel.overhead import DEFAULT_PARTS

    lean, _ = _quantize(plugin, tiny, tmp_path / "lean", (DEFAULT_PARTS - {"layer_reads"}) | {"layer_stage"})
    assert lean.bookkeeping.disabled["layer_stage"] == "needs the layer_reads part"
    assert lean.bookkeeping.layer_stage is None


@pytest.mark.slow
@pytest.mark.parametrize("which", ["next layer", "first layer"])
def test_ctrl_c_while_a_copy_runs_waits_for_it_and_restores_gptqmodel(plugin, tiny, stage_cpu, monkeypatch, which):  # noqa: F811
    """Ctrl-C while the next layer's read is copied (or the first layer's, from the block's start with capture_lazy):
    the block ends after the copy thread, which gives up at its next piece, and GPTQModel's functions are its own
    again."""
    from test_gptqmodel_overhead import _load, _patch_points

    from defuser_quant.integrations.gptqmodel.overhead import PARTS, lean_bookkeeping

    model = _load(tiny["src"], True)
    before = _patch_points()
    started, pieces_copied = threading.Event(), []
    real = stage_cpu.copy_pieces

    def slow_copy(pieces, device, stop=None):
        started.set()
        for piece in pieces:
            stop.wait(0.5)  # Ctrl-C comes meanwhile: close() sets stop
            pieces_copied.extend(real([piece], device, stop))
        return pieces_copied

    monkeypatch.setattr(stage_cpu, "copy_pieces", slow_copy)
    layer = model.model.get_submodule("model.layers.0")
    from gptqmodel.looper.module_looper import ModuleLooper

    if which == "first layer":
        with pytest.raises(KeyboardInterrupt):
            with lean_bookkeeping(model, PARTS) as stats:
                assert started.wait(10)  # the first layer's copy, queued at the block's start
                raise KeyboardInterrupt
        assert _patch_points() == before and not _reader_threads()
        assert stats.layer_stage.failed == 1 and stats.layer_stage.staged == 0
        return
    with pytest.raises(KeyboardInterrupt):
        with lean_bookkeeping(model, PARTS - {"capture_lazy"}) as stats:
            model.turtle_model.materialize_submodule(target_model=model.model, target_submodule=layer,
                                                     device=torch.device("cpu"), module_path="model.layers.0")
            looper = ModuleLooper.__new__(ModuleLooper)
            looper.gptq_model = model
            ModuleLooper._subset_event_dispatch(looper, stage="forward_end", layer_idx=0, subset_index=3, subset_total=4,
                                                module_names=[], processor=None)
            assert started.wait(10)
            raise KeyboardInterrupt
    assert _patch_points() == before and not _reader_threads()
    assert stats.layer_stage.failed == 1 and stats.layer_stage.staged == 0  # stopped, not finished
