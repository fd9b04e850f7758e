"""The ``tail_workers`` lean part (integrations.gptqmodel.tail_workers): when the last decoder layer starts, GPTQModel's
CPU worker group grows, so that layer's finalizes (and only those) spread over the added workers; they stop at the end
(Ctrl-C too) and the checkpoint is the one without the part."""

from __future__ import annotations

import functools
import threading
import time
from types import SimpleNamespace

import pytest
from torch import nn

pytest.importorskip("gptqmodel")

import gptqmodel  # noqa: E402
from gptqmodel.looper.gptq_processor import GPTQProcessor  # noqa: E402
from gptqmodel.models.base import BaseQModel  # noqa: E402
from gptqmodel.utils import threadx  # noqa: E402

from defuser_quant.integrations.gptqmodel import tail_workers  # noqa: E402
from defuser_quant.integrations.gptqmodel.overhead import DEFAULT_PARTS, OPT_IN, internals_mismatch  # noqa: E402
from test_gptqmodel_layer_ahead import _run, _same  # noqa: E402
from test_gptqmodel_plugin import plugin, tiny  # noqa: E402, F401  (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _cpu_group() -> list:
    return gptqmodel.get_device_thread_pool()._worker_groups["cpu"]


@pytest.fixture
def finalizes(monkeypatch):
    """(thread name, layer index) of every GPTQProcessor.submodule_finalize call."""
    original = GPTQProcessor.submodule_finalize
    seen: list[tuple[str, int | None]] = []

    @functools.wraps(original)
    def recorded(self, module, *args, **kwargs):
        seen.append((threading.current_thread().name, getattr(module, "layer_index", None)))
        return original(self, module, *args, **kwargs)

    monkeypatch.setattr(GPTQProcessor, "submodule_finalize", recorded)
    return seen


@pytest.mark.slow
def test_the_last_layers_finalizes_spread_over_added_workers_and_the_checkpoint_is_the_same(
        plugin, tiny, tmp_path, monkeypatch, finalizes):  # noqa: F811
    assert "tail_workers" in OPT_IN
    before = len(_cpu_group())
    monkeypatch.setattr(tail_workers, "cores", lambda: before + 2)
    added = {f"DPWorker-cpu#{i}" for i in (before, before + 1)}
    stats, tail = _run(plugin, tiny, tmp_path, "tail", parts=DEFAULT_PARTS | {"tail_workers"})
    last = max(layer for _, layer in finalizes)
    assert stats.disabled == {} and stats.tail_workers.as_dict() == {"before": before, "added": 2, "retired": 2,
                                                                      "layer": last}
    assert {name for name, layer in finalizes if layer == last} & added  # the last layer's: on the added workers too
    assert not {name for name, layer in finalizes if layer != last} & added  # earlier layers': never
    assert len(_cpu_group()) == before and not {t.name for t in threading.enumerate()} & added
    finalizes.clear()
    stats_off, stock = _run(plugin, tiny, tmp_path, "stock", parts=DEFAULT_PARTS)
    assert stats_off.tail_workers is None and not {name for name, _ in finalizes} & added
    assert _same(tail, stock) and any(k.endswith("experts.0.gate_proj.qweight") for k in tail)


def _model(layers: list[nn.Module]) -> SimpleNamespace:
    return SimpleNamespace(model=nn.Module(), extract_layers_node=lambda: ["layers"], layers=layers)


@pytest.fixture
def stand_in(monkeypatch):
    """GPTQModel's pre_quantize as a stand-in that returns its layer, the last-layer lookup answering from
    ``_model``'s list (the real lookup is exercised by the run above)."""
    def pre_quantize(self, module):
        return module

    monkeypatch.setattr(BaseQModel, "pre_quantize", pre_quantize)
    monkeypatch.setattr(tail_workers._Tail, "_last_layer",
                        lambda self: (setattr(self, "_layer", len(self.gptq_model.layers) - 1),
                                      self.gptq_model.layers[-1])[1])
    return pre_quantize


def test_ctrl_c_retires_the_added_workers_after_their_tasks_and_restores_pre_quantize(stand_in):
    pool = gptqmodel.get_device_thread_pool()
    before = len(_cpu_group())
    layers = [nn.Linear(2, 2), nn.Linear(2, 2)]
    with pytest.raises(KeyboardInterrupt):
        with tail_workers.tail_workers(_model(layers), lambda layer: True, target=before + 2) as stats:
            BaseQModel.pre_quantize(None, layers[0])
            assert len(_cpu_group()) == before and stats.added == 0  # not the last layer
            assert BaseQModel.pre_quantize(None, layers[1]) is layers[1]
            added = _cpu_group()[before:]
            assert len(added) == 2 and stats.as_dict() == {"before": before, "added": 2, "retired": 0, "layer": 1}
            futures = [pool.submit("cpu", time.sleep, 0.02) for _ in range(8)]
            raise KeyboardInterrupt
    assert len(_cpu_group()) == before and stats.retired == 2
    assert not any(worker._thread.is_alive() for worker in added)
    assert all(future.result(timeout=10) is None for future in futures)  # every handed task ran
    assert BaseQModel.pre_quantize is stand_in


def test_a_last_layer_without_experts_or_a_full_group_adds_nothing(stand_in):
    before = len(_cpu_group())
    layers = [nn.Linear(2, 2)]
    with tail_workers.tail_workers(_model(layers), lambda layer: False, target=before + 2) as stats:
        BaseQModel.pre_quantize(None, layers[0])
        assert len(_cpu_group()) == before
    assert stats.as_dict() == {"before": 0, "added": 0, "retired": 0, "layer": None}
    with tail_workers.tail_workers(_model(layers), lambda layer: True, target=before) as stats:
        BaseQModel.pre_quantize(None, layers[0])
        assert len(_cpu_group()) == before
    assert stats.as_dict() == {"before": before, "added": 0, "retired": 0, "layer": 0}


def test_the_default_target_is_the_cores_at_most_max_workers(stand_in, monkeypatch):
    before = len(_cpu_group())
    monkeypatch.setattr(tail_workers, "MAX_WORKERS", before + 1)
    monkeypatch.setattr(tail_workers, "cores", lambda: before + 5)
    layers = [nn.Linear(2, 2)]
    with tail_workers.tail_workers(_model(layers), lambda layer: True) as stats:
        BaseQModel.pre_quantize(None, layers[0])
        assert len(_cpu_group()) == before + 1
    assert stats.added == 1 and stats.retired == 1 and len(_cpu_group()) == before


def test_another_device_pool_keeps_the_part_stock(monkeypatch):
    assert internals_mismatch().get("tail_workers") is None
    monkeypatch.delattr(threadx.DeviceThreadPool, "_spawn_worker")
    assert "_spawn_worker" in internals_mismatch()["tail_workers"]


def test_without_gptqmodels_layer_lookup_both_parts_that_find_layers_stay_stock(monkeypatch):
    """tail_workers and layer_ahead find the decoder layers the same way (layer_ahead.decoder_layers)."""
    from gptqmodel.utils import model as model_utils

    assert {"tail_workers", "layer_ahead"}.isdisjoint(internals_mismatch())
    monkeypatch.delattr(model_utils, "get_layers_with_prefixes")
    problems = internals_mismatch()
    for part in ("tail_workers", "layer_ahead"):
        assert problems[part] == "gptqmodel.utils.model.get_layers_with_prefixes is missing", part
