"""The ``layer_reads`` part of the lean GPTQModel bookkeeping (integrations.gptqmodel.layer_reads):
a layer's checkpoint tensors read into host buffers, the next layer's ahead of time, and served
to GPTQModel's own layer load as what ``safe_open(...).get_tensor`` returns.

On a machine without CUDA the part reads nothing (it serves loads to a GPU only); the tests below
let it serve CPU loads too (``SERVED_DEVICES``), which runs every line of it. On a GPU the end-to-end
test in ``test_gptqmodel_overhead.py`` checks it serving layer 1's load to CUDA
(``benchmarks/results/gptqmodel_layer_reads_cuda_tests_h200_round15.log``)."""

from __future__ import annotations

import json
import os
import struct
import threading
from pathlib import Path

import pytest
import torch

from test_gptqmodel_plugin import _tensors, plugin, tiny  # noqa: E402, F401  (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

_NAMES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.int8: "I8", torch.bool: "BOOL",
          torch.float8_e4m3fn: "F8_E4M3", torch.int64: "I64"}


def _raw_shard(path: Path, tensors: dict[str, torch.Tensor], extra: dict | None = None) -> None:
    """A safetensors file with the tensors in the given order (``save_file`` would sort them by
    alignment), so a tensor can sit at an offset its dtype does not fit; written to a new inode."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        header[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    header.update(extra or {})
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))
    os.replace(tmp, path)


def _mixed() -> dict[str, torch.Tensor]:
    """In file order; byte offsets in comments."""
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(8, 4, generator=g),  # 0-128
        "b": torch.randn(3, generator=g).to(torch.bfloat16),  # 128-134
        "c": torch.arange(5, dtype=torch.int8),  # 134-139
        "d": torch.randn(4, generator=g).to(torch.bfloat16),  # 139-147: misaligned for bf16, not served
        "p": torch.tensor([7], dtype=torch.int8),  # 147-148
        "e": torch.tensor([True, False, True]),  # 148-151
        "f": torch.randn(1, generator=g).to(torch.float8_e4m3fn),  # 151-152
        "g": torch.tensor(2.5),  # 152-156, a scalar
        "h": torch.zeros(0, 3),  # 156, empty
        "i": torch.arange(40, dtype=torch.float32),  # 156-316, larger than a piece below
    }


@pytest.mark.parametrize("readers", [False, True])
def test_read_tensors_serves_what_safe_open_returns(tmp_path, readers):
    from concurrent.futures import ThreadPoolExecutor

    from safetensors import safe_open

    from defuser_quant.integrations.gptqmodel.layer_reads import read_tensors

    path = tmp_path / "model.safetensors"
    want = _mixed()
    _raw_shard(path, want, {"__metadata__": {"format": "pt"}})
    pool = ThreadPoolExecutor(3) if readers else None
    try:
        read = read_tensors({str(path): [*want, "missing"]}, pin=False, readers=pool, piece_bytes=48)
    finally:
        if pool is not None:
            pool.shutdown()
    assert read.reasons == {"not in the shard header": 1, "misaligned for its dtype": 1}
    served = {}
    for name in want:
        ok, t = read.take(str(path), name)
        if ok:
            served[name] = t
    assert set(served) == set(want) - {"d"}
    with safe_open(str(path), framework="pt", device="cpu") as f:
        for name, t in served.items():
            ref = f.get_tensor(name)
            assert t.dtype == ref.dtype and t.shape == ref.shape and t.is_contiguous()
            assert torch.equal(t.reshape(-1).view(torch.uint8), ref.reshape(-1).view(torch.uint8))
    assert read.take(str(path), "a") == (False, None)  # each name once
    assert read.bytes == sum(t.numel() * t.element_size() for t in want.values())


def test_a_file_replaced_after_its_read_is_not_served(tmp_path):
    from defuser_quant.integrations.gptqmodel.layer_reads import read_tensors

    path = tmp_path / "model.safetensors"
    _raw_shard(path, {"a": torch.ones(4), "b": torch.zeros(2)})
    read = read_tensors({str(path): ["a", "b"]}, pin=False)  # e.g. read ahead, then the file is replaced
    _raw_shard(path, {"a": torch.full((4,), 3.0), "b": torch.zeros(2)})
    assert read.take(str(path), "a") == read.take(str(path), "b") == (False, None)  # the load reads the new file


def test_a_file_replaced_while_it_is_read_is_not_served(tmp_path, monkeypatch):
    from defuser_quant.integrations.gptqmodel import layer_reads

    path = tmp_path / "model.safetensors"
    _raw_shard(path, {"a": torch.ones(4)})
    real = layer_reads._pread_into

    def replaced_midway(fd, view, offset):
        _raw_shard(path, {"a": torch.full((4,), 9.0)})
        real(fd, view, offset)

    monkeypatch.setattr(layer_reads, "_pread_into", replaced_midway)
    read = layer_reads.read_tensors({str(path): ["a"]}, pin=False)
    assert read.reasons == {"file changed while read": 1} and read.take(str(path), "a") == (False, None)


def test_next_layer_paths():
    from defuser_quant.integrations.gptqmodel.layer_reads import _next_path

    assert _next_path("model.layers.9") == "model.layers.10"
    assert _next_path("model.language_model.layers.0") == "model.language_model.layers.1"
    assert _next_path("model.norm") is None and _next_path("7") is None


# ----- inside GPTQModel ----------------------------------------------------------------------
@pytest.fixture
def serve_cpu(monkeypatch):
    """Let the part serve CPU loads too (without CUDA it reads nothing)."""
    from defuser_quant.integrations.gptqmodel import layer_reads

    monkeypatch.setattr(layer_reads, "SERVED_DEVICES", frozenset({"cpu", "cuda"}))
    return layer_reads


def _quantize(plugin, tiny, out: Path, parts):  # noqa: F811
    from test_gptqmodel_overhead import _load

    model = _load(tiny["src"], True, out.parent / "offload")
    result = plugin.quantize_with_defuser(
        model, tiny["calibration"][:16], batch_size=4, grouped=True, batched_solve=True, lean_bookkeeping=parts
    )
    model.save(str(out))
    return result, _tensors(out)


def _reader_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("defuser-quant-read")]


@pytest.mark.slow
def test_served_layer_loads_give_gptqmodels_checkpoint(plugin, tiny, tmp_path, serve_cpu):  # noqa: F811
    from defuser_quant.integrations.gptqmodel.overhead import PARTS

    _, stock = _quantize(plugin, tiny, tmp_path / "stock", PARTS - {"layer_reads"})
    lean, tensors = _quantize(plugin, tiny, tmp_path / "lean", PARTS - {"capture_lazy"})
    assert tensors.keys() == stock.keys()
    assert not [k for k in tensors if not torch.equal(tensors[k], stock[k])]
    reads = lean.bookkeeping.layer_reads
    assert "layer_reads" not in lean.bookkeeping.disabled
    # two layers, each loaded once from the checkpoint: layer 0 read on the spot, layer 1 read ahead
    assert reads.layers == 2 and reads.read_ahead == 1 and reads.failed == reads.unused == reads.stock == 0
    assert reads.first is None
    # with capture_lazy, layer 0 loads in pre_quantize like layer 1: read from the block's start, during the capture
    lazy, lazy_tensors = _quantize(plugin, tiny, tmp_path / "lazy", PARTS)
    assert not [k for k in lazy_tensors if not torch.equal(lazy_tensors[k], stock[k])]
    first = lazy.bookkeeping.layer_reads
    assert lazy.bookkeeping.capture_lazy.kept_lazy == 1 and first.first == "model.layers.0"
    assert first.layers == 2 and first.read_ahead == 2 and first.failed == first.unused == first.stock == 0
    with open(next(Path(tiny["src"]).glob("*.safetensors")), "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    layer_tensors = [n for n in header if n.startswith("model.layers.")]
    assert reads.tensors_served == len(layer_tensors) and reads.tensors_stock == 0
    assert reads.bytes == sum(v["data_offsets"][1] - v["data_offsets"][0] for n, v in header.items() if n in layer_tensors)
    assert not _reader_threads()  # the reader threads end with the block


@pytest.mark.slow
def test_a_load_that_is_not_served_drops_its_own_read_ahead(plugin, tiny, tmp_path, monkeypatch):  # noqa: F811
    """A layer read ahead whose load goes to a device the part does not serve (here: the CPU, with the part active as
    on a CUDA host) is dropped at that load, so the next layer's read starts after it instead of waiting for it."""
    from defuser_quant.integrations.gptqmodel import layer_reads
    from defuser_quant.integrations.gptqmodel.overhead import PARTS

    _, stock = _quantize(plugin, tiny, tmp_path / "stock", PARTS - {"layer_reads"})
    monkeypatch.setattr(layer_reads, "serves_here", lambda: True)
    lean, tensors = _quantize(plugin, tiny, tmp_path / "lean", PARTS)
    assert not [k for k in tensors if not torch.equal(tensors[k], stock[k])]
    reads = lean.bookkeeping.layer_reads
    # layer 0 read from the start, layer 1 after layer 0's load; each dropped at its own (CPU) load
    assert reads.first == "model.layers.0" and reads.unused == 2 and reads.stock == 2
    assert reads.layers == reads.read_ahead == reads.tensors_served == 0


