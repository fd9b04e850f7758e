"""``integrations/gptqmodel/pack_kernel.py``: the row-wise CPU pack gives GPTQModel's ``pack_block_cpu`` words for
every bit width, weight dtype, ``g_idx`` order and edge value, refuses what it does not pack with one clear error, and
says so once where it cannot be built."""

from __future__ import annotations

import logging

import pytest
import torch

pytest.importorskip("gptqmodel")

from defuser_quant.integrations.gptqmodel import pack_kernel  # noqa: E402
from test_gptqmodel_packing import extension  # noqa: E402, F401  (fixture)


@pytest.fixture(scope="module")
def kernel():
    if pack_kernel.load() is None:
        pytest.skip("the pack kernel could not be built here (no C++ compiler)")


def _ext(weight, scales, zeros, g_idx, bits):
    from gptqmodel.nn_modules.qlinear.pack_block_ext import pack_block_cpu

    return pack_block_cpu(weight, scales, zeros, g_idx.to(torch.int32), bits, 32, 8192, 1)


def _inputs(bits, dtype, order, out=96, inp=256, group_size=64, seed=0):
    """A module's pack inputs as pack_block hands them over: weight [out, in], scales/zeros [groups, out]."""
    gen = torch.Generator().manual_seed(seed)
    groups = 1 if order == "per channel" else inp // group_size
    scales = (torch.rand(groups, out, generator=gen) * 0.05 + 0.001).to(dtype)
    scales[0, :3] = 0  # the extension's zero-scale guard
    zeros = torch.randint(0, 2 ** bits, (groups, out), generator=gen).to(dtype)
    g_idx = torch.arange(inp, dtype=torch.int32) // (inp // groups)
    if order == "desc_act":
        g_idx = g_idx[torch.randperm(inp, generator=gen)]
    elif order == "negative":
        g_idx = torch.where(torch.arange(inp) % 3 == 0, g_idx - groups, g_idx).to(torch.int32)
    codes = torch.randint(0, 2 ** bits, (out, inp), generator=gen).float()
    s, z = scales.float()[g_idx.long() % groups].T, zeros.float()[g_idx.long() % groups].T
    weight = ((codes - z) * s + torch.randn(out, inp, generator=gen) * 0.01).to(dtype)  # near the grid, some off it
    return weight, scales, zeros, g_idx


