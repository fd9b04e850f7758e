"""The plugin's save path (integrations.gptqmodel.shard_writer and save_sources) against GPTQModel
7.6's own: the same shard bytes from the same entries, the same checkpoint from a real quantize
and save of the tiny qwen3_moe (CPU), whole-or-nothing shard files, and refusals that keep
GPTQModel's path."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from test_gptqmodel_plugin import _tensors, plugin, tiny  # noqa: E402, F401  (fixtures)

gptqmodel = pytest.importorskip("gptqmodel")
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _entries(folder: Path):
    """TensorSource entries of every kind the save writes: in-memory tensors (bf16, int32, a 0-d
    float), offloaded ``.dat`` and safetensors byte ranges, and an offloaded tensor without a range."""
    from gptqmodel.utils.model import OffloadTensorRef, TensorSource
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    bf16 = torch.randn(64, 48, generator=g).to(torch.bfloat16)
    ints = torch.randint(-2**31, 2**31 - 1, (16, 24), generator=g, dtype=torch.int32)
    dat = torch.randn(8, 8, generator=g)
    (folder / "w.dat").write_bytes(b"\0" * 12 + dat.numpy().tobytes())
    bundled = torch.randn(5, 7, generator=g).to(torch.float16)
    save_file({"a": torch.zeros(3), "b": bundled}, str(folder / "bundle.safetensors"))
    from defuser_quant.checkpoint.source import read_headers

    info = read_headers(folder, ["bundle.safetensors"])["b"]
    loose = torch.randn(4, 4, generator=g)
    save_file({"loose": loose}, str(folder / "loose.safetensors"))

    def ref(path: str, dtype, shape, fmt, offsets, weight_name=None):
        return OffloadTensorRef(path=str(folder / path), torch_dtype=dtype, shape=shape, format=fmt,
                                weight_name=weight_name, data_offsets=offsets)

    return [
        TensorSource(name="m.embed", torch_dtype=torch.bfloat16, shape=(64, 48), source=bf16),
        TensorSource(name="m.qweight", torch_dtype=torch.int32, shape=(16, 24), source=ints[:, :].t().contiguous().t()),
        TensorSource(name="m.scalar", torch_dtype=torch.float32, shape=(), source=torch.tensor(1.5)),
        TensorSource(name="m.dat", torch_dtype=torch.float32, shape=(8, 8), source=ref("w.dat", torch.float32, (8, 8), "dat", (12, 12 + 256))),
        TensorSource(name="m.bundled", torch_dtype=torch.float16, shape=(5, 7),
                     source=ref("bundle.safetensors", torch.float16, (5, 7), "safetensors", (info.offset, info.offset + info.nbytes))),
        TensorSource(name="m.loose", torch_dtype=torch.float32, shape=(4, 4),
                     source=ref("loose.safetensors", torch.float32, (4, 4), "safetensors", None, weight_name="loose")),
    ]


def test_shard_writer_writes_gptqmodels_bytes(tmp_path):
    from gptqmodel.utils.model import _write_shard_file

    from defuser_quant.integrations.gptqmodel.shard_writer import ShardWrites, write_shard_file, writer_mismatch

    assert writer_mismatch() is None  # the installed GPTQModel is the one this writer was checked against
    entries = _entries(tmp_path)
    meta = {"format": "pt", "note": "x" * 5}
    stock_size = _write_shard_file(str(tmp_path / "stock.safetensors"), entries, meta)
    stats = ShardWrites()
    ours_size = write_shard_file(str(tmp_path / "ours.safetensors"), entries, meta, stats)
    assert ours_size == stock_size == (tmp_path / "ours.safetensors").stat().st_size
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "stock.safetensors").read_bytes()
    assert (stats.files, stats.from_memory, stats.copied, stats.read) == (1, 64 * 48 * 2 + 16 * 24 * 4 + 4, 256 + 70, 64)
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_a_failed_or_interrupted_shard_write_leaves_the_old_file_and_no_partial(tmp_path, monkeypatch):
    from gptqmodel.utils.model import TensorSource

    from defuser_quant.integrations.gptqmodel import shard_writer

    target = tmp_path / "model.safetensors"
    target.write_bytes(b"an earlier save")
    entries = _entries(tmp_path)
    bad = TensorSource(name="m.bad", torch_dtype=torch.float32, shape=(3,), source=torch.zeros(4))  # 16 bytes, header 12
    with pytest.raises(ValueError, match="m.bad holds 16 bytes, its header entry says 12"):
        shard_writer.write_shard_file(str(target), [*entries, bad], {})
    assert target.read_bytes() == b"an earlier save"

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(shard_writer, "copy_range", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shard_writer.write_shard_file(str(target), entries, {})
    assert target.read_bytes() == b"an earlier save"
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


@pytest.mark.parametrize("threads", [2, 3])
def test_threaded_shard_writer_writes_gptqmodels_bytes(tmp_path, monkeypatch, threads):
    """Through a shared mapping of the file, pieces of 100 bytes (a tensor split over several) copied by 2 or 3
    threads: GPTQModel's bytes, every kind of entry counted as in order."""
    from gptqmodel.utils.model import _write_shard_file

    from defuser_quant.integrations.gptqmodel import mapped_shard
    from defuser_quant.integrations.gptqmodel.shard_writer import ShardWrites, write_shard_file

    monkeypatch.setattr(mapped_shard, "PIECE_BYTES", 100)
    entries = _entries(tmp_path)
    entries = [entries[-1], *entries[:-1]]  # the tensor read first (no byte range) ahead of the others
    stock_size = _write_shard_file(str(tmp_path / "stock.safetensors"), entries, {"format": "pt"})
    stats = ShardWrites()
    size = write_shard_file(str(tmp_path / "ours.safetensors"), entries, {"format": "pt"}, stats, threads=threads)
    assert size == stock_size and (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "stock.safetensors").read_bytes()
    assert (stats.files, stats.mapped, stats.from_memory, stats.copied, stats.read) == (1, 1, 64 * 48 * 2 + 16 * 24 * 4 + 4,
                                                                                          256 + 70, 64)
    assert not [p for p in tmp_path.iterdir() if ".partial" in p.name]