def test_first_layer_path_skips_dense_layers_and_other_lists():
    from torch import nn

    from defuser_quant.integrations.gptqmodel.layer_reads import first_layer_path

    class Experts(nn.Module):
        pass

    def layer(moe: bool) -> nn.Module:
        return nn.ModuleDict({"mlp": Experts() if moe else nn.Linear(2, 2)})

    def holds(module: nn.Module) -> bool:
        return any(isinstance(m, Experts) for m in module.modules())

    model = nn.Module()
    model.vision = nn.ModuleList([layer(False)])  # a list before the decoder layers, without experts
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([layer(False), layer(True), layer(True)])
    assert first_layer_path(model, holds) == "model.layers.1"
    assert first_layer_path(nn.ModuleList([layer(True)]), holds) == "0"
    model.model.layers = nn.ModuleList([layer(False)])
    assert first_layer_path(model, holds) is None


@pytest.mark.slow
def test_a_read_that_fails_leaves_the_load_to_gptqmodel(plugin, tiny, tmp_path, serve_cpu, monkeypatch):  # noqa: F811
    from defuser_quant.integrations.gptqmodel.overhead import PARTS

    def broken(*args, **kwargs):
        raise OSError("disk on fire")

    _, stock = _quantize(plugin, tiny, tmp_path / "stock", PARTS - {"layer_reads"})
    monkeypatch.setattr(serve_cpu, "read_tensors", broken)
    lean, tensors = _quantize(plugin, tiny, tmp_path / "lean", PARTS)
    assert not [k for k in tensors if not torch.equal(tensors[k], stock[k])]
    reads = lean.bookkeeping.layer_reads
    assert reads.layers == 0 and reads.failed == 2 and reads.stock == 2 and reads.tensors_served == 0


