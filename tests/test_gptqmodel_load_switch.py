"""The ``load_switch`` lean part (integrations.gptqmodel.load_switch): while a layer holding our experts loads, the
interpreter's switch interval is the shorter one, put back when the last load ends (also on an error or Ctrl-C);
other loads are GPTQModel's own. A real GPTQModel 7.6 run on the tiny qwen3_moe loads its layers with the shorter
interval and gives the checkpoint of the run without the part."""

from __future__ import annotations

import functools
import sys
import threading

import pytest
from torch import nn

from defuser_quant.integrations.gptqmodel.load_switch import LOAD_SWITCH_INTERVAL, LoadSwitch


@pytest.fixture
def interval():
    before = sys.getswitchinterval()
    sys.setswitchinterval(0.004)
    yield 0.004
    sys.setswitchinterval(before)


def _us(seconds: float) -> int:
    return round(seconds * 1e6)


def test_the_interval_is_shorter_inside_and_put_back_after(interval):
    switch = LoadSwitch()
    with switch.during_load():
        assert _us(sys.getswitchinterval()) == _us(LOAD_SWITCH_INTERVAL) == 500
    assert _us(sys.getswitchinterval()) == _us(interval)
    assert switch.stats.as_dict() | {"load_seconds": 0} == {"loads": 1, "load_seconds": 0, "interval_us": 500,
                                                            "restored_us": 4000}


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_a_load_that_raises_puts_the_interval_back(interval, error):
    switch = LoadSwitch(interval=0.0002)
    with pytest.raises(error):
        with switch.during_load():
            assert _us(sys.getswitchinterval()) == 200
            raise error
    assert _us(sys.getswitchinterval()) == _us(interval) and switch.stats.loads == 1


def test_the_last_of_several_loads_at_once_puts_back_what_the_first_found(interval):
    switch = LoadSwitch()
    entered, leave = threading.Event(), threading.Event()

    def other_load() -> None:
        with switch.during_load():
            entered.set()
            leave.wait(5)

    with switch.during_load():
        thread = threading.Thread(target=other_load)
        thread.start()
        assert entered.wait(5)
    assert _us(sys.getswitchinterval()) == 500  # the other load still runs
    leave.set()
    thread.join(5)
    assert _us(sys.getswitchinterval()) == _us(interval) and switch.stats.loads == 2


def test_a_bad_interval_is_refused_by_name():
    with pytest.raises(ValueError, match="load_switch: the switch interval must be > 0 seconds"):
        LoadSwitch(interval=0)


def test_only_whole_layers_of_the_model_holding_experts_load_with_the_shorter_interval(interval):
    switch = LoadSwitch()
    model, other = nn.Module(), nn.Module()
    layer, plain = nn.Sequential(nn.Linear(2, 2)), nn.Sequential(nn.Linear(2, 2))
    seen: list = []

    def copy(turtle, **kwargs):
        seen.append((kwargs["module_path"], _us(sys.getswitchinterval())))
        return 3

    patched = switch.patch_copy(copy, model, lambda m: m is layer)
    calls = [("layers.0", dict(target_model=model, target_submodule=layer, recurse=True)),
             ("layers.0.mlp", dict(target_model=model, target_submodule=layer, recurse=False)),
             ("layers.1", dict(target_model=model, target_submodule=plain, recurse=True)),
             ("other.0", dict(target_model=other, target_submodule=layer, recurse=True))]
    for path, kwargs in calls:
        assert patched(object(), module_path=path, **kwargs) == 3
    assert seen == [("layers.0", 500), ("layers.0.mlp", 4000), ("layers.1", 4000), ("other.0", 4000)]
    assert switch.stats.loads == 1


# ----- inside GPTQModel's run (tiny qwen3_moe, CPU) ------------------------------------------------
pytest.importorskip("gptqmodel")

from gptqmodel.utils import structure  # noqa: E402

from defuser_quant.integrations.gptqmodel.overhead import DEFAULT_PARTS, OPT_IN  # noqa: E402
from test_gptqmodel_layer_ahead import _run, _same  # noqa: E402
from test_gptqmodel_plugin import plugin, tiny  # noqa: E402, F401  (fixtures)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_the_layers_load_with_the_shorter_interval_and_the_checkpoint_is_the_same(
        plugin, tiny, tmp_path, monkeypatch, interval):  # noqa: F811
    assert "load_switch" in OPT_IN
    _, without = _run(plugin, tiny, tmp_path, "without", parts=DEFAULT_PARTS)
    loads: list = []
    copy = structure.LazyTurtle._copy_checkpoint_tensors_into_submodule

    @functools.wraps(copy)  # GPTQModel's signature, which the internals check reads
    def recording_copy(self, **kwargs):
        if kwargs.get("recurse"):
            loads.append((kwargs.get("module_path"), _us(sys.getswitchinterval())))
        return copy(self, **kwargs)

    monkeypatch.setattr(structure.LazyTurtle, "_copy_checkpoint_tensors_into_submodule", recording_copy)
    stats, tensors = _run(plugin, tiny, tmp_path, "switch", parts=DEFAULT_PARTS | {"load_switch"})
    s = stats.load_switch
    assert stats.disabled == {} and "load_switch" in stats.parts
    assert ("model.layers.0", 500) in loads and ("model.layers.1", 500) in loads
    assert s.loads >= 2 and s.restored_us == 4000 and _us(sys.getswitchinterval()) == 4000
    assert _same(tensors, without)
