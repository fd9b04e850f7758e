"""The ``layer_ahead`` lean part (integrations.gptqmodel.layer_ahead): the next layer loaded by
GPTQModel's own ``pre_quantize`` on a background thread once the current layer's last subset forward
has run. On the CPU the part is let load to the CPU (``DEVICES``, ``free_bytes`` patched) so the real
GPTQModel 7.6 run on the tiny qwen3_moe exercises it: the same checkpoint as without it, the load on
the background thread, waited for, a failure left to GPTQModel, Ctrl-C waits for a running load."""

from __future__ import annotations

import functools
import threading
import time
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from test_gptqmodel_overhead import _load, _patch_points
from test_gptqmodel_plugin import _tensors, plugin, tiny  # noqa: E402, F401  (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

THREAD = "dq-layer-ahead"


@pytest.fixture
def on_cpu(monkeypatch):
    """Let the part load ahead to the CPU (its default is CUDA only) with room enough."""
    from defuser_quant.integrations.gptqmodel import layer_ahead

    monkeypatch.setattr(layer_ahead, "DEVICES", frozenset({"cuda", "cpu"}))
    monkeypatch.setattr(layer_ahead, "free_bytes", lambda device: 1 << 40)
    return layer_ahead


@pytest.fixture
def copies(monkeypatch):
    """Every layer load GPTQModel's LazyTurtle makes: (module path, thread name, start, end); ``hold``
    runs on the load-ahead thread before the copy (a delay, or an error)."""
    from gptqmodel.utils import structure

    original = structure.LazyTurtle._copy_checkpoint_tensors_into_submodule
    seen: list[tuple[str, str, float, float]] = []
    state = SimpleNamespace(seen=seen, hold=None)

    @functools.wraps(original)  # the same signature: the lean parts check it
    def recorded(self, **kwargs):
        name = threading.current_thread().name
        t0 = time.perf_counter()
        if name.startswith(THREAD) and state.hold is not None:
            state.hold()
        try:
            return original(self, **kwargs)
        finally:
            seen.append((kwargs.get("module_path"), name, t0, time.perf_counter()))

    monkeypatch.setattr(structure.LazyTurtle, "_copy_checkpoint_tensors_into_submodule", recorded)
    return state


def _with_part():
    from defuser_quant.integrations.gptqmodel.overhead import DEFAULT_PARTS

    return DEFAULT_PARTS | {"layer_ahead"}


def _run(plugin, tiny, tmp_path, name, parts=None):  # noqa: F811
    result, tensors = _run_result(plugin, tiny, tmp_path, name, parts=parts)
    return result.bookkeeping, tensors


def _run_result(plugin, tiny, tmp_path, name, parts=None, batched_solve=True):  # noqa: F811
    """The tiny model quantized with ``parts`` (default: the default parts and ``layer_ahead``) and ``batched_solve``,
    then saved: (the plugin's result, the saved tensors)."""
    model = _load(tiny["src"], True, tmp_path / f"offload-{name}")
    result = plugin.quantize_with_defuser(model, tiny["calibration"][:16], batch_size=4, grouped=True,
                                          batched_solve=batched_solve,
                                          lean_bookkeeping=_with_part() if parts is None else parts)
    model.save(str(tmp_path / name))
    return result, _tensors(tmp_path / name)


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and not [k for k in a if not torch.equal(a[k], b[k])]


def _layer_loads(copies, path="model.layers.1"):
    return [(thread, t0, t1) for p, thread, t0, t1 in copies.seen if p == path]


@pytest.mark.slow
def test_the_next_layer_is_loaded_on_the_background_thread_and_the_checkpoint_is_the_same(
        plugin, tiny, tmp_path, on_cpu, copies):  # noqa: F811
    stats, ahead = _run(plugin, tiny, tmp_path, "ahead")
    loads = _layer_loads(copies)
    assert [thread for thread, *_ in loads] and all(t.startswith(THREAD) for t, *_ in loads)  # never the main thread
    assert not [p for p, thread, *_ in copies.seen if thread.startswith(THREAD) and p != "model.layers.1"]
    s = stats.layer_ahead
    assert (s.started, s.loaded, s.used, s.failed) == (1, 1, 1, 0)
    assert s.refused == {"the last layer": 1}  # layer 1's last forward: no layer after it
    assert stats.disabled == {}
    copies.seen.clear()
    stats_off, stock = _run(plugin, tiny, tmp_path, "stock", parts=True)
    assert [thread for thread, *_ in _layer_loads(copies)] == ["MainThread"]  # opt-in: by default GPTQModel's own call
    assert stats_off.layer_ahead.started == 0
    assert _same(ahead, stock) and any(k.endswith("experts.0.gate_proj.qweight") for k in ahead)


