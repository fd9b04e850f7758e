"""``integrations.gptqmodel.worker_warmup``: every worker of GPTQModel's pool warms up on an empty task."""

from __future__ import annotations

import threading

import pytest
import torch

pytest.importorskip("gptqmodel")

import gptqmodel  # noqa: E402
from gptqmodel.utils.threadx import DeviceThreadPool, WarmupTask, WarmUpCtx  # noqa: E402

from defuser_quant.integrations.gptqmodel import worker_warmup  # noqa: E402


@pytest.fixture
def pool(monkeypatch):
    """GPTQModel's own pool class with three CPU workers and a warm-up that records who ran it."""
    ran: list[tuple[str, str]] = []
    lock = threading.Lock()

    def warm(device, ctx):
        with lock:
            ran.append((ctx.value, threading.current_thread().name))

    built = DeviceThreadPool(devices=["cpu"], include_cuda=False, include_xpu=False, include_npu=False, include_mps=False,
                             workers={"cpu": 3}, warmups={"cpu": WarmupTask(warm, scope=WarmUpCtx.THREAD_AND_DEVICE)},
                             empty_cache_every_n=0)
    monkeypatch.setattr(gptqmodel, "get_device_thread_pool", lambda: built)
    built.ran = ran
    yield built
    built.shutdown(wait=True)


def test_each_worker_warms_up_once_before_any_real_task(pool):
    assert worker_warmup.internals_refusal() is None
    start = dict(pool._dispatch_rr)
    stats = worker_warmup.warm_workers(cuda=None)
    assert stats.as_dict() == {"workers": {"cpu": 3}}
    pool.wait("cpu")
    threads = {name for ctx, name in pool.ran if ctx == "thread"}
    assert len(threads) == 3 and [ctx for ctx, _ in pool.ran].count("device") == 1  # once per device, once per thread
    assert pool._dispatch_rr == start  # one task per worker: the round robin is where it was
    before = len(pool.ran)
    assert pool.submit("cpu", lambda: 7).result() == 7
    assert len(pool.ran) == before  # a real task no longer waits for a warm-up


def test_workers_of_other_groups_are_left_alone(pool):
    stats = worker_warmup.warm_workers(cuda="cuda:1", families=())  # no such group here: nothing is handed out
    assert stats.as_dict() == {"workers": {}}
    pool.wait("cpu")
    assert pool.ran == []


def test_the_cuda_group_is_the_quantize_devices(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert worker_warmup.cuda_key("cuda:1") == "cuda:1"
    assert worker_warmup.cuda_key(torch.device("cuda", 2)) == "cuda:2"
    assert worker_warmup.cuda_key(None) == "cuda:3" and worker_warmup.cuda_key("cuda") == "cuda:3"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert worker_warmup.cuda_key("cuda:1") is None


def test_a_pool_class_without_the_expected_dispatch_is_refused(monkeypatch):
    from gptqmodel.utils import threadx

    assert worker_warmup.internals_refusal() is None
    monkeypatch.setattr(threadx.DeviceThreadPool, "_pick_worker", None)
    assert "_pick_worker" in worker_warmup.internals_refusal()
