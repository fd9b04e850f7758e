"""The staged layer offload (integrations.gptqmodel.layer_offload): the same CPU tensors as
``module.to("cpu")``, through staging buffers small enough to split tensors and batches; nothing
changed when it fails part way; GPTQModel's post_quantize routed to it only for our layers on CUDA."""

from __future__ import annotations

import threading
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from defuser_quant.integrations.gptqmodel import layer_offload
from defuser_quant.integrations.gptqmodel.layer_offload import (
    OffloadStats,
    StagedCopies,
    Staging,
    lean_post_quantize,
    staged_to_cpu,
)

pytestmark = pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor.*deprecated:UserWarning")


class _Layer(nn.Module):
    def __init__(self, device: str = "cpu"):
        super().__init__()
        self.proj = nn.Linear(24, 40, bias=True, device=device)
        self.tied = nn.Linear(24, 40, bias=False, device=device)
        self.tied.weight = self.proj.weight  # one Parameter in two modules
        self.half = nn.Linear(8, 3, device=device, dtype=torch.bfloat16)
        self.register_buffer("mask", torch.tensor([True, False, True], device=device))
        self.register_buffer("scalar", torch.tensor(3.5, device=device))
        self.register_buffer("empty", torch.empty(0, 5, device=device))
        self.register_buffer("steps", torch.arange(7, dtype=torch.int64, device=device))
        self.transposed = nn.Parameter(torch.randn(6, 4, device=device).t())  # not contiguous
        if device == "cpu":  # a quantized dtype has no byte view: left to Tensor.to
            self.register_buffer("qint", torch.quantize_per_tensor(torch.ones(3), 0.5, 0, torch.qint8))
        self.proj.weight.grad = torch.randn(40, 24, device=device)


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    out = {f"p:{k}": v for k, v in module.named_parameters(remove_duplicate=False)}
    out.update({f"b:{k}": v for k, v in module.named_buffers()})
    out["grad"] = module.proj.weight.grad
    return out


def _everything_but_transposed(t: torch.Tensor) -> bool:
    return not t.is_quantized and (t.dim() != 2 or t.shape != (4, 6))


def _interrupt_second_call(monkeypatch, name: str) -> None:
    """``layer_offload.<name>`` raises KeyboardInterrupt (a Ctrl-C) on its second call."""
    calls = []
    real = getattr(layer_offload, name)

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(layer_offload, name, failing)


def test_staged_copies_equal_the_originals_and_keep_parameters_and_ties():
    torch.manual_seed(0)
    layer = _Layer()
    before = {k: (v, v.detach().clone(), v.data_ptr()) for k, v in _state(layer).items()}
    params = {k: v for k, v in layer.named_parameters(remove_duplicate=False)}
    # 100-byte buffers: the 3.8 KB weight spans many batches, small tensors share one
    staged, nbytes, left = staged_to_cpu(layer, Staging(nbytes=100, pin=False), select=_everything_but_transposed)
    after = _state(layer)
    assert left == 0 and staged == len({id(v) for k, (v, _, _) in before.items() if "transposed" not in k and k != "b:qint"})
    # selected but not stageable (quantized): Tensor.to; CPU to CPU that is the tensor itself
    assert staged_to_cpu(_Layer(), Staging(nbytes=100, pin=False), select=lambda t: t.is_quantized) == (0, 0, 1)
    assert nbytes == sum(v.numel() * v.element_size() for k, (v, _, _) in before.items()
                         if "transposed" not in k and k not in ("p:tied.weight", "b:qint"))
    for key, (orig, values, ptr) in before.items():
        now = after[key]
        assert now.dtype == values.dtype and now.shape == values.shape and torch.equal(now, values), key
        if "transposed" in key or key == "b:qint":
            assert now.data_ptr() == ptr  # not selected: untouched
        elif values.numel():
            assert now.data_ptr() != ptr and now.is_contiguous(), key  # a fresh copy
    for key, p in layer.named_parameters(remove_duplicate=False):
        assert p is params[key] and isinstance(p, nn.Parameter)  # same Parameter objects, as Module.to
    assert layer.tied.weight is layer.proj.weight