@pytest.mark.slow
def test_gptqmodel_waits_for_a_load_ahead_that_is_still_running(plugin, tiny, tmp_path, on_cpu, copies):  # noqa: F811
    copies.hold = lambda: time.sleep(1.5)  # longer than the rest of layer 0 takes here
    stats, _ = _run(plugin, tiny, tmp_path, "slow")
    s = stats.layer_ahead
    assert (s.started, s.loaded, s.used, s.failed) == (1, 1, 1, 0)
    assert s.waited_seconds > 0.3
    assert [t for t, *_ in _layer_loads(copies)][0].startswith(THREAD)
    # the main thread's pre_quantize found the layer loaded: GPTQModel did not copy it again
    assert not [t for t, *_ in _layer_loads(copies) if t == "MainThread"]


@pytest.mark.slow
def test_a_failed_load_ahead_is_warned_once_and_gptqmodel_loads_the_layer(
        plugin, tiny, tmp_path, on_cpu, copies, caplog):  # noqa: F811
    def fail():
        raise RuntimeError("no room for the layer")

    copies.hold = fail
    with caplog.at_level("WARNING", logger="defuser_quant.integrations.gptqmodel.layer_ahead"):
        stats, failed = _run(plugin, tiny, tmp_path, "failed")
    s = stats.layer_ahead
    assert (s.started, s.loaded, s.used, s.failed) == (1, 0, 1, 1)
    warned = [r.getMessage() for r in caplog.records if "ahead failed" in r.getMessage()]
    assert len(warned) == 1 and "RuntimeError: no room for the layer" in warned[0]
    assert "MainThread" in [t for t, *_ in _layer_loads(copies)]  # GPTQModel's own call loaded it
    copies.hold = None
    _, stock = _run(plugin, tiny, tmp_path, "stock", parts=True)
    assert _same(failed, stock)


@pytest.mark.slow
def test_ctrl_c_waits_for_the_running_load_and_restores_every_patch(
        plugin, tiny, tmp_path, on_cpu, copies, monkeypatch):  # noqa: F811
    from gptqmodel.looper import stage_layer

    started = threading.Event()
    copies.hold = lambda: (started.set(), time.sleep(1.0))
    replay = stage_layer._replay_layer_outputs

    def interrupted(*args, **kwargs):  # layer 0's replay comes after its last forward: the load ahead runs
        assert started.wait(30)
        raise KeyboardInterrupt

    monkeypatch.setattr(stage_layer, "_replay_layer_outputs", interrupted)
    before = _patch_points()
    model = _load(tiny["src"], True, tmp_path / "offload")
    with pytest.raises(KeyboardInterrupt):
        plugin.quantize_with_defuser(model, tiny["calibration"][:16], batch_size=4, grouped=True, batched_solve=True,
                                     lean_bookkeeping=_with_part())
    monkeypatch.setattr(stage_layer, "_replay_layer_outputs", replay)
    assert _patch_points() == before
    assert not [t for t in threading.enumerate() if t.name.startswith(THREAD)]  # the pool was shut down
    loads = _layer_loads(copies)
    assert len(loads) == 1 and loads[0][0].startswith(THREAD)  # it ran to its end before the block was left


# ----- refusals, without a run ---------------------------------------------------------------------
class _Experts(nn.Module):
    pass


def _ahead(model: nn.Module, *, device="cpu", dynamic=None, holds=True, gptq_cls=None):
    pytest.importorskip("gptqmodel")  # the part finds layers and checks them with GPTQModel's own helpers
    from defuser_quant.integrations.gptqmodel.layer_ahead import LayerAhead, LayerAheadStats

    cls = gptq_cls or type("FakeQModel", (), {})
    gptq = cls.__new__(cls)
    gptq.__dict__.update(model=model, quantize_config=SimpleNamespace(device=device, dynamic=dynamic))
    gptq.extract_layers_node = lambda: ["model.layers"]
    stats = LayerAheadStats()
    return LayerAhead(gptq, lambda layer: holds, stats), stats


def _stack(layers=2, meta=True) -> nn.Module:
    with torch.device("meta" if meta else "cpu"):
        inner = nn.Module()
        inner.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(layers)])
    model = nn.Module()
    model.model = inner
    return model


