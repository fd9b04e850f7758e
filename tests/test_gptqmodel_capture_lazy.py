"""The ``capture_lazy`` lean part (integrations.gptqmodel.capture_lazy): GPTQModel's input capture leaves a lazy first
layer holding our experts lazy, and ``pre_quantize`` loads it once, like every other layer. In a real GPTQModel 7.6 run
on the tiny qwen3_moe (CPU: the part acts on any quantize device) layer 0 is loaded after the capture, never during it,
and the checkpoint is the one without the part; anything else is GPTQModel's own call; Ctrl-C restores everything."""

from __future__ import annotations

import functools
import inspect
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("gptqmodel")

from gptqmodel.looper.stage_inputs_capture import StageInputsCapture  # noqa: E402
from gptqmodel.models.base import BaseQModel  # noqa: E402

from defuser_quant.integrations.gptqmodel import capture_lazy  # noqa: E402
from test_gptqmodel_layer_ahead import _run, _same  # noqa: E402
from test_gptqmodel_plugin import plugin, tiny  # noqa: E402, F401  (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture
def layer0_loads(monkeypatch):
    """Every load of ``model.layers.0`` GPTQModel's LazyTurtle makes: (device, made inside the input capture)."""
    from gptqmodel.utils import structure

    original = structure.LazyTurtle._copy_checkpoint_tensors_into_submodule
    seen: list[tuple[str, bool]] = []

    @functools.wraps(original)  # the same signature: the lean parts check it
    def recorded(self, **kwargs):
        if kwargs.get("module_path") == "model.layers.0" and kwargs.get("recurse"):
            capturing = any(frame.function == "cache_inputs" for frame in inspect.stack())
            seen.append((torch.device(kwargs["device"]).type, capturing))
        return original(self, **kwargs)

    monkeypatch.setattr(structure.LazyTurtle, "_copy_checkpoint_tensors_into_submodule", recorded)
    return seen


@pytest.mark.slow
def test_layer_0_is_loaded_once_after_the_capture_and_the_checkpoint_is_the_same(plugin, tiny, tmp_path,  # noqa: F811
                                                                                 layer0_loads):
    from defuser_quant.integrations.gptqmodel.overhead import DEFAULT_PARTS, OPT_IN

    assert "capture_lazy" in OPT_IN
    stats, lazy = _run(plugin, tiny, tmp_path, "lazy", parts=DEFAULT_PARTS | {"capture_lazy"})
    assert stats.disabled == {} and stats.capture_lazy.as_dict() == {"kept_lazy": 1, "stock": {}}
    assert layer0_loads == [("cpu", False)]  # pre_quantize's load: once, after the capture
    layer0_loads.clear()
    stats_off, stock = _run(plugin, tiny, tmp_path, "stock", parts=DEFAULT_PARTS)
    assert stats_off.capture_lazy is None
    assert layer0_loads == [("cpu", True)]  # GPTQModel's own: inside the capture
    assert _same(lazy, stock) and any(k.endswith("layers.0.mlp.experts.0.gate_proj.qweight") for k in lazy)


def _shell(layer: nn.Module, turtle: object) -> SimpleNamespace:
    return SimpleNamespace(turtle_model=turtle, layer=layer)


def _layer(meta: bool) -> nn.Module:
    with torch.device("meta" if meta else "cpu"):
        return nn.Sequential(nn.Linear(4, 4))


def _capture(model: object, holds: bool = True) -> capture_lazy._Capture:
    return capture_lazy._Capture(model, lambda layer: holds, capture_lazy.CaptureLazyStats())