def test_threaded_shard_writer_writes_in_order_where_the_file_system_cannot_reserve(tmp_path, monkeypatch):
    import errno

    from gptqmodel.utils.model import _write_shard_file

    from defuser_quant.integrations.gptqmodel import mapped_shard
    from defuser_quant.integrations.gptqmodel.shard_writer import ShardWrites, write_shard_file

    def unsupported(fd, offset, length):
        os.ftruncate(fd, offset + length + 4096)  # as if it got part way: the fallback must start from an empty file
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(mapped_shard.os, "posix_fallocate", unsupported)
    entries = _entries(tmp_path)
    _write_shard_file(str(tmp_path / "stock.safetensors"), entries, {})
    stats = ShardWrites()
    write_shard_file(str(tmp_path / "ours.safetensors"), entries, {}, stats, threads=4)
    assert (tmp_path / "ours.safetensors").read_bytes() == (tmp_path / "stock.safetensors").read_bytes()
    assert (stats.files, stats.mapped, stats.read) == (1, 0, 64)  # counted once, by the writes in order


def test_a_full_disk_interrupt_or_bad_entry_in_a_threaded_write_leaves_the_old_file(tmp_path, monkeypatch):
    import errno
    import threading

    from gptqmodel.utils.model import TensorSource

    from defuser_quant.integrations.gptqmodel import mapped_shard, shard_writer

    target = tmp_path / "model.safetensors"
    target.write_bytes(b"an earlier save")
    entries = _entries(tmp_path)
    leftovers = lambda: [p for p in tmp_path.iterdir() if ".partial" in p.name]  # noqa: E731
    bad = TensorSource(name="m.bad", torch_dtype=torch.float32, shape=(3,), source=torch.zeros(4))
    with pytest.raises(ValueError, match="m.bad holds 16 bytes, its header entry says 12"):
        shard_writer.write_shard_file(str(target), [*entries, bad], {}, threads=2)
    assert target.read_bytes() == b"an earlier save" and not leftovers()
    strided = TensorSource(name="m.strided", torch_dtype=torch.float32, shape=(3,), source=torch.zeros(4, 2).t())
    with pytest.raises(ValueError, match="m.strided holds 32 bytes, its header entry says 12"):  # copied only later
        shard_writer.write_shard_file(str(target), [strided, *entries], {}, threads=2)
    assert target.read_bytes() == b"an earlier save" and not leftovers()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as m:
        m.setattr(mapped_shard.os, "posix_fallocate", full)
        with pytest.raises(OSError, match="No space left"):  # raised, not a SIGBUS at a page fault later
            shard_writer.write_shard_file(str(target), entries, {}, threads=2)
    assert target.read_bytes() == b"an earlier save" and not leftovers()

    copy, started = mapped_shard._copy, []

    def interrupted(view, piece):
        started.append(piece)
        if len(started) == 3:
            raise KeyboardInterrupt
        return copy(view, piece)

    monkeypatch.setattr(mapped_shard, "PIECE_BYTES", 64)
    monkeypatch.setattr(mapped_shard, "_copy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        shard_writer.write_shard_file(str(target), entries, {}, threads=2)
    assert target.read_bytes() == b"an earlier save" and not leftovers()
    assert not [t for t in threading.enumerate() if t.name.startswith("dq-shard-write")]
    for bad_threads in (0, True, 1.5):
        with pytest.raises(ValueError, match="threads must be a whole number >= 1"):
            shard_writer.write_shard_file(str(target), entries, {}, threads=bad_threads)


def test_install_refuses_bad_write_threads(plugin):  # noqa: F811
    from defuser_quant.integrations import gptqmodel as g

    for bad in (0, -1, True, "2"):
        with pytest.raises(ValueError, match="write_threads must be a whole number >= 1"):
            g.install(write_threads=bad)
    with pytest.raises(ValueError, match="write_threads=2 needs fast_save=True"):
        g.install(fast_save=False, write_threads=2)
    assert g._STATE is None or g._STATE.write_threads == 1  # nothing changed by a refused call


def test_another_writer_keeps_gptqmodels(monkeypatch, caplog):
    from gptqmodel.utils import model as model_utils

    from defuser_quant.integrations.gptqmodel.shard_writer import fast_shard_writes

    def _write_shard_file(path, entries, metadata):  # a different release's writer
        return 0

    monkeypatch.setattr(model_utils, "_write_shard_file", _write_shard_file)
    with caplog.at_level(logging.INFO):
        assert fast_shard_writes(_write_shard_file) is _write_shard_file
    assert "GPTQModel's own shard writer kept" in caplog.text


def _quantize_and_save(plugin, tiny, out: Path, offload: Path):  # noqa: F811
    from gptqmodel import GPTQModel, QuantizeConfig

    shutil.rmtree(offload, ignore_errors=True)
    model = GPTQModel.load(str(tiny["src"]), QuantizeConfig(bits=4, group_size=128, offload_to_disk=True,
                                                               offload_to_disk_path=str(offload)))
    plugin.quantize_with_defuser(model, tiny["calibration"][:16], batch_size=4, grouped=True, batched_solve=True)
    model.save(str(out))
    return model


@pytest.mark.slow
def test_fast_save_writes_gptqmodels_checkpoint(plugin, tiny, tmp_path, monkeypatch):  # noqa: F811
    from defuser_quant.integrations import gptqmodel as g

    # GPTQModel swaps its progress bars for silent ones under pytest's captured output: draw them as in a real run
    monkeypatch.delenv("PYTEST_CURRENT_TEST", raising=False)

    g.uninstall()
    g.install(fast_save=False)
    try:
        _quantize_and_save(g, tiny, tmp_path / "stock", tmp_path / "offload")
        assert g.last_save() is None
    finally:
        g.uninstall()
        g.install()
    model = _quantize_and_save(g, tiny, tmp_path / "fast", tmp_path / "offload")
    save = g.last_save()
    # the head (and, with the base_in_memory part off, the embeddings) was mapped from the source checkpoint, not read
    # and copied; the embeddings stay as the input capture loaded them, views of the source file (base_in_memory)
    mapped = save["mapped"]
    assert mapped["mapped"] >= 1 and mapped["refused"] == {}
    head = model.model.lm_head.weight
    source = _tensors(tiny["src"])["lm_head.weight"]
    assert mapped["bytes"] >= source.numel() * source.element_size() and torch.equal(head, source)
    # GPTQModel's lazy-source sync drew its bar (a forced draw, then two per module it syncs) through the rate limit
    draws = save["draws"]
    assert draws["disabled"] == {} and draws["rendered"] >= 1 and draws["skipped"] >= 1
    assert draws["rendered"] + draws["skipped"] >= 2 * 8 + 1  # at least one layer's experts: two draws each
    writes = save["writes"]
    assert writes["files"] == 1 and writes["copied"] > 0 and writes["from_memory"] > 0 and writes["read"] == 0
    # the same files, byte for byte (GPTQModel writes its offload path into the configs: the same folder here)
    stock = sorted(p.name for p in (tmp_path / "stock").iterdir())
    assert stock == sorted(p.name for p in (tmp_path / "fast").iterdir())
    assert (tmp_path / "fast" / "model.safetensors").read_bytes() == (tmp_path / "stock" / "model.safetensors").read_bytes()
    assert writes["mapped"] == 0  # written in order: write_threads defaults to 1
    # a mapped weight is private: writing to it leaves the source checkpoint as it was
    with torch.no_grad():
        head[0, 0] = 7.0
    assert _tensors(tiny["src"])["lm_head.weight"][0, 0] == source[0, 0]

    # the shard copied into a mapping of its file by three threads, in pieces of 4 KiB: the same bytes again
    from defuser_quant.integrations.gptqmodel import mapped_shard

    monkeypatch.setattr(mapped_shard, "PIECE_BYTES", 4096)
    g.install(write_threads=3)
    try:
        _quantize_and_save(g, tiny, tmp_path / "threads", tmp_path / "offload")
    finally:
        g.install()
    assert g.last_save()["writes"]["mapped"] == 1 and g.last_save()["writes"]["files"] == 1
    assert (tmp_path / "threads" / "model.safetensors").read_bytes() == (tmp_path / "stock" / "model.safetensors").read_bytes()
    assert g._STATE.write_threads == 1  # install() again: back to writing in order


def test_mapping_refuses_what_the_source_does_not_hold_whole(plugin, tiny):  # noqa: F811
    from gptqmodel import GPTQModel, QuantizeConfig

    from defuser_quant.integrations.gptqmodel.save_sources import map_whole_sources, sources_mismatch

    assert sources_mismatch() is None
    model = GPTQModel.load(str(tiny["fused"]), QuantizeConfig(bits=4, group_size=128, offload_to_disk=True))
    shell, turtle = model.model, model.turtle_model
    metas = {n for n, p in shell.named_parameters() if p.device.type == "meta"}
    assert any(".experts.0." in n for n in metas)
    stats = map_whole_sources(shell, turtle)
    # per-expert projections of the fused checkpoint are slices of its fused tensors: left to GPTQModel
    assert stats.refused.get("a slice of a source tensor", 0) >= 3 * 8
    left = {n for n, p in shell.named_parameters() if p.device.type == "meta"}
    assert all(".experts." in n for n in left) and "model.embed_tokens.weight" not in left
    assert stats.mapped == len(metas) - len(left)

    tied = GPTQModel.load(str(tiny["src"]), QuantizeConfig(bits=4, group_size=128, offload_to_disk=True))
    tied.model.config.tie_word_embeddings = True
    stats = map_whole_sources(tied.model, tied.turtle_model)
    assert (stats.mapped, stats.refused) == (0, {"tied word embeddings": 1})


def test_an_unreadable_source_header_is_left_to_gptqmodel(plugin, tiny, tmp_path):  # noqa: F811
    from gptqmodel import GPTQModel, QuantizeConfig

    from defuser_quant.integrations.gptqmodel.save_sources import map_whole_sources

    model = GPTQModel.load(str(tiny["src"]), QuantizeConfig(bits=4, group_size=128, offload_to_disk=True))
    broken = tmp_path / "broken"
    shutil.copytree(tiny["src"], broken)
    (broken / "model.safetensors").write_bytes(b"\xff" * 64)  # a header length no file can hold
    model.turtle_model.model_local_path = str(broken)
    metas = {n for n, p in model.model.named_parameters() if p.device.type == "meta"}
    stats = map_whole_sources(model.model, model.turtle_model)
    assert stats.mapped == 0 and stats.refused == {"not in its shard's readable header": len(metas)}
    assert {n for n, p in model.model.named_parameters() if p.device.type == "meta"} == metas