@pytest.mark.parametrize("order", ["grouped", "desc_act", "negative", "per channel"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_the_kernels_words_are_the_extensions(kernel, extension, bits, dtype, order):
    args = _inputs(bits, dtype, order)
    got, want = pack_kernel.pack_rows(*args, bits), _ext(*args, bits)
    assert got[0].dtype == got[1].dtype == torch.int32
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_ties_non_finite_and_out_of_range_weights_are_the_extensions(kernel, extension, bits):
    """Exact halves round to even; NaN, infinities and values past the grid clamp as the extension's do; an output
    count that is not a multiple of 32 leaves the zero words' tail as the extension does."""
    weight, scales, zeros, g_idx = _inputs(bits, torch.float32, "grouped", out=48, inp=128, group_size=32)
    scales[:] = 1.0
    zeros[:] = 0
    weight[0, :] = torch.arange(128) % 2 ** bits + 0.5  # (w + 0) / 1 = k + 0.5: round half to even
    weight[1, :4] = torch.tensor([float("nan"), float("inf"), -float("inf"), 1e30])
    weight[2, :] = -weight[2, :].abs() - 7  # below 0: clamps to 0
    for dtype in (torch.float32, torch.bfloat16):
        args = (weight.to(dtype), scales.to(dtype), zeros.to(dtype), g_idx)
        got, want = pack_kernel.pack_rows(*args, bits), _ext(*args, bits)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_what_it_does_not_pack_is_one_clear_error(kernel):
    weight, scales, zeros, g_idx = _inputs(4, torch.bfloat16, "grouped")
    with pytest.raises(ValueError, match="packs 2, 4 or 8 bits.*got 3"):
        pack_kernel.pack_rows(weight, scales, zeros, g_idx, 3)
    bad = g_idx.clone()
    bad[5] = 99
    with pytest.raises(RuntimeError, match=r"g_idx\[5\]=99 is out of range for 4 groups"):
        pack_kernel.pack_rows(weight, scales, zeros, bad, 4)
    with pytest.raises(RuntimeError, match="in_features must be a multiple of 32, got 250"):
        pack_kernel.pack_rows(weight[:, :250], scales, zeros, g_idx[:250], 4)
    with pytest.raises(RuntimeError, match="g_idx length 255 != in_features 256"):
        pack_kernel.pack_rows(weight, scales, zeros, g_idx[:255], 4)
    with pytest.raises(RuntimeError, match=r"scales and zeros must be \[groups, out\]"):
        pack_kernel.pack_rows(weight, scales.T, zeros, g_idx, 4)


def test_a_build_that_fails_is_said_once_and_packing_is_refused(monkeypatch, caplog):
    import torch.utils.cpp_extension as cpp

    calls = []

    def no_compiler(*args, **kwargs):
        calls.append(kwargs["name"])
        raise RuntimeError("Ninja is required to load C++ extensions\nmore lines")

    monkeypatch.setattr(pack_kernel, "_loaded", {})
    monkeypatch.setattr(cpp, "load_inline", no_compiler)
    with caplog.at_level(logging.WARNING, logger=pack_kernel.__name__):
        assert pack_kernel.load() is None and pack_kernel.load() is None
        with pytest.raises(RuntimeError, match="could not be built here"):
            pack_kernel.pack_rows(*_inputs(4, torch.bfloat16, "grouped"), 4)
    assert len(calls) == 1  # tried once
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["pack_kernel: could not be built here (RuntimeError: Ninja is required to load C++ "
                        "extensions); GPTQModel's extension packs instead"]


def test_each_host_cpu_and_source_has_a_build_of_its_own(monkeypatch):
    """``-march=native`` code runs only where it was built: a shared extensions folder must not hand it to another
    CPU."""
    name = pack_kernel._build_name()
    monkeypatch.setattr(pack_kernel, "_host_tag", lambda: "x86_64 another cpu flags: sse2")
    assert pack_kernel._build_name() != name
    monkeypatch.undo()
    monkeypatch.setattr(pack_kernel, "_SOURCE", pack_kernel._SOURCE + "\n// changed\n")
    assert pack_kernel._build_name() != name


def test_the_kernel_lets_other_threads_run_while_it_packs(kernel):
    """It runs without the interpreter lock, as GPTQModel's extension (a torch op) does: otherwise the pool's threads
    would pack one at a time and the main thread would wait for each. With a switch interval of 60 s no thread gives
    the lock up unless it blocks or a call lets it go, so the watcher (asleep when the calls start) runs during the
    kernel's calls only if the kernel lets it go."""
    import sys
    import threading
    import time

    args = _inputs(4, torch.bfloat16, "grouped", out=2048, inp=4096)
    pack_kernel.pack_rows(*args, 4)  # loaded and warm before the watcher starts
    state = {"running": False, "seen": 0, "stop": False}
    ready = threading.Event()

    def watch():
        ready.set()
        while not state["stop"]:
            state["seen"] += state["running"]
            time.sleep(0.0005)

    interval = sys.getswitchinterval()
    watcher = threading.Thread(target=watch)
    sys.setswitchinterval(60.0)
    try:
        watcher.start()
        ready.wait()  # blocks, so the watcher runs until its first sleep
        for _ in range(3):
            state["running"] = True
            pack_kernel.pack_rows(*args, 4)
            state["running"] = False
    finally:
        state["stop"] = True
        sys.setswitchinterval(interval)
        watcher.join()
    assert state["seen"] > 0