@pytest.mark.slow
@pytest.mark.parametrize("where", ["read", "read ahead", "first read"])
def test_ctrl_c_ends_the_readers_and_restores_gptqmodel(plugin, tiny, serve_cpu, monkeypatch, where):  # noqa: F811
    """Ctrl-C while a layer is read for its load, while the next one is read ahead, or while the first layer is read
    from the block's start (capture_lazy): the block ends, every reader thread with it, and GPTQModel's functions are
    its own again."""
    import time

    from test_gptqmodel_overhead import _load, _patch_points

    from defuser_quant.integrations.gptqmodel.overhead import lean_bookkeeping

    model = _load(tiny["src"], True)
    before = _patch_points()
    real = serve_cpu._pread_into

    def slow_or_interrupted(fd, view, offset):
        if where == "read":
            raise KeyboardInterrupt
        time.sleep(0.2)
        real(fd, view, offset)

    monkeypatch.setattr(serve_cpu, "_pread_into", slow_or_interrupted)
    layer = model.model.get_submodule("model.layers.0")
    if where == "first read":
        from defuser_quant.integrations.gptqmodel.overhead import PARTS

        with pytest.raises(KeyboardInterrupt):
            with lean_bookkeeping(model, PARTS) as stats:
                assert stats.layer_reads.first == "model.layers.0" and _reader_threads()
                raise KeyboardInterrupt
        assert _patch_points() == before and not _reader_threads()
        assert stats.layer_reads.unused == 1 and stats.layer_reads.layers == 0
        return
    with pytest.raises(KeyboardInterrupt):
        with lean_bookkeeping(model) as stats:
            model.turtle_model.materialize_submodule(target_model=model.model, target_submodule=layer,
                                                     device=torch.device("cpu"), module_path="model.layers.0")
            assert _reader_threads()  # layer 1 is being read ahead
            raise KeyboardInterrupt
    assert _patch_points() == before and not _reader_threads()
    reads = stats.layer_reads
    assert reads.layers == 0 if where == "read" else (reads.layers == 1 and reads.unused == 1)


def test_a_stopped_read_gives_up_before_its_next_piece(tmp_path, monkeypatch):
    """Ctrl-C (the block's close) sets ``stop``: a read of many pieces does not go on to the end."""
    from defuser_quant.integrations.gptqmodel import layer_reads

    path = tmp_path / "model.safetensors"
    _raw_shard(path, {f"t{i}": torch.full((16,), float(i)) for i in range(8)})  # 8 x 64 bytes
    stop = threading.Event()
    calls = []
    real = layer_reads._pread_into

    def first_then_stop(fd, view, offset):
        calls.append(offset)
        real(fd, view, offset)
        stop.set()

    monkeypatch.setattr(layer_reads, "_pread_into", first_then_stop)
    with pytest.raises(RuntimeError, match="stopped"):
        layer_reads.read_tensors({str(path): [f"t{i}" for i in range(8)]}, pin=False, piece_bytes=64, stop=stop)
    assert len(calls) == 1


def test_a_header_that_does_not_add_up_is_left_to_safetensors(tmp_path):
    """A name whose byte range does not fit its dtype and shape is not read (safetensors raises its
    own error when GPTQModel reads it); a header larger than safetensors allows fails the read."""
    from defuser_quant.integrations.gptqmodel.layer_reads import read_tensors

    path = tmp_path / "model.safetensors"
    _raw_shard(path, {"a": torch.ones(4), "b": torch.full((2,), 3.0)},
               {"a": {"dtype": "F32", "shape": [5], "data_offsets": [0, 16]}})
    read = read_tensors({str(path): ["a", "b"]}, pin=False)
    assert read.reasons == {"byte range does not fit its dtype and shape": 1}
    assert read.take(str(path), "a") == (False, None) and torch.equal(read.take(str(path), "b")[1], torch.full((2,), 3.0))
    huge = tmp_path / "huge.safetensors"
    huge.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    with pytest.raises(ValueError, match="header of 1000000000 bytes"):
        read_tensors({str(huge): ["a"]}, pin=False)
