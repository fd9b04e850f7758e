"""The ``solve_warmup`` lean part (integrations.gptqmodel.solve_warmup, opt-in): each CUDA worker of the quantize
device rehearses GPTQModel's steps before a solve's inverse once, on small tensors, while the inputs are captured.
On the CPU the rehearsal itself and its hand-out over GPTQModel's real pool are checked (there is no CUDA group);
the time it saves needs a GPU."""

from __future__ import annotations

import logging
import time

import pytest
import torch

pytest.importorskip("gptqmodel")

import gptqmodel  # noqa: E402
from gptqmodel import QuantizeConfig  # noqa: E402
from gptqmodel.quantization import gar  # noqa: E402
from gptqmodel.quantization.quantizer import Quantizer  # noqa: E402

from defuser_quant.integrations.gptqmodel import overhead, solve_warmup  # noqa: E402
from defuser_quant.integrations.gptqmodel.overhead import DEFAULT_PARTS, OPT_IN, PARTS, internals_mismatch  # noqa: E402
from test_gptqmodel_layer_ahead import _run, _same  # noqa: E402
from test_gptqmodel_plugin import plugin, tiny  # noqa: E402, F401  (fixtures)

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _spy(monkeypatch, owner, name) -> list:
    calls: list = []
    original = getattr(owner, name)

    def spy(*args, **kwargs):
        calls.append(name)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, spy)
    return calls


@pytest.mark.parametrize("ordering", [{}, {"desc_act": True, "act_group_aware": False},
                                      {"desc_act": False, "act_group_aware": False}])
def test_the_rehearsal_runs_gptqmodels_own_steps_and_leaves_the_random_state_alone(monkeypatch, ordering):
    qcfg = QuantizeConfig(bits=4, group_size=128, **ordering)
    found = _spy(monkeypatch, Quantizer, "find_params")
    perms = _spy(monkeypatch, gar, "compute_local_perms")
    state = torch.get_rng_state()
    timings: dict = {}
    solve_warmup.rehearse("cpu", qcfg, timings)
    assert list(timings) == list(solve_warmup.STEPS) and all(t >= 0 for t in timings.values())
    assert found == ["find_params"]  # GPTQModel's quantizer parameters: the kernels its solves use
    assert perms == (["compute_local_perms"] if qcfg.act_group_aware else [])  # GPTQModel's default orders this way
    assert torch.equal(torch.get_rng_state(), state)