@pytest.mark.parametrize("step", ["_drain", "_upload"])
def test_a_failure_part_way_leaves_the_layer_as_it_was(monkeypatch, step):
    from defuser_quant.integrations.gptqmodel.layer_offload import stage_uploads

    layer = _Layer()
    ptrs = {k: v.data_ptr() for k, v in _state(layer).items()}
    _interrupt_second_call(monkeypatch, step)  # a Ctrl-C part way through the offload or the upload
    staging = Staging(nbytes=64, pin=False)
    with pytest.raises(KeyboardInterrupt):
        if step == "_drain":
            staged_to_cpu(layer, staging, select=lambda t: True)
        else:
            stage_uploads(layer, staging, "cpu", select=lambda t: True)
    assert {k: v.data_ptr() for k, v in _state(layer).items()} == ptrs and not staging.lock.locked()


def test_post_quantize_stages_only_our_layers_of_our_model_on_cuda(monkeypatch):
    from gptqmodel.utils import model as model_utils

    calls, staged = [], []

    def original(self, module):
        calls.append(module)
        return module

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model_utils, "get_device", lambda m: torch.device("cuda", 0))
    monkeypatch.setattr(layer_offload, "stage_copies", lambda m, staging: staged.append(m) or StagedCopies({}, set(), 3, 30, 1))
    model = SimpleNamespace(quantize_config=SimpleNamespace(activation_mode=None))
    other = SimpleNamespace(quantize_config=model.quantize_config)
    ours, plain, shell = _Layer(), _Layer(), _Layer()
    shell.register_buffer("unloaded", torch.empty(2, device="meta"))  # GPTQModel's move_to restores those
    stats = OffloadStats()
    post = lean_post_quantize(original, model, lambda m: m is not plain, Staging(pin=False), stats, threading.Lock())
    assert post(other, ours) is ours and post(model, plain) is plain  # another model; a layer without our experts
    assert post(model, shell) is shell
    assert post(model, ours) is ours and staged == [ours]
    assert (stats.layers, stats.tensors, stats.bytes, stats.left_to_to) == (1, 3, 30, 1)
    model.quantize_config.activation_mode = "w4afp8"  # GPTQModel's own pinned bounce
    assert post(model, ours) is ours
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model.quantize_config.activation_mode = None
    assert post(model, ours) is ours
    assert calls == [ours, plain, shell, ours, ours] and stats.stock == 5 and staged == [ours]


def _twins(device: str) -> tuple[_Layer, _Layer, dict[str, nn.Parameter]]:
    """Two equal layers on ``device`` with a 1.5 MiB weight (split over 1 MiB staging buffers), no
    quantized buffer (CUDA has none), and the second one's Parameters by name."""
    torch.manual_seed(0)
    reference, layer = _Layer(device), _Layer(device)
    layer.load_state_dict(reference.state_dict())
    layer.proj.weight.grad = reference.proj.weight.grad.clone()
    reference.big = nn.Linear(1024, 768, device=device, dtype=torch.bfloat16)
    layer.big = nn.Linear(1024, 768, device=device, dtype=torch.bfloat16)
    layer.big.load_state_dict(reference.big.state_dict())
    for twin in (reference, layer):
        twin._buffers.pop("qint", None)
    return reference, layer, dict(layer.named_parameters(remove_duplicate=False))


def _assert_moved_like(reference: nn.Module, layer: nn.Module, params: dict[str, nn.Parameter], device_type: str) -> None:
    """``layer`` holds what ``reference.to(device)`` holds, in the same Parameter objects and ties."""
    ref, got = _state(reference), _state(layer)
    for key in ref:
        assert got[key].device.type == device_type and got[key].stride() == ref[key].stride(), key
        assert got[key].dtype == ref[key].dtype and torch.equal(got[key], ref[key]), key
    assert all(p is params[k] for k, p in layer.named_parameters(remove_duplicate=False))
    assert layer.tied.weight is layer.proj.weight


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_layer_moves_like_module_to():
    reference, layer, params = _twins("cuda")
    reference.to("cpu")
    staged, nbytes, left = staged_to_cpu(layer, Staging(nbytes=1 << 20))
    assert left == 1  # the transposed parameter went through Tensor.to
    _assert_moved_like(reference, layer, params, "cpu")