@pytest.mark.parametrize(("kwargs", "meta", "why"), [
    ({"device": "cuda:0"}, True, "the quantize device is not CUDA"),
    ({"dynamic": {"-:.*": {}}}, True, "a dynamic per-module config (it may skip a layer)"),
    ({"holds": False}, True, "the next layer holds no defused experts"),
    ({}, False, "the next layer is not a lazy layer (nothing to load)"),
])
def test_a_layer_that_is_not_ours_or_not_lazy_is_left_to_gptqmodel(on_cpu, monkeypatch, kwargs, meta, why):
    if kwargs.get("device", "").startswith("cuda"):
        monkeypatch.setattr(on_cpu, "DEVICES", frozenset({"cuda"}))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ahead, stats = _ahead(_stack(meta=meta), **kwargs)
    try:
        ahead.after_last_forward(0, ["model.layers.0"])
    finally:
        ahead.close()
    assert stats.started == 0 and dict(stats.refused) == {why: 1}


def test_no_load_ahead_without_room_for_the_layer_twice_over(on_cpu, monkeypatch):
    layer_bytes = 4 * 4 * 4 + 4 * 4  # Linear(4, 4) in float32
    monkeypatch.setattr(on_cpu, "free_bytes", lambda device: 2 * layer_bytes - 1)
    ahead, stats = _ahead(_stack())
    ahead.after_last_forward(0, ["model.layers.0"])
    ahead.close()
    assert stats.started == 0 and dict(stats.refused) == {"too little free memory on cpu for the layer twice over": 1}


def test_the_last_layer_and_a_subset_of_another_layer_start_nothing(on_cpu):
    ahead, stats = _ahead(_stack())
    ahead.after_last_forward(1, ["model.layers.1"])
    ahead.after_last_forward(0, ["embed_tokens"])  # e.g. GPTQModel's embeddings step, indexed 0 too
    ahead.close()
    assert stats.started == 0
    assert dict(stats.refused) == {"the last layer": 1, "the subset's modules are not of the layer its event names": 1}


def test_a_model_class_with_its_own_pre_quantize_is_left_to_gptqmodel(on_cpu):
    from gptqmodel.models.base import BaseQModel

    own = type("OwnPreQuantize", (BaseQModel,), {"pre_quantize": lambda self, module: module})
    ahead, stats = _ahead(_stack(), gptq_cls=own)
    ahead.after_last_forward(0, ["model.layers.0"])
    ahead.close()
    assert dict(stats.refused) == {"the model's class has its own pre_quantize": 1}


def test_a_gptqmodel_with_another_subset_event_dispatch_keeps_the_part_stock(monkeypatch):
    from gptqmodel.looper.module_looper import ModuleLooper

    from defuser_quant.integrations.gptqmodel.overhead import internals_mismatch

    assert "layer_ahead" not in internals_mismatch()

    def other(self, stage, layer_idx):  # a GPTQModel whose events carry other fields
        return None

    monkeypatch.setattr(ModuleLooper, "_subset_event_dispatch", other)
    assert "expected ModuleLooper._subset_event_dispatch(" in internals_mismatch()["layer_ahead"]


def test_a_check_that_raises_refuses_the_layer_instead_of_failing_gptqmodels_event(on_cpu, monkeypatch):
    ahead, stats = _ahead(_stack())

    def broken(layer):
        raise TypeError("an odd module")

    monkeypatch.setattr(ahead, "holds_experts", broken)
    ahead.after_last_forward(0, ["model.layers.0"])  # does not raise
    ahead.close()
    assert stats.started == 0 and dict(stats.refused) == {"the next layer could not be checked (TypeError)": 1}


def test_ctrl_c_while_waiting_for_a_load_still_leaves_it_to_close(on_cpu, monkeypatch):
    ahead, stats = _ahead(_stack())
    release = threading.Event()
    finished = []

    def slow_load(layer, device):
        release.wait(5)
        finished.append(layer)

    monkeypatch.setattr(ahead, "_load", slow_load)
    ahead.after_last_forward(0, ["model.layers.0"])
    layer = ahead._layers[0][1]
    future = ahead.pending[id(layer)][1]
    monkeypatch.setattr(future, "result", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        ahead._wait(layer)  # GPTQModel's main thread, interrupted while it waits
    assert id(layer) in ahead.pending  # not forgotten
    monkeypatch.undo()  # the future's own result() again
    release.set()
    ahead.close()  # waits for the load before the block's patches would go
    assert finished == [layer] and stats.started == 1