def _wait(stats, count: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with stats.lock:
            if stats.done + len(stats.failed) >= count:
                return
        time.sleep(0.01)
    raise AssertionError(f"the workers did not finish their rehearsals: {stats.as_dict()}")


def test_each_worker_of_the_group_gets_one_rehearsal_and_a_failure_only_warns(monkeypatch, caplog):
    qcfg = QuantizeConfig(bits=4, group_size=128)
    workers = len(gptqmodel.get_device_thread_pool()._worker_groups["cpu"])
    seen: list[str] = []
    original = solve_warmup.rehearse

    def counted(device, config, timings=None):
        import threading

        seen.append(threading.current_thread().name)
        return original(device, config, timings)

    monkeypatch.setattr(solve_warmup, "rehearse", counted)
    stats = solve_warmup.rehearse_on_workers("cpu", qcfg)  # the CPU group stands in for a CUDA device's here
    _wait(stats, workers)
    assert stats.workers == workers and stats.done == workers and stats.failed == [] and len(stats.seconds) == workers
    assert len(set(seen)) == workers and all(name.startswith("DPWorker-cpu") for name in seen)  # one per worker
    assert solve_warmup.rehearse_on_workers(None, qcfg).as_dict() == {"workers": 0, "done": 0, "seconds": [], "failed": [],
                                                                      "attention": None}

    def broken(device, config, timings=None):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(solve_warmup, "rehearse", broken)
    with caplog.at_level(logging.WARNING, logger=solve_warmup.__name__):
        stats = solve_warmup.rehearse_on_workers("cpu", qcfg)
        _wait(stats, workers)
    assert stats.done == 0 and stats.failed == ["RuntimeError: no kernel image is available"] * workers
    assert "solve warm-up on cpu failed" in caplog.text
    assert gptqmodel.get_device_thread_pool().submit("cpu", lambda: 42).result(timeout=30) == 42  # the pool goes on


def test_it_is_a_default_part_checked_against_gptqmodels_internals(monkeypatch):
    assert "solve_warmup" in PARTS and "solve_warmup" not in OPT_IN and "solve_warmup" in DEFAULT_PARTS
    assert "solve_warmup" not in internals_mismatch()
    monkeypatch.delattr(gar, "compute_global_perm")
    assert "gar's permutations" in internals_mismatch()["solve_warmup"]


@pytest.mark.slow
def test_in_a_real_run_every_worker_rehearses_before_its_solves_and_the_checkpoint_is_the_same(
        plugin, tiny, tmp_path, monkeypatch):  # noqa: F811
    # the quantize device here is the CPU, which has no CUDA group: the CPU group's workers stand in for it
    monkeypatch.setattr(overhead, "cuda_key", lambda device: "cpu")
    stats, warmed = _run(plugin, tiny, tmp_path, "warm", parts=DEFAULT_PARTS)
    workers = len(gptqmodel.get_device_thread_pool()._worker_groups["cpu"])
    done = stats.solve_warmup.as_dict()
    assert stats.disabled == {} and done["workers"] == workers and done["done"] == workers and done["failed"] == []
    assert done["attention"] is True  # the tiny model's sdpa attention, rehearsed once
    stats_off, stock = _run(plugin, tiny, tmp_path, "stock", parts=DEFAULT_PARTS - {"solve_warmup"})
    assert stats_off.solve_warmup is None
    assert _same(warmed, stock) and any(k.endswith("experts.0.gate_proj.qweight") for k in warmed)


class _Heads:
    """A text config as Transformers' models carry it: heads, key/value heads, head size, attention implementation."""

    def __init__(self, implementation: str | None, heads: int = 4, kv_heads: int = 2, head_dim: int = 16) -> None:
        self._attn_implementation, self.num_attention_heads, self.num_key_value_heads = implementation, heads, kv_heads
        self.head_dim, self.hidden_size = head_dim, heads * head_dim


def test_the_attention_rehearsal_calls_the_registered_function_and_skips_eager(monkeypatch):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    calls: list = []
    original = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def spy(module, query, key, value, mask, **kwargs):
        calls.append((module.num_key_value_groups, tuple(query.shape), tuple(key.shape), query.dtype, mask is not None))
        return original(module, query, key, value, mask, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS._global_mapping, "sdpa", spy)
    state = torch.get_rng_state()
    timings: dict = {}
    assert solve_warmup.rehearse_attention("cpu", _Heads("sdpa"), torch.bfloat16, timings, tokens=8) is True
    assert calls == [(2, (1, 4, 8, 16), (1, 2, 8, 16), torch.bfloat16, False),  # causal, no mask
                     (2, (1, 4, 8, 16), (1, 2, 8, 16), torch.bfloat16, True)]   # the padded batches' boolean mask
    assert list(timings) == list(solve_warmup.ATTENTION_STEPS) and torch.equal(torch.get_rng_state(), state)
    calls.clear()
    assert solve_warmup.rehearse_attention("cpu", _Heads("eager"), torch.float32) is False
    assert solve_warmup.rehearse_attention("cpu", _Heads(None), torch.float32) is False
    assert solve_warmup.rehearse_attention("cpu", _Heads("no_such_kernels"), torch.float32) is False and calls == []
    headless = _Heads("sdpa")
    del headless.num_attention_heads  # a config this does not know how to shape: skipped, not a failure
    assert solve_warmup.rehearse_attention("cpu", headless, torch.float32) is False and calls == []


def test_one_worker_of_the_group_rehearses_the_attention_and_its_failure_only_warns(monkeypatch, caplog):
    qcfg = QuantizeConfig(bits=4, group_size=128)
    workers = len(gptqmodel.get_device_thread_pool()._worker_groups["cpu"])
    seen: list = []
    monkeypatch.setattr(solve_warmup, "rehearse_attention", lambda device, config, dtype: seen.append(dtype) or True)
    stats = solve_warmup.rehearse_on_workers("cpu", qcfg, _Heads("sdpa"), torch.bfloat16)
    _wait(stats, workers)
    assert seen == [torch.bfloat16] and stats.as_dict()["attention"] is True and stats.done == workers
    seen.clear()
    stats = solve_warmup.rehearse_on_workers("cpu", qcfg)  # no model config: the solve steps only
    _wait(stats, workers)
    assert seen == [] and stats.attention is None

    def broken(device, config, dtype):
        raise RuntimeError("no kernel image is available")

    monkeypatch.setattr(solve_warmup, "rehearse_attention", broken)
    with caplog.at_level(logging.WARNING, logger=solve_warmup.__name__):
        stats = solve_warmup.rehearse_on_workers("cpu", qcfg, _Heads("sdpa"), torch.bfloat16)
        _wait(stats, workers)
    assert stats.failed == ["RuntimeError: no kernel image is available"] and stats.done == workers - 1
    assert "solve warm-up on cpu failed" in caplog.text