def test_a_staged_move_that_raises_leaves_the_layer_to_gptqmodel(monkeypatch, caplog):
    from gptqmodel.utils import model as model_utils

    calls = []

    def original(self, module):
        calls.append(module)
        return module

    def no_pinned_memory(module, staging):
        raise RuntimeError("CUDA error: out of memory (pinned)")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model_utils, "get_device", lambda m: torch.device("cuda", 0))
    monkeypatch.setattr(layer_offload, "stage_copies", no_pinned_memory)
    model = SimpleNamespace(quantize_config=SimpleNamespace(activation_mode=None))
    layer, stats = _Layer(), OffloadStats()
    post = lean_post_quantize(original, model, lambda m: True, Staging(pin=False), stats, threading.Lock())
    with caplog.at_level("WARNING"):
        assert post(model, layer) is layer and post(model, layer) is layer
    assert calls == [layer, layer] and (stats.failed, stats.stock, stats.layers) == (2, 2, 0)
    warned = [r.getMessage() for r in caplog.records if "staged layer offload failed" in r.getMessage()]
    assert len(warned) == 1 and "out of memory" in warned[0]  # said once, not per layer


# ----- the other way: pre_quantize's move of layer 0 to the GPU (layer_onload) ---------------------
def test_staged_uploads_equal_the_originals_and_keep_parameters_and_ties():
    from defuser_quant.integrations.gptqmodel.layer_offload import stage_uploads, swap_in

    torch.manual_seed(0)
    layer = _Layer()
    before = {k: (v.detach().clone(), v.data_ptr()) for k, v in _state(layer).items()}
    params = dict(layer.named_parameters(remove_duplicate=False))
    # on the CPU the target is the CPU: every selected tensor copied through 100-byte buffers
    staged = stage_uploads(layer, Staging(nbytes=100, pin=False), "cpu", select=_everything_but_transposed)
    assert {k: v.data_ptr() for k, v in _state(layer).items()} == {k: p for k, (_, p) in before.items()}  # unchanged yet
    swap_in(layer, staged, "cpu")
    assert staged.left == 0 and staged.nbytes == sum(
        v.numel() * v.element_size() for k, (v, _) in before.items() if "transposed" not in k and k not in ("p:tied.weight", "b:qint"))
    for key, now in _state(layer).items():
        values, ptr = before[key]
        assert now.dtype == values.dtype and now.shape == values.shape and torch.equal(now, values), key
        if "transposed" in key or key == "b:qint":
            assert now.data_ptr() == ptr
        elif values.numel():
            assert now.data_ptr() != ptr and now.is_contiguous(), key
    assert all(p is params[k] for k, p in layer.named_parameters(remove_duplicate=False))
    assert layer.tied.weight is layer.proj.weight


