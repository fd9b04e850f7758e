"""The ``load_priority`` lean part (integrations.gptqmodel.load_priority): while a layer holding our experts loads,
``block_finalize``'s workers wait before each member (at most ``MAX_WAIT`` each), then go on; the checkpoint is the
one without the part. The gate's own rules are unit-tested; a real GPTQModel 7.6 run on the tiny qwen3_moe shows the
workers pausing during layer 1's load."""

from __future__ import annotations

import functools
import threading
import time

import pytest
from torch import nn

from defuser_quant.integrations.gptqmodel.load_priority import LoadPriority


def _waiter(gate: LoadPriority, done: list) -> threading.Thread:
    def run() -> None:
        gate.pause()
        done.append(time.perf_counter())

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_pause_returns_at_once_when_no_load_holds_the_gate():
    gate = LoadPriority()
    t0 = time.perf_counter()
    gate.pause()
    assert time.perf_counter() - t0 < 0.05 and gate.stats.pauses == 0


def test_a_pause_waits_for_the_last_of_the_loads_holding_the_gate():
    gate = LoadPriority()
    done: list = []
    with gate.during_load():
        with gate.during_load():  # two loads at once (a load ahead beside the main thread's)
            waiter = _waiter(gate, done)
            time.sleep(0.15)
        time.sleep(0.15)
        assert done == []  # still held by the first load
        released = time.perf_counter()
    waiter.join(5)
    assert done and done[0] >= released
    s = gate.stats
    assert s.loads == 2 and s.pauses == 1 and s.paused_seconds >= 0.25 and s.timeouts == 0 and s.load_seconds > 0.3


def test_a_load_that_goes_on_lets_the_waiters_go_after_max_wait():
    gate = LoadPriority(max_wait=0.1)
    done: list = []
    with gate.during_load():
        waiter = _waiter(gate, done)
        waiter.join(5)
        assert done  # left before the load ended
    assert gate.stats.timeouts == 1 and gate.stats.as_dict()["timeouts"] == 1


def test_the_gate_opens_when_the_load_raises():
    gate = LoadPriority()
    with pytest.raises(KeyboardInterrupt):
        with gate.during_load():
            raise KeyboardInterrupt
    t0 = time.perf_counter()
    gate.pause()
    assert time.perf_counter() - t0 < 0.05 and gate.stats.loads == 1


class _Turtle:
    def __init__(self, gate: LoadPriority) -> None:
        self.gate, self.seen = gate, []

    def copy(self, **kwargs):
        self.seen.append((kwargs["module_path"], not self.gate._open.is_set()))
        return 3


def test_only_whole_layers_of_the_model_holding_experts_hold_the_gate():
    gate = LoadPriority()
    model, other = nn.Module(), nn.Module()
    layer, plain = nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2))
    turtle = _Turtle(gate)
    copy = gate.patch_copy(_Turtle.copy, model, lambda m: m is layer)
    calls = [("layers.0", dict(target_model=model, target_submodule=layer, recurse=True)),
             ("layers.0.mlp", dict(target_model=model, target_submodule=layer, recurse=False)),
             ("layers.1", dict(target_model=model, target_submodule=plain, recurse=True)),
             ("other.0", dict(target_model=other, target_submodule=layer, recurse=True))]
    for path, kwargs in calls:
        assert copy(turtle, module_path=path, **kwargs) == 3
    assert turtle.seen == [("layers.0", True), ("layers.0.mlp", False), ("layers.1", False), ("other.0", False)]
    assert gate.stats.loads == 1


# ----- inside GPTQModel's run (tiny qwen3_moe, CPU) ------------------------------------------------
pytest.importorskip("gptqmodel")

from gptqmodel.utils import structure  # noqa: E402

from defuser_quant.integrations.gptqmodel import block_finalize as bf  # noqa: E402
from defuser_quant.integrations.gptqmodel.overhead import DEFAULT_PARTS, OPT_IN  # noqa: E402
from test_gptqmodel_layer_ahead import _run, _same  # noqa: E402
from test_gptqmodel_plugin import plugin, tiny  # noqa: E402, F401  (fixtures)

PART = DEFAULT_PARTS | {"block_finalize"}


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_finalizes_pause_during_the_next_layers_load_and_the_checkpoint_is_the_same(
        plugin, tiny, tmp_path, monkeypatch):  # noqa: F811
    assert "load_priority" in OPT_IN
    _, without = _run(plugin, tiny, tmp_path, "without", parts=PART)
    # Make the overlap certain: layer 0's members wait until layer 1's load has begun, and that load lasts 0.4 s.
    loading = threading.Event()
    copy = structure.LazyTurtle._copy_checkpoint_tensors_into_submodule

    @functools.wraps(copy)  # GPTQModel's signature, which the internals check reads
    def slow_copy(self, **kwargs):
        if kwargs.get("module_path") == "model.layers.1" and kwargs.get("recurse"):
            loading.set()
            time.sleep(0.4)
        return copy(self, **kwargs)

    members = bf._Finalizer._finalize_members

    def after_the_load_begins(self, *args, **kwargs):
        loading.wait(10)
        return members(self, *args, **kwargs)

    monkeypatch.setattr(structure.LazyTurtle, "_copy_checkpoint_tensors_into_submodule", slow_copy)
    monkeypatch.setattr(bf._Finalizer, "_finalize_members", after_the_load_begins)
    stats, tensors = _run(plugin, tiny, tmp_path, "priority", parts=PART | {"load_priority"})
    p = stats.load_priority
    assert stats.disabled == {} and "load_priority" in stats.parts
    assert p.loads >= 2  # layer 0 (the capture's load) and layer 1
    assert p.pauses > 0 and p.paused_seconds > 0.1 and p.timeouts == 0
    assert stats.block_finalize.mismatched == 0 and stats.block_finalize.batched > 0
    assert _same(tensors, without)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_without_block_finalize_the_part_is_refused_by_name(plugin, tiny, tmp_path):  # noqa: F811
    stats, _ = _run(plugin, tiny, tmp_path, "alone", parts=DEFAULT_PARTS | {"load_priority"})
    assert stats.disabled["load_priority"] == "needs the block_finalize part" and stats.load_priority is None
