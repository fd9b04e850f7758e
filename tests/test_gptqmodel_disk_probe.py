"""The ``disk_probe`` lean part (integrations.gptqmodel.disk_probe): GPTQModel's disk write-speed probe runs on a
background thread instead of inside ``ModuleLooper.__init__``; its figure is logged when it ends; the block's end
waits for it (also on Ctrl-C); a probe measured earlier in the process is left alone; a failing probe is logged and
the run goes on; the part refuses internals that do not match."""

from __future__ import annotations

import functools
import threading
import time

import pytest

pytest.importorskip("gptqmodel")

from gptqmodel.looper import module_looper  # noqa: E402

from defuser_quant.integrations.gptqmodel import disk_probe  # noqa: E402
from test_gptqmodel_layer_ahead import _run, _same  # noqa: E402
from test_gptqmodel_plugin import plugin, tiny  # noqa: E402, F401  (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

THREAD = "defuser-quant-disk-probe"


@pytest.fixture
def slow_disk(monkeypatch):
    """No figure measured yet in this process, and a probe that takes ``state["delay"]`` seconds, records the
    thread it ran on and measures ``state["mb"]`` MB/s (``state["error"]``: raised instead)."""
    state = {"delay": 0.3, "mb": 150.0, "error": None, "threads": []}

    def estimate():
        state["threads"].append(threading.current_thread().name)
        time.sleep(state["delay"])
        if state["error"] is not None:
            raise state["error"]
        return state["mb"] * 1024 * 1024

    monkeypatch.setattr(module_looper, "_IO_WRITE_SPEED_MB", None)
    monkeypatch.setattr(module_looper, "estimate_disk_io_speed", estimate)
    return state


def test_the_probe_runs_on_its_thread_and_its_figure_is_logged_when_it_ends(slow_disk, caplog):
    original = module_looper.io_write_performance
    assert disk_probe.internals_refusal() is None
    with caplog.at_level("INFO", logger=disk_probe.__name__):
        with disk_probe.probe_behind() as stats:
            assert module_looper.io_write_performance() is None  # what the looper sees while the probe runs
            time.sleep(0.6)
            assert module_looper.io_write_performance() == pytest.approx(150.0)  # ... and once it has ended
    assert slow_disk["threads"] == [THREAD]
    assert module_looper.io_write_performance is original
    assert stats.behind and stats.mb_per_s == pytest.approx(150.0) and stats.seconds >= 0.3 and stats.failed is None
    slow = [r for r in caplog.records if "disk write throughput 150.0 MB/s" in r.getMessage()]
    assert slow and slow[0].levelname == "WARNING"  # under SLOW_MB_S
    assert stats.as_dict()["mb_per_s"] == 150.0


def test_the_end_of_the_block_waits_for_the_probe_also_on_ctrl_c(slow_disk):
    with pytest.raises(KeyboardInterrupt):
        with disk_probe.probe_behind() as stats:
            raise KeyboardInterrupt
    assert not [t for t in threading.enumerate() if t.name == THREAD]  # joined: its temporary file is gone
    assert stats.waited_seconds > 0.1 and module_looper._IO_WRITE_SPEED_MB == pytest.approx(150.0)
    assert module_looper.io_write_performance.__name__ == "io_write_performance"


def test_a_failing_probe_is_logged_and_the_block_goes_on(slow_disk, caplog):
    slow_disk["error"] = RuntimeError("no temporary directory")
    with caplog.at_level("WARNING", logger=disk_probe.__name__):
        with disk_probe.probe_behind() as stats:
            pass
    assert stats.failed == "RuntimeError: no temporary directory" and stats.mb_per_s is None
    assert any("probe failed (RuntimeError: no temporary directory)" in r.getMessage() for r in caplog.records)


def test_a_figure_measured_earlier_in_the_process_is_left_alone(slow_disk, monkeypatch):
    monkeypatch.setattr(module_looper, "_IO_WRITE_SPEED_MB", 900.0)
    original = module_looper.io_write_performance
    with disk_probe.probe_behind() as stats:
        assert module_looper.io_write_performance is original
    assert not stats.behind and stats.mb_per_s == 900.0 and slow_disk["threads"] == []


def test_other_internals_are_refused(monkeypatch):
    monkeypatch.setattr(module_looper.ModuleLooper, "__init__", lambda self: None)
    assert "ModuleLooper.__init__ to call io_write_performance" in disk_probe.internals_refusal()
    monkeypatch.undo()
    monkeypatch.setattr(module_looper, "io_write_performance", lambda size: size)
    assert "io_write_performance() caching _IO_WRITE_SPEED_MB" in disk_probe.internals_refusal()


@pytest.mark.slow
def test_inside_gptqmodels_run_the_looper_does_not_wait_for_the_probe(plugin, tiny, tmp_path, slow_disk,  # noqa: F811
                                                                      monkeypatch):
    from defuser_quant.integrations.gptqmodel.overhead import DEFAULT_PARTS

    # the probe ends only once ModuleLooper.__init__ has returned: a looper that waited for it would hold it
    # (and itself) until the 20 s timeout, and the probe would record that it was never released
    looper_done = threading.Event()
    released = []
    init = module_looper.ModuleLooper.__init__

    @functools.wraps(init)
    def recorded(self, *args, **kwargs):
        init(self, *args, **kwargs)
        looper_done.set()

    monkeypatch.setattr(module_looper.ModuleLooper, "__init__", recorded)
    slow_disk["delay"] = 0.0
    estimate = module_looper.estimate_disk_io_speed

    def held_until_the_looper_is_built():
        released.append(looper_done.wait(20))
        return estimate()

    monkeypatch.setattr(module_looper, "estimate_disk_io_speed", held_until_the_looper_is_built)
    assert "disk_probe" in DEFAULT_PARTS
    stats, lean = _run(plugin, tiny, tmp_path, "probe", parts=DEFAULT_PARTS)
    assert released == [True] and slow_disk["threads"] == [THREAD]
    assert stats.disk_probe.behind and stats.disk_probe.mb_per_s == pytest.approx(150.0)
    assert stats.disabled == {}
    slow_disk["threads"].clear()
    monkeypatch.setattr(module_looper, "estimate_disk_io_speed", estimate)
    module_looper._IO_WRITE_SPEED_MB = None  # the fixture restores it
    without, stock_probe = _run(plugin, tiny, tmp_path, "noprobe", parts=DEFAULT_PARTS - {"disk_probe"})
    assert slow_disk["threads"] == ["MainThread"] and without.disk_probe is None  # GPTQModel's own call
    assert _same(lean, stock_probe)