def test_pre_quantize_stages_only_cpu_layers_of_ours_going_to_cuda(monkeypatch):
    from gptqmodel.utils import model as model_utils

    from defuser_quant.integrations.gptqmodel.layer_offload import lean_pre_quantize

    calls, staged = [], []

    def original(self, module):
        calls.append(module)
        return module

    where = {"device": torch.device("cpu")}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(model_utils, "get_device", lambda m: where["device"])
    monkeypatch.setattr(layer_offload, "stage_uploads", lambda m, staging, device: staged.append((m, device)) or StagedCopies({}, set(), 3, 30, 1))
    model = SimpleNamespace(quantize_config=SimpleNamespace(device=torch.device("cuda", 0)))
    other = SimpleNamespace(quantize_config=model.quantize_config)
    ours, plain, shell = _Layer(), _Layer(), _Layer()
    shell.register_buffer("unloaded", torch.empty(2, device="meta"))  # GPTQModel materializes those
    stats = OffloadStats()
    pre = lean_pre_quantize(original, model, lambda m: m is not plain, Staging(pin=False), stats, threading.Lock())
    assert pre(other, ours) is ours and pre(model, plain) is plain and pre(model, shell) is shell
    assert pre(model, ours) is ours and staged == [(ours, torch.device("cuda", 0))]
    assert (stats.layers, stats.tensors, stats.bytes, stats.left_to_to) == (1, 3, 30, 1)
    where["device"] = torch.device("cuda", 0)  # already there
    assert pre(model, ours) is ours
    where["device"] = torch.device("cpu")
    model.quantize_config.device = torch.device("cpu")  # GPTQModel does not move it
    assert pre(model, ours) is ours
    model.quantize_config.device = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pre(model, ours) is ours
    assert calls == [ours, plain, shell, ours, ours, ours] and stats.stock == 6 and len(staged) == 1


def test_a_staged_upload_that_raises_leaves_the_layer_to_gptqmodel(monkeypatch, caplog):
    from defuser_quant.integrations.gptqmodel.layer_offload import lean_pre_quantize

    calls = []

    def original(self, module):
        calls.append(module)
        return module

    def no_pinned_memory(module, staging, device):
        raise RuntimeError("CUDA error: out of memory (pinned)")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(layer_offload, "stage_uploads", no_pinned_memory)
    model = SimpleNamespace(quantize_config=SimpleNamespace(device=torch.device("cuda", 0)))
    stats = OffloadStats()
    layer = _Layer()
    pre = lean_pre_quantize(original, model, lambda m: True, Staging(pin=False), stats, threading.Lock())
    with caplog.at_level("WARNING"):
        assert pre(model, layer) is layer and pre(model, layer) is layer
    assert calls == [layer, layer] and (stats.stock, stats.failed, stats.layers) == (2, 2, 0)
    assert sum("staged layer upload failed" in r.message for r in caplog.records) == 1  # said once


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_upload_moves_like_module_to():
    from defuser_quant.integrations.gptqmodel.layer_offload import stage_uploads, swap_in

    reference, layer, params = _twins("cpu")
    reference.to("cuda")
    staged = stage_uploads(layer, Staging(nbytes=1 << 20), torch.device("cuda"))
    swap_in(layer, staged, torch.device("cuda"))
    assert staged.left == 1  # the transposed parameter went through Tensor.to
    _assert_moved_like(reference, layer, params, "cuda")


def test_the_benchmark_refuses_an_unknown_direction_before_anything_else():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import layer_offload as bench

    assert set(bench.DIRECTIONS) == {"to-cpu", "to-gpu"}
    with pytest.raises(SystemExit, match="--directions takes to-cpu, to-gpu, got 'sideways'"):
        bench.main(["--directions", "sideways"])


def test_a_staged_move_puts_the_copies_in_place_and_counts_them():
    from defuser_quant.integrations.gptqmodel.layer_offload import _staged_move, stage_uploads

    layer = _Layer()
    before = {k: (v.detach().clone(), v.data_ptr()) for k, v in _state(layer).items() if k != "b:qint"}
    stats = OffloadStats()
    staging = Staging(nbytes=256, pin=False)
    moved = _staged_move(layer, lambda: stage_uploads(layer, staging, "cpu", select=lambda t: not t.is_quantized),
                         torch.device("cpu"), lambda: pytest.fail("GPTQModel's move ran"), stats, threading.Lock(), "upload")
    assert moved is layer and (stats.layers, stats.stock, stats.failed) == (1, 0, 0) and stats.left_to_to == 1
    for key, (values, ptr) in before.items():
        now = _state(layer)[key]
        assert torch.equal(now, values), key
        if values.numel() and "transposed" not in key:
            assert now.data_ptr() != ptr, key  # the staged copy is what the layer holds now