def test_only_the_captures_call_for_its_first_lazy_layer_is_skipped(monkeypatch):
    from gptqmodel.utils.structure import LazyTurtle

    turtle = LazyTurtle.__new__(LazyTurtle)
    calls = []

    def original(self, target_submodule, device, non_blocking=False, role="default", named_module=None, module_path=None):
        calls.append((target_submodule, str(device), role))
        return "materialized"

    layer, other = _layer(meta=True), _layer(meta=True)
    model = _shell(layer, turtle)
    capture = _capture(model)
    materialize = capture.patch_materialize(original)

    def cache_inputs(_stage, layers):
        first = materialize(model, target_submodule=layers[0], device=torch.device("cpu"), module_path="model.layers.0")
        again = materialize(model, target_submodule=layers[0], device=torch.device("cpu"))  # not the capture's one call
        base = materialize(model, target_submodule=other, device=torch.device("cpu"))
        return first, again, base

    first, again, base = capture.patch_cache_inputs(cache_inputs)(None, [layer, other])
    assert first is layer and again == base == "materialized"
    assert capture.stats.as_dict() == {"kept_lazy": 1, "stock": {}}
    assert [(m is layer, d) for m, d, _ in calls] == [(True, "cpu"), (False, "cpu")]
    # outside a capture (pre_quantize's load) the call is GPTQModel's
    assert materialize(model, target_submodule=layer, device=torch.device("cpu")) == "materialized"
    assert capture.local.first is None


@pytest.mark.parametrize(("model_of", "holds", "meta", "why"), [
    (lambda m: m, False, True, "the first layer holds no defused experts"),
    (lambda m: m, True, False, "the first layer is already (partly) materialized"),
    (lambda m: SimpleNamespace(turtle_model=None), True, True, "no lazy checkpoint source"),
])
def test_other_first_layers_are_materialized_as_gptqmodel_does(model_of, holds, meta, why):
    from gptqmodel.utils.structure import LazyTurtle

    layer = _layer(meta)
    model = _shell(layer, LazyTurtle.__new__(LazyTurtle))
    capture = _capture(model, holds)
    target = model_of(model)
    capture.gptq_model = target
    materialize = capture.patch_materialize(lambda self, **kw: "materialized")
    got = capture.patch_cache_inputs(lambda _s, layers: materialize(target, target_submodule=layers[0],
                                                                    device=torch.device("cpu")))(None, [layer])
    assert got == "materialized" and capture.stats.as_dict() == {"kept_lazy": 0, "stock": {why: 1}}


def test_ctrl_c_inside_the_capture_restores_the_patches_and_the_thread_state():
    originals = StageInputsCapture.cache_inputs, BaseQModel.shell_module_materialize
    with pytest.raises(KeyboardInterrupt):
        with capture_lazy.lazy_capture(object(), lambda layer: True):
            patched_cache = StageInputsCapture.cache_inputs
            assert patched_cache is not originals[0] and BaseQModel.shell_module_materialize is not originals[1]
            raise KeyboardInterrupt
    assert (StageInputsCapture.cache_inputs, BaseQModel.shell_module_materialize) == originals

    capture = _capture(object())

    def interrupted(_stage, layers):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        capture.patch_cache_inputs(interrupted)(None, [_layer(meta=True)])
    assert capture.local.first is None


def test_other_internals_are_refused(monkeypatch):
    from defuser_quant.integrations.gptqmodel import overhead

    assert capture_lazy.internals_refusal() is None
    monkeypatch.setattr(capture_lazy, "CACHE_INPUTS_DIGEST", "0" * 16)
    assert capture_lazy.internals_refusal() == "StageInputsCapture.cache_inputs differs from GPTQModel 7.6.0's source"
    assert "cache_inputs differs" in overhead.internals_mismatch()["capture_lazy"]


def test_a_device_torch_cannot_read_is_gptqmodels_call():
    from gptqmodel.utils.structure import LazyTurtle

    layer = _layer(meta=True)
    model = _shell(layer, LazyTurtle.__new__(LazyTurtle))
    capture = _capture(model)
    materialize = capture.patch_materialize(lambda self, **kw: ("materialized", kw["device"]))
    got = capture.patch_cache_inputs(lambda _s, layers: materialize(model, target_submodule=layers[0],
                                                                    device=object()))(None, [layer])
    assert got[0] == "materialized" and capture.stats.as_dict() == {"kept_lazy": 0, "stock": {}}
