"""Batched GPTQ solves inside GPTQModel (integrations.gptqmodel.batched), against GPTQModel 7.6's
own per-module ``GPTQ.quantize`` (CPU, real GPTQModel)."""

from __future__ import annotations

import contextlib
import copy
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from test_gptqmodel_plugin import _tensors, plugin, tiny  # noqa: F401  (fixtures)
from torch import nn

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def _tasks(qcfg, n: int = 4, rows: int = 64, cols: int = 256, seed: int = 0, bad: int | None = None):
    """``n`` GPTQModel GPTQ tasks on random bf16 Linears with a dead input column each."""
    from gptqmodel.quantization.gptq import GPTQ

    g = torch.Generator().manual_seed(seed)
    tasks = []
    for i in range(n):
        linear = nn.Linear(cols, rows, bias=False).to(torch.bfloat16)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(rows, cols, generator=g))
        task = GPTQ(linear, copy.deepcopy(qcfg))
        task.quantizer.configure(perchannel=True)
        x = torch.randn(96, cols, generator=g).to(torch.bfloat16)
        x[:, 3] = 0  # a dead column: GPTQ zeroes it
        task.add_batch(x, None)
        if i == bad:  # a Hessian no damp fixes at the first attempt: GPTQModel's recovery must run
            task.finalize_hessian()
            task.H.diagonal().mul_(-1)
        tasks.append(task)
    return tasks


CONFIGS = {
    "default (act_group_aware)": {},
    "natural order": {"act_group_aware": False},
    "desc_act": {"desc_act": True, "act_group_aware": False},
    "asym": {"sym": False},
    "group 32": {"group_size": 32},
    "group 256 (two blocks a group)": {"group_size": 256},
    "per channel": {"group_size": -1, "act_group_aware": False},
    "3 bit mse": {"bits": 3, "mse": 2.0, "act_group_aware": False},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_solve_equals_gptqmodels_per_module_solve(name):
    from gptqmodel import QuantizeConfig

    from defuser_quant.integrations.gptqmodel.batched import batched_gptq_solve, why_not_batched

    kw = dict(CONFIGS[name])
    qcfg = QuantizeConfig(bits=kw.pop("bits", 4), group_size=kw.pop("group_size", 128), **kw)
    reference, batched = _tasks(qcfg), _tasks(qcfg)
    assert all(why_not_batched(t) is None for t in batched)
    expected = [t.quantize() for t in reference]
    got = batched_gptq_solve(batched)
    for e, r in zip(expected, got, strict=True):
        assert r is not None and r.path == "batched_torch@cpu"
        q, scale, zero, g_idx, _, loss, damp, nsamples = r.values
        for want, have in zip(e[:4], (q, scale, zero, g_idx), strict=True):
            assert want.dtype == have.dtype and want.shape == have.shape and torch.equal(want, have)
        assert (loss, damp, nsamples) == (e[5], e[6], e[7])


@pytest.mark.parametrize("name", ["default (act_group_aware)", "desc_act", "per channel"])
def test_host_results_are_the_same_values_moved_once_per_dtype(name):
    from gptqmodel import QuantizeConfig

    from defuser_quant.integrations.gptqmodel.batched import batched_gptq_solve

    kw = dict(CONFIGS[name])
    qcfg = QuantizeConfig(bits=4, group_size=kw.pop("group_size", 128), **kw)
    on_device, on_host = batched_gptq_solve(_tasks(qcfg)), batched_gptq_solve(_tasks(qcfg), host_results=True)
    storages = {}
    for d, h in zip(on_device, on_host, strict=True):
        for k, (want, have) in enumerate(zip(d.values[:4], h.values[:4], strict=True)):
            assert have.device.type == "cpu" and want.dtype == have.dtype and torch.equal(want, have)
            if k:  # scales, zeros, g_idx: views of one host copy per dtype, not a copy each
                assert have.is_contiguous()
                storages.setdefault(have.dtype, set()).add(have.untyped_storage().data_ptr())
        assert d.values[5:] == h.values[5:]  # loss, damp, samples (values[4] is the solve's duration)
    assert {dtype: len(ptrs) for dtype, ptrs in storages.items()} == {torch.float32: 1, torch.int32: 1}


def _spy_linalg(monkeypatch):
    """Record every Cholesky-family call and every Tensor.matmul: op, input shape/strides/values."""
    calls: list[tuple] = []
    real = {"cholesky_ex": torch.linalg.cholesky_ex, "cholesky": torch.linalg.cholesky,
            "cholesky_inverse": torch.cholesky_inverse}
    matmul = torch.Tensor.matmul

    def spy(name):
        def call(a, *args, **kwargs):
            op = "cholesky_upper" if kwargs.get("upper") else ("cholesky" if name.startswith("cholesky") and
                                                                name != "cholesky_inverse" else name)
            out = kwargs.get("out")
            calls.append((op, tuple(a.shape), a.stride(), out is a if out is not None else None, a.detach().clone()))
            return real[name](a, *args, **kwargs)
        return call

    def spy_matmul(a, b):
        calls.append(("matmul", (tuple(a.shape), tuple(b.shape)), (a.stride(), b.stride()), None, None))
        return matmul(a, b)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", spy("cholesky_ex"))
    monkeypatch.setattr(torch.linalg, "cholesky", spy("cholesky"))
    monkeypatch.setattr(torch, "cholesky_inverse", spy("cholesky_inverse"))
    monkeypatch.setattr(torch.Tensor, "matmul", spy_matmul)
    return calls


@pytest.mark.parametrize("name", ["default (act_group_aware)", "natural order", "desc_act"])
def test_batched_solve_makes_gptqmodels_linear_algebra_calls(name, monkeypatch):
    """The calls whose kernels differ between one matrix and a batch on CUDA (cuSOLVER/MAGMA
    Cholesky, cholesky_inverse; cuBLAS matmul) are GPTQModel's own: same op, 2-D shape, strides,
    in-place use and bit-identical input, Hessian by Hessian in GPTQModel's order."""
    from gptqmodel import QuantizeConfig

    from defuser_quant.integrations.gptqmodel.batched import batched_gptq_solve

    kw = dict(CONFIGS[name])
    qcfg = QuantizeConfig(**{"bits": 4, "group_size": 128, **kw})
    reference, batched = _tasks(qcfg), _tasks(qcfg)
    for task in batched:
        task.finalize_hessian()
    calls = _spy_linalg(monkeypatch)
    for task in reference:
        task.quantize()
    expected, calls[:] = list(calls), []
    batched_gptq_solve(batched)
    got = list(calls)

    def linalg(seq):
        return [c for c in seq if c[0] != "matmul"]

    def matmuls(seq):
        # GPTQModel also multiplies into the empty column tail after the last block (no arithmetic)
        return sorted(repr(c[:3]) for c in seq if c[0] == "matmul" and 0 not in c[1][1])

    want, have = linalg(expected), linalg(got)
    assert [c[:4] for c in have] == [c[:4] for c in want] and len(want) == 3 * len(reference)
    assert all(torch.equal(a[4], b[4]) for a, b in zip(want, have, strict=True))
    assert matmuls(got) == matmuls(expected) and matmuls(got)


@pytest.mark.parametrize("name", ["default (act_group_aware)", "desc_act", "natural order"])
def test_inverses_spread_over_threads_are_the_serial_ones_in_order(name, monkeypatch):
    import threading

    from gptqmodel import QuantizeConfig

    from defuser_quant.integrations.gptqmodel import batched as batched_module

    kw = dict(CONFIGS[name])
    qcfg = QuantizeConfig(**{"bits": 4, "group_size": 128, **kw})
    tasks = _tasks(qcfg, n=6)
    for task in tasks:
        task.finalize_hessian()
    ran_on: list[str] = []

    def invert(H):
        ran_on.append(threading.current_thread().name)
        return batched_module._invert_unit(H, qcfg, H.shape[0], 128, 0.05)

    hessians = [t.H for t in tasks]
    serial = batched_module._unit_inverses(hessians, invert, threads=1)
    assert all(n == threading.current_thread().name for n in ran_on)
    ran_on.clear()
    spread = batched_module._unit_inverses(hessians, invert, threads=4)
    assert ran_on and all(n.startswith("defuser-quant-hinv") for n in ran_on)
    for a, b in zip(serial, spread, strict=True):
        assert len(a.tensors()) == len(b.tensors()) and all(torch.equal(x, y) for x, y in zip(a.tensors(), b.tensors()))
    assert not [t for t in hessians if not torch.equal(t, t.clone())]  # unchanged inputs (no NaNs either)
    assert [bool(x.dead[3]) for x in spread] == [True] * len(tasks)  # the dead column of _tasks
    # A later solve asking for more threads grows the shared pool; the results stay the same.
    monkeypatch.setattr(batched_module, "_inverse_pool", None)
    small = batched_module._unit_inverses(hessians, invert, threads=2)
    first = batched_module._inverse_pool
    large = batched_module._unit_inverses(hessians, invert, threads=3)
    assert first[1] == 2 and batched_module._inverse_pool[1] == 3 and batched_module._inverse_pool[0] is not first[0]
    for a, b, c in zip(serial, small, large, strict=True):
        assert all(torch.equal(x, y) and torch.equal(x, z) for x, y, z in zip(a.tensors(), b.tensors(), c.tensors()))


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_shared_hessians_are_inverted_once_and_give_the_same_result(device):
    """GPTQModel's shared-input dedup (gate/up of one expert): followers hold copies of the leader's H.
    On CUDA a unit's rows go through the block-update extension in one launch."""
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.gptq import SharedHessianFactorCache

    from defuser_quant.integrations.gptqmodel.batched import _units, batched_gptq_solve

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA (run on the device machine)")
    qcfg = QuantizeConfig(bits=4, group_size=128)
    reference, batched = _tasks(qcfg), _tasks(qcfg)
    if device == "cuda":
        for task in [*reference, *batched]:
            task.module.cuda()
            task.module.target_device = torch.device("cuda")
            task.finalize_hessian(target_device=torch.device("cuda"))
    for tasks in (reference, batched):
        cache = SharedHessianFactorCache(1, "leader", leader="leader")
        for follower in tasks[1:3]:
            follower.adopt_hessian_from(tasks[0])
        for task in tasks[:3]:
            task.attach_shared_hessian_cache(cache)
    for task in batched:
        task.finalize_hessian(**({"target_device": torch.device("cuda")} if device == "cuda" else {}))
    assert [len(u.tasks) for u in _units(batched)] == [3, 1]
    expected = [t.quantize() for t in reference]
    got = batched_gptq_solve(batched, rows_kernel=device == "cuda")  # on CUDA: units of 3 and 1 rows spans
    for e, r in zip(expected, got, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(e[:4], r.values[:4], strict=True))
        assert r.values[5] == e[5]  # the average loss too


def _block_update_in_torch(work, tiles, unit_of_row, scale, zero, column_group, quantized, errors, losses, maxq):
    """The block-update kernels' arithmetic in torch, every row at once (each step rounded on its own)."""
    for pivot in range(work.shape[1]):
        group = int(column_group[pivot])
        value = work[:, pivot].clone()
        diagonal = tiles[unit_of_row, pivot, pivot]
        shifted = torch.round(value / scale[group]) + zero[group]
        code = torch.where(torch.isnan(shifted), shifted, shifted.clamp(0, maxq))
        q = scale[group] * (code - zero[group])
        residual = value - q
        losses[:, pivot] = (residual * residual) / (diagonal * diagonal)
        errors[:, pivot] = residual / diagonal
        quantized[:, pivot] = q
        work[:, pivot:] -= errors[:, pivot, None] * tiles[unit_of_row, pivot, pivot:]


def test_the_one_launch_block_kernel_gets_each_rows_unit_scale_and_outputs(monkeypatch):
    """With the extension's arithmetic standing in for both kernels (no CUDA here): one launch per
    block over the whole chunk, each row with its own unit's inverse, gives what one extension launch
    per unit gives, bit for bit, with units of 3 and 1 tasks."""
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization import gptq_cuda
    from gptqmodel.quantization.gptq import SharedHessianFactorCache

    from defuser_quant.integrations.gptqmodel import batched

    calls = Counter()

    def per_unit(work, hinv, scale, zero, column_group, quantized, errors, losses, maxq):
        calls["extension"] += 1
        unit_of_row = torch.zeros(work.shape[0], dtype=torch.long)
        _block_update_in_torch(work, hinv[None], unit_of_row, scale, zero, column_group, quantized, errors, losses, maxq)

    def one_launch(work, tiles, task_unit, scale, zero, column_group, quantized, errors, losses, rows_per_task, maxq):
        calls["rows"] += 1
        assert tiles.is_contiguous() and task_unit.dtype == torch.int32
        unit_of_row = task_unit.long().repeat_interleave(rows_per_task)
        _block_update_in_torch(work, tiles, unit_of_row, scale, zero, column_group, quantized, errors, losses, maxq)

    monkeypatch.setattr(batched, "_use_extension", lambda *a: True)
    monkeypatch.setattr(gptq_cuda, "gptq_block_update", per_unit)
    monkeypatch.setattr(batched.rows_block, "available", lambda: True)
    monkeypatch.setattr(batched.rows_block, "block_update", one_launch)
    qcfg = QuantizeConfig(bits=4, group_size=128)
    results = {}
    for rows_kernel in (False, True):
        tasks = _tasks(qcfg, n=6, cols=256)
        cache = SharedHessianFactorCache(1, "leader", leader="leader")
        for follower in tasks[1:3]:
            follower.adopt_hessian_from(tasks[0])
        for task in tasks[:3]:
            task.attach_shared_hessian_cache(cache)
        calls.clear()
        results[rows_kernel] = batched.batched_gptq_solve(tasks, rows_kernel=rows_kernel)
        # 2 blocks of 128 columns: one launch each, or one per unit (4 units: 3 + 1 + 1 + 1 tasks)
        assert calls == (Counter(rows=2) if rows_kernel else Counter(extension=8))
    for a, b in zip(results[False], results[True], strict=True):
        assert a.path == "batched_cuda_block_update@cpu" and b.path == "batched_rows_block_update@cpu"
        assert all(torch.equal(x, y) for x, y in zip(a.values[:4], b.values[:4], strict=True))
        assert a.values[5] == b.values[5]


def test_a_follower_whose_hessian_differs_from_its_leaders_is_solved_on_its_own():
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.gptq import SharedHessianFactorCache

    from defuser_quant.integrations.gptqmodel.batched import _units

    tasks = _tasks(QuantizeConfig(bits=4, group_size=128), n=5)
    cache, other = SharedHessianFactorCache(1, "a"), SharedHessianFactorCache(1, "b")
    for follower in tasks[1:3]:
        follower.adopt_hessian_from(tasks[0])
    for task in tasks:
        task.finalize_hessian()
    tasks[2].H[0, 0] += 1  # claims to share the leader's input, holds another Hessian
    for task in tasks[:3]:
        task.attach_shared_hessian_cache(cache)
    tasks[4].attach_shared_hessian_cache(other)
    units = [[tasks.index(t) for t in u.tasks] for u in _units(tasks)]
    assert units == [[0, 1], [2], [3], [4]]


def test_a_module_whose_first_cholesky_fails_is_left_to_gptqmodel():
    from gptqmodel import QuantizeConfig

    from defuser_quant.integrations.gptqmodel.batched import batched_gptq_solve

    qcfg = QuantizeConfig(bits=4, group_size=128)
    tasks = _tasks(qcfg, bad=2)
    untouched = tasks[2].H.clone()
    got = batched_gptq_solve(tasks)
    assert got[2] is None and all(r is not None for i, r in enumerate(got) if i != 2)
    # Its task is as it was: GPTQModel's own solve (with its damp recovery) starts from scratch.
    assert torch.equal(tasks[2].H, untouched)
    assert tasks[2].quantize()[0].shape == tasks[2].module.weight.shape


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"static_groups": True}, "static_groups"),
        ({"mock_quantization": True}, "mock_quantization"),
    ],
)
def test_options_it_does_not_reproduce_are_refused(change, reason):
    from gptqmodel import QuantizeConfig

    from defuser_quant.integrations.gptqmodel.batched import why_not_batched

    task = _tasks(QuantizeConfig(bits=4, group_size=128, **change), n=1)[0]
    assert why_not_batched(task) == reason


def test_modules_under_the_fallback_threshold_are_refused():
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.config import Fallback, FallbackStrategy

    from defuser_quant.integrations.gptqmodel.batched import why_not_batched

    task = _tasks(QuantizeConfig(bits=4, group_size=128, fallback=Fallback(strategy=FallbackStrategy.RTN, threshold=1000)), n=1)[0]
    assert "Fallback" in why_not_batched(task)


def test_settings_are_checked():
    from defuser_quant.integrations.gptqmodel.batched import BatchedSolve

    with pytest.raises(ValueError, match="min_modules"):
        BatchedSolve(min_modules=0)
    with pytest.raises(ValueError, match="chunk_bytes"):
        BatchedSolve(chunk_bytes=0)
    with pytest.raises(ValueError, match="inverse_threads"):
        BatchedSolve(inverse_threads=0)
    with pytest.raises(TypeError, match="inverses_ahead must be True or False"):
        BatchedSolve(inverses_ahead="yes")
    with pytest.raises(TypeError, match="host_results must be True or False, got 'no'"):
        BatchedSolve(host_results="no")  # a truthy string would silently turn it on
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="solve_ahead must be an integer >= 0"):
            BatchedSolve(solve_ahead=bad)
    with pytest.raises(ValueError, match="streams must be one of 'auto', 'own', 'caller', got 'private'"):
        BatchedSolve(streams="private")


def test_auto_streams_follow_torchs_deterministic_setting():
    from defuser_quant.integrations.gptqmodel.batched import solve_streams

    was = torch.are_deterministic_algorithms_enabled()
    try:
        for deterministic, decided in ((False, "own"), (True, "caller")):
            torch.use_deterministic_algorithms(deterministic)
            assert solve_streams("auto") == decided
            assert (solve_streams("own"), solve_streams("caller")) == ("own", "caller")  # explicit values kept
    finally:
        torch.use_deterministic_algorithms(was)
    with pytest.raises(ValueError, match="streams must be one of"):
        solve_streams("default")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym,group_size", [(True, 128), (False, 128), (True, -1), (False, -1)])
def test_sync_free_min_max_params_are_gptqmodels_find_params(device, bits, sym, group_size):
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.quantizer import Quantizer

    from defuser_quant.integrations.gptqmodel.batched import _min_max_params

    qcfg = QuantizeConfig(bits=bits, group_size=group_size, sym=sym)
    g = torch.Generator().manual_seed(bits)
    x = torch.randn(64, 128, generator=g) * torch.rand(64, 1, generator=g) * 3
    x[0] = 0  # both ends zero: GPTQModel widens it to [-1, 1]
    x[1] = x[1].abs() + 0.5  # positive only: the minimum is clamped to 0
    x[2] = -x[2].abs() - 0.5  # negative only: the maximum is clamped to 0
    x[3, :] = 0
    x[3, 7] = -2.0  # one non-zero value
    x = x.to(device)
    reference, ours = Quantizer(qcfg), Quantizer(qcfg)
    for q in (reference, ours):
        q.configure(perchannel=True)
    reference.find_params(x, weight=True)
    scale, zero = _min_max_params(ours, x, ours.maxq.to(x.device), int(ours.maxq.item()))
    assert scale.shape == reference.scale.shape and zero.shape == reference.zero.shape
    assert torch.equal(scale, reference.scale) and torch.equal(zero, reference.zero)
    assert scale.dtype == reference.scale.dtype and zero.dtype == reference.zero.dtype


def test_the_kernel_record_times_the_tail_after_the_last_solve():
    import time

    from defuser_quant.integrations.gptqmodel.kernels import note_solve, record_gptq_kernels

    with record_gptq_kernels() as record:
        assert record.last_solve_at is None and record.seconds_after_last_solve(time.perf_counter()) is None
        before = time.perf_counter()
        note_solve("batched_torch", "cpu", modules=3)
        after = time.perf_counter()
    assert before <= record.last_solve_at <= after
    assert record.seconds_after_last_solve(record.last_solve_at + 1.5) == pytest.approx(1.5)
    assert record.seconds_after_last_solve(record.last_solve_at - 1.0) == 0.0  # never negative


def test_parallel_setting_is_checked():
    from defuser_quant.integrations.gptqmodel.batched import BatchedSolve

    with pytest.raises(ValueError, match="parallel"):
        BatchedSolve(parallel=0)


def _second_chunk_runs_out_of_memory(monkeypatch) -> list[int]:
    """Make the second ``batched_gptq_solve`` call raise CUDA's out-of-memory error; returns the
    chunk sizes of every call."""
    from defuser_quant.integrations.gptqmodel import batched

    real, calls = batched.batched_gptq_solve, []

    def second_fails(chunk, *args, **kwargs):
        calls.append(len(chunk))
        if len(calls) == 2:
            raise torch.OutOfMemoryError("simulated")
        return real(chunk, *args, **kwargs)

    monkeypatch.setattr(batched, "batched_gptq_solve", second_fails)
    return calls


def _subset(tasks):
    """A stand-in GPTQModel processor holding ``tasks`` as one subset: (processor, names, name ->
    module, subset)."""
    names = [f"experts.{i}.gate_proj" for i in range(len(tasks))]
    processor = type("Processor", (), {})()
    processor.tasks = dict(zip(names, tasks, strict=True))
    module = {n: type("Module", (), {"name": n})() for n in names}
    return processor, names, module, dict.fromkeys(names)


def _share_chunks(monkeypatch, tasks, workers: int, settings, hold: float = 0.05):
    """Run the coordinator as GPTQModel's device workers do: ``workers`` threads take the subset's
    modules in order, each asking ``prepare`` then ``GPTQ.quantize`` (the patched one) for its
    module. Returns each task's result, the chunk sizes solved, and the most chunks solved at once."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from defuser_quant.integrations.gptqmodel import batched

    real, lock = batched.batched_gptq_solve, threading.Lock()
    state = {"now": 0, "most": 0, "sizes": []}

    def counted(chunk, *args, **kwargs):
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
            state["sizes"].append(len(chunk))
        try:
            threading.Event().wait(hold)  # long enough for the other workers to start theirs
            return real(chunk, *args, **kwargs)
        finally:
            with lock:
                state["now"] -= 1

    monkeypatch.setattr(batched, "batched_gptq_solve", counted)
    processor, names, module, subset = _subset(tasks)
    coordinator = batched._Coordinator(settings)

    def work(name):
        coordinator.prepare(processor, module[name], subset)
        return coordinator.take(processor.tasks[name], batched.BLOCKSIZE)

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(work, names, timeout=120))
    return results, state["sizes"], state["most"], coordinator


PER_TASK = 3 * 128**2 * 4 + 3 * 64 * 128 * 4  # working memory of one 64 x 128 task in a chunk


@pytest.mark.parametrize(("parallel", "ahead"), [(1, 0), (2, 0), (3, 0), (1, 2), (2, 4), (3, 4)])
def test_chunks_are_shared_and_every_result_is_gptqmodels(monkeypatch, parallel, ahead):
    """Solved by the waiting workers (``solve_ahead=0``) or by the solver threads: each chunk
    once, ``parallel`` at a time at most, and each result GPTQModel's own."""
    from gptqmodel import QuantizeConfig

    from defuser_quant.integrations.gptqmodel.batched import BatchedSolve

    qcfg = QuantizeConfig(bits=4, group_size=128, act_group_aware=False)
    reference, tasks = _tasks(qcfg, n=8, cols=128), _tasks(qcfg, n=8, cols=128)
    expected = [t.quantize() for t in reference]
    # Two modules' worth of working memory per chunk once split: 4 chunks for 4 workers.
    settings = BatchedSolve(chunk_bytes=2 * PER_TASK * parallel, parallel=parallel, solve_ahead=ahead)
    results, sizes, most, coordinator = _share_chunks(monkeypatch, tasks, workers=4, settings=settings)
    assert sorted(sizes) == [2, 2, 2, 2]  # every chunk solved once, by one thread
    assert most == parallel  # never more at once than asked, and that many when workers wait
    stats = coordinator.stats
    assert (stats.groups, stats.chunks, stats.batched_modules) == (1, 4, 8)
    assert not coordinator.open and not coordinator.chunk_of and not any(coordinator.running.values())
    assert not any(coordinator.held.values())  # every result asked for
    # A solve starts the inverses of an open chunk none has started yet (a worker may solve its own
    # chunk before an earlier one, whose inverses then have no solve left to start them)
    assert 1 <= stats.inverses_ahead <= 3
    for want, got in zip(expected, results, strict=True):
        assert got is not None
        for a, b in zip(want[:4], got.values[:4], strict=True):
            assert torch.equal(a, b)
        assert (want[5], want[6], want[7]) == got.values[5:]


@pytest.mark.parametrize("ahead", [0, 2])
def test_chunks_are_solved_on_their_own_device_only(monkeypatch, ahead):
    """GPTQModel keeps device workers per device: with a subset spread over two devices, a worker
    (``solve_ahead=0``) or a device's solver thread solves chunks of its own device only,
    ``parallel`` at a time on each device."""
    import threading

    from gptqmodel import QuantizeConfig

    from defuser_quant.integrations.gptqmodel import batched

    qcfg = QuantizeConfig(bits=4, group_size=128, act_group_aware=False)
    tasks = _tasks(qcfg, n=16, cols=128)
    device_of = {id(t): f"cuda:{i % 2}" for i, t in enumerate(tasks)}  # as GPTQModel spreads modules
    real_key = batched._settings_key
    monkeypatch.setattr(batched, "_settings_key", lambda t: (*real_key(t)[:2], device_of[id(t)], *real_key(t)[3:]))
    worker_device, mismatched, running = threading.local(), [], {"cuda:0": 0, "cuda:1": 0}
    most = {"cuda:0": 0, "cuda:1": 0, "both": 0}
    real, lock = batched.batched_gptq_solve, threading.Lock()

    def solve(chunk, *args, **kwargs):
        device = device_of[id(chunk[0])]
        # a worker's device, or the device a solver thread is named for ("defuser-quant-solve-cuda:0-0")
        here = getattr(worker_device, "device", None) or threading.current_thread().name[20:].rsplit("-", 1)[0]
        with lock:
            if {device_of[id(t)] for t in chunk} != {here}:
                mismatched.append(device)
            running[device] += 1
            most[device] = max(most[device], running[device])
            most["both"] = max(most["both"], running["cuda:0"] + running["cuda:1"])
        try:
            threading.Event().wait(0.1)  # long enough for every worker to start its chunk
            return real(chunk, *args, **kwargs)
        finally:
            with lock:
                running[device] -= 1

    monkeypatch.setattr(batched, "batched_gptq_solve", solve)
    monkeypatch.setattr(batched._Coordinator, "_device_context", staticmethod(lambda device: contextlib.nullcontext()))
    real_prepare = batched._Coordinator.prepare

    def prepare(self, processor, module, subset):
        worker_device.device = device_of[id(processor.tasks[module.name])]
        return real_prepare(self, processor, module, subset)

    monkeypatch.setattr(batched._Coordinator, "prepare", prepare)
    settings = batched.BatchedSolve(chunk_bytes=4 * PER_TASK, parallel=2, solve_ahead=ahead)  # chunks of 2 tasks
    results, sizes, _, coordinator = _share_chunks(monkeypatch, tasks, workers=4, settings=settings, hold=0.0)
    assert not mismatched and sorted(sizes) == [2] * 8
    assert most == {"cuda:0": 2, "cuda:1": 2, "both": 4}  # the limit holds per device
    assert coordinator.stats.groups == 2 and coordinator.stats.batched_modules == 16 and all(results)


@pytest.mark.parametrize("ahead", [0, 2])
def test_a_failed_chunk_leaves_its_modules_to_gptqmodel_and_frees_the_waiting_workers(monkeypatch, ahead):
    from gptqmodel import QuantizeConfig

    from defuser_quant.integrations.gptqmodel import batched

    qcfg = QuantizeConfig(bits=4, group_size=128, act_group_aware=False)
    tasks = _tasks(qcfg, n=8, cols=128)
    _second_chunk_runs_out_of_memory(monkeypatch)
    settings = batched.BatchedSolve(chunk_bytes=4 * PER_TASK, parallel=2, solve_ahead=ahead)
    results, _, _, coordinator = _share_chunks(monkeypatch, tasks, workers=4, settings=settings, hold=0.0)
    assert sum(r is None for r in results) == 2 == coordinator.stats.per_module["chunk ran out of memory"]
    assert coordinator.stats.batched_modules == 6 and not coordinator.chunk_of


def _counted_inverses(monkeypatch) -> list[str]:
    """Count every Hessian inversion of the batched solve, by the thread that made it."""
    import threading

    from defuser_quant.integrations.gptqmodel import batched

    real, calls = batched._invert_unit, []

    def counted(*args, **kwargs):
        calls.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(batched, "_invert_unit", counted)
    return calls


@pytest.mark.parametrize("ahead", [True, False])
def test_the_next_chunks_inverses_are_made_once_beside_the_chunk_before(monkeypatch, ahead):
    """With ``inverses_ahead`` every chunk after the first gets inverses started while the chunk
    before was solved, on the inverse threads, and uses them (each Hessian inverted once); the
    results are GPTQModel's either way."""
    from gptqmodel import QuantizeConfig

    from defuser_quant.integrations.gptqmodel.batched import BatchedSolve

    qcfg = QuantizeConfig(bits=4, group_size=128, act_group_aware=False)
    reference, tasks = _tasks(qcfg, n=8, cols=128), _tasks(qcfg, n=8, cols=128)
    expected = [t.quantize() for t in reference]
    calls = _counted_inverses(monkeypatch)
    settings = BatchedSolve(chunk_bytes=2 * PER_TASK, inverses_ahead=ahead)
    results, sizes, _, coordinator = _share_chunks(monkeypatch, tasks, workers=2, settings=settings, hold=0.0)
    assert sizes == [2, 2, 2, 2] and len(calls) == 8  # every Hessian inverted once
    assert coordinator.stats.inverses_ahead == (3 if ahead else 0)
    assert coordinator.stats.as_dict()["inverses_ahead"] == coordinator.stats.inverses_ahead
    on_pool = sum(name.startswith("defuser-quant-hinv") for name in calls)
    assert on_pool == (6 if ahead else 0)  # the CPU inverts a chunk's own Hessians on the solving worker
    for want, got in zip(expected, results, strict=True):
        for a, b in zip(want[:4], got.values[:4], strict=True):
            assert torch.equal(a, b)
        assert want[5] == got.values[5]


def test_the_next_chunks_inverses_start_before_this_chunks_column_loop(monkeypatch):
    """``inverses_started`` is called once this chunk's inverses are under way and before any of
    its column loop (the quantizer parameters come first in it) is queued."""
    from gptqmodel import QuantizeConfig

    from defuser_quant.integrations.gptqmodel import batched

    qcfg = QuantizeConfig(bits=4, group_size=128, act_group_aware=False)
    events: list[str] = []
    real = batched._find_params
    monkeypatch.setattr(batched, "_find_params", lambda *a, **k: events.append("params") or real(*a, **k))
    batched.batched_gptq_solve(_tasks(qcfg, n=2, cols=128), inverses_started=lambda: events.append("started"))
    assert events[0] == "started" and events.count("started") == 1 and "params" in events


def test_inverses_that_fail_to_start_ahead_are_made_by_their_own_solve(monkeypatch):
    from gptqmodel import QuantizeConfig

    from defuser_quant.integrations.gptqmodel import batched

    qcfg = QuantizeConfig(bits=4, group_size=128, act_group_aware=False)
    reference, tasks = _tasks(qcfg, n=6, cols=128), _tasks(qcfg, n=6, cols=128)
    expected = [t.quantize() for t in reference]
    real = batched.start_inverses

    def no_room_ahead(tasks, *args, background=False, **kwargs):
        if background:
            raise torch.OutOfMemoryError("simulated")
        return real(tasks, *args, background=background, **kwargs)

    monkeypatch.setattr(batched, "start_inverses", no_room_ahead)
    results, sizes, _, coordinator = _share_chunks(
        monkeypatch, tasks, workers=2, settings=batched.BatchedSolve(chunk_bytes=2 * PER_TASK), hold=0.0)
    assert sizes == [2, 2, 2] and coordinator.stats.inverses_ahead == 0 and coordinator.stats.batched_modules == 6
    for want, got in zip(expected, results, strict=True):
        assert torch.equal(want[0], got.values[0])


def test_an_ahead_inverse_that_runs_out_of_memory_leaves_its_chunk_to_gptqmodel(monkeypatch):
    """The error of an inverse computed ahead is its chunk's: that chunk goes back to GPTQModel's
    per-module solve (as when its own inverses run out of memory), the others are batched."""
    import threading

    from gptqmodel import QuantizeConfig

    from defuser_quant.integrations.gptqmodel import batched

    qcfg = QuantizeConfig(bits=4, group_size=128, act_group_aware=False)
    tasks = _tasks(qcfg, n=6, cols=128)
    real = batched._invert_unit

    def pool_fails_third(H, *args, **kwargs):
        on_pool = threading.current_thread().name.startswith("defuser-quant-hinv")
        if on_pool and any(H is t.H for t in tasks[4:]):
            raise torch.OutOfMemoryError("simulated")
        return real(H, *args, **kwargs)

    monkeypatch.setattr(batched, "_invert_unit", pool_fails_third)
    results, sizes, _, coordinator = _share_chunks(
        monkeypatch, tasks, workers=2, settings=batched.BatchedSolve(chunk_bytes=2 * PER_TASK), hold=0.0)
    assert [r is None for r in results] == [False] * 4 + [True] * 2
    assert coordinator.stats.per_module["chunk ran out of memory"] == 2 and coordinator.stats.batched_modules == 4


def _coordinator_over(tasks, **settings):
    """A coordinator (one task a chunk) and :func:`_subset` of ``tasks``."""
    from defuser_quant.integrations.gptqmodel import batched

    return batched._Coordinator(batched.BatchedSolve(chunk_bytes=PER_TASK, **settings)), *_subset(tasks)


def test_the_solver_runs_ahead_of_a_slow_worker_and_holds_at_most_solve_ahead_chunks(monkeypatch):
    """One worker processing slowly: the solver thread solves the next chunks meanwhile (no wait
    after the first), never holding more than ``solve_ahead`` chunks, and each result is GPTQModel's."""
    import threading

    from gptqmodel import QuantizeConfig

    from defuser_quant.integrations.gptqmodel import batched

    qcfg = QuantizeConfig(bits=4, group_size=128, act_group_aware=False)
    reference, tasks = _tasks(qcfg, n=6, cols=128), _tasks(qcfg, n=6, cols=128)
    expected = [t.quantize() for t in reference]
    coordinator, processor, names, module, subset = _coordinator_over(tasks, solve_ahead=2)
    real, held_at_start = batched.batched_gptq_solve, []

    def solve(chunk, *args, **kwargs):
        held_at_start.append(coordinator.held["cpu"])
        return real(chunk, *args, **kwargs)

    monkeypatch.setattr(batched, "batched_gptq_solve", solve)
    got = []
    try:
        for name in names:
            coordinator.prepare(processor, module[name], subset)
            got.append(coordinator.take(processor.tasks[name], batched.BLOCKSIZE))
            threading.Event().wait(0.3)  # GPTQModel's processing of the module, slower than a solve
    finally:
        coordinator.close()
    assert len(held_at_start) == 6 and max(held_at_start) == 2  # counted from the solve's start
    stats = coordinator.stats
    assert stats.chunks == 6 and stats.solved_ahead >= 4  # all but the first one or two asked before
    assert stats.waited_seconds < 0.3 * 6  # it did not wait for each chunk in turn
    for want, result in zip(expected, got, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(want[:4], result.values[:4], strict=True))
    assert not any(t.is_alive() for threads in coordinator.solvers.values() for t in threads)


def test_a_waiting_worker_moves_the_solver_past_results_nobody_asked_for():
    """Results GPTQModel never asks for hold chunks, but a worker waiting for a later chunk still
    gets it solved: no hang."""
    from gptqmodel import QuantizeConfig

    from defuser_quant.integrations.gptqmodel import batched

    import threading

    qcfg = QuantizeConfig(bits=4, group_size=128, act_group_aware=False)
    coordinator, processor, names, module, subset = _coordinator_over(_tasks(qcfg, n=5, cols=128), solve_ahead=1)
    got = []

    def worker():
        coordinator.prepare(processor, module[names[0]], subset)  # its result is never taken
        coordinator.prepare(processor, module[names[4]], subset)  # four chunks further on
        got.append(coordinator.take(processor.tasks[names[4]], batched.BLOCKSIZE))

    waiting = threading.Thread(target=worker, daemon=True)
    waiting.start()
    waiting.join(60)
    stuck = waiting.is_alive()
    coordinator.close()  # (frees the worker if it was stuck)
    assert not stuck and got and got[0] is not None
    assert coordinator.stats.chunks == 5


@pytest.mark.parametrize("arrives", ["while it is solved", "after it failed"])
def test_a_solve_that_fails_on_the_solver_thread_fails_its_workers(monkeypatch, arrives):
    """Not out of memory: GPTQModel's worker for that chunk raises it, whether it waits for the
    chunk or comes after it failed (never a silent per-module fallback); the other chunks are
    solved as usual."""
    import threading

    from gptqmodel import QuantizeConfig

    from defuser_quant.integrations.gptqmodel import batched

    qcfg = QuantizeConfig(bits=4, group_size=128, act_group_aware=False)
    tasks = _tasks(qcfg, n=3, cols=128)
    real, failed = batched.batched_gptq_solve, threading.Event()

    def second_breaks(chunk, *args, **kwargs):
        if chunk[0] is tasks[1]:
            if arrives == "while it is solved":
                threading.Event().wait(0.5)  # the worker asks meanwhile
            failed.set()
            raise ValueError("simulated bug")
        return real(chunk, *args, **kwargs)

    monkeypatch.setattr(batched, "batched_gptq_solve", second_breaks)
    coordinator, processor, names, module, subset = _coordinator_over(tasks, solve_ahead=2)
    try:
        coordinator.prepare(processor, module[names[0]], subset)
        if arrives == "after it failed":
            assert failed.wait(30)
            with coordinator.cond:
                while coordinator.running["cpu"]:
                    coordinator.cond.wait(1)
        with pytest.raises(RuntimeError, match="batched GPTQ solve of 1 modules failed: simulated bug") as err:
            coordinator.prepare(processor, module[names[1]], subset)
        assert isinstance(err.value.__cause__, ValueError)
        coordinator.prepare(processor, module[names[2]], subset)
        assert coordinator.take(tasks[2], batched.BLOCKSIZE) is not None
    finally:
        coordinator.close()


def test_a_solver_thread_that_breaks_frees_the_waiting_workers(monkeypatch):
    """An error outside a chunk's solve (here: entering the device's context) ends the solver
    thread; every worker waiting for that device's chunks gets the error instead of waiting forever,
    and so does a later group of that device."""
    import threading

    from gptqmodel import QuantizeConfig

    from defuser_quant.integrations.gptqmodel import batched

    qcfg = QuantizeConfig(bits=4, group_size=128, act_group_aware=False)
    tasks = _tasks(qcfg, n=4, cols=128)
    def no_device(device):
        raise OSError("no device")

    monkeypatch.setattr(batched._Coordinator, "_device_context", staticmethod(no_device))
    coordinator, processor, names, module, subset = _coordinator_over(tasks[:2], solve_ahead=2)
    errors = []

    def worker(coord, proc, mod, sub):
        try:
            coord.prepare(proc, mod, sub)
        except RuntimeError as exc:
            errors.append(exc)

    for args in ((coordinator, processor, module[names[1]], subset),):
        waiting = threading.Thread(target=worker, args=args, daemon=True)
        waiting.start()
        waiting.join(30)
        assert not waiting.is_alive()
    assert len(errors) == 1 and isinstance(errors[0].__cause__, OSError)
    later = {f"experts.{i}.down_proj": t for i, t in enumerate(tasks[2:])}  # another subset, same device
    processor.tasks.update(later)
    other = type("Module", (), {"name": next(iter(later))})()
    waiting = threading.Thread(target=worker, args=(coordinator, processor, other, dict.fromkeys(later)), daemon=True)
    waiting.start()
    waiting.join(30)
    coordinator.close()
    assert not waiting.is_alive() and len(errors) == 2 and isinstance(errors[1].__cause__, OSError)


def test_closing_frees_waiting_workers_and_ends_the_solver_threads(monkeypatch):
    """GPTQModel's quantize() ending (an error, Ctrl-C) while chunks are open: a worker still waiting
    is released with an error, and the solver threads end."""
    import threading

    from gptqmodel import QuantizeConfig

    from defuser_quant.integrations.gptqmodel import batched

    qcfg = QuantizeConfig(bits=4, group_size=128, act_group_aware=False)
    tasks = _tasks(qcfg, n=4, cols=128)
    real, release = batched.batched_gptq_solve, threading.Event()

    def slow(chunk, *args, **kwargs):
        release.wait(30)
        return real(chunk, *args, **kwargs)

    monkeypatch.setattr(batched, "batched_gptq_solve", slow)
    coordinator, processor, names, module, subset = _coordinator_over(tasks, solve_ahead=1)
    errors = []

    def worker():
        try:
            coordinator.prepare(processor, module[names[3]], subset)
        except RuntimeError as exc:
            errors.append(str(exc))

    waiting = threading.Thread(target=worker)
    waiting.start()
    threading.Event().wait(0.2)  # the solver is inside the first chunk, the worker waits for the last
    closer = threading.Thread(target=coordinator.close)
    closer.start()
    release.set()
    closer.join(30)
    waiting.join(30)
    assert not closer.is_alive() and not waiting.is_alive()
    assert errors and "ended before this chunk was solved" in errors[0]
    assert not any(t.is_alive() for threads in coordinator.solvers.values() for t in threads)


# ----- inside GPTQModel's quantize() -----------------------------------------------------------
def _quantize(plugin, tiny, tmp_path, name: str, **kw):  # noqa: F811
    from gptqmodel import GPTQModel, QuantizeConfig

    from defuser_quant.integrations.gptqmodel.kernels import record_gptq_kernels

    model = GPTQModel.load(str(tiny["src"]), QuantizeConfig(bits=4, group_size=128))
    with record_gptq_kernels() as kernels:
        result = plugin.quantize_with_defuser(model, tiny["calibration"], batch_size=4, **kw)
    model.save(str(tmp_path / name))
    return result, kernels, _tensors(tmp_path / name)


@pytest.fixture(scope="module")
def per_module(plugin, tiny, tmp_path_factory):  # noqa: F811
    return _quantize(plugin, tiny, tmp_path_factory.mktemp("per_module"), "out")


def _solve_paths() -> tuple[str, str, str]:
    """The paths a run here takes: batched and per module, and the device (GPTQModel quantizes on
    the GPU where there is one)."""
    if not torch.cuda.is_available():
        return "batched_torch", "torch", "cpu"
    from gptqmodel.quantization.gptq_cuda import block_update_available

    from defuser_quant.integrations.gptqmodel import rows_kernel

    if not block_update_available():
        return "batched_torch", "torch", "cuda"
    return ("batched_rows_block_update" if rows_kernel.available() else "batched_cuda_block_update"), \
        "cuda_block_update", "cuda"


@pytest.mark.slow
@pytest.mark.parametrize("ahead", [0, 2])
def test_batched_solve_in_gptqmodel_gives_its_per_module_checkpoint(plugin, tiny, tmp_path, per_module, ahead):  # noqa: F811
    from defuser_quant.integrations.gptqmodel.batched import BatchedSolve

    reference, kernels_ref, tensors_ref = per_module
    # with the solver thread: small chunks, so it has chunks to solve before a worker asks
    settings = BatchedSolve(solve_ahead=ahead, chunk_bytes=2_000_000) if ahead else BatchedSolve()
    result, kernels, tensors = _quantize(plugin, tiny, tmp_path, "batched", batched_solve=settings)
    # The same checkpoint, tensor for tensor (on the CPU the batched linear algebra is bit-equal).
    assert tensors.keys() == tensors_ref.keys()
    assert not [k for k in tensors if not torch.equal(tensors[k], tensors_ref[k])]
    # Every expert projection was solved batched; the lone modules (q_proj, o_proj) per module.
    solve, experts = result.solve, len(result.projections)
    assert experts == 48 and all(p.method == "gptq" for p in result.projections)
    batched_path, lone_path, on = _solve_paths()
    assert solve.batched_modules >= experts and solve.paths == Counter({f"{batched_path}@{on}": solve.batched_modules})
    assert reference.solve is None
    lone = sum(kernels_ref.solves.values()) - solve.batched_modules
    assert solve.per_module == Counter({"no equal-shape sibling in the subset": lone}) and lone > 0
    assert kernels.solves == Counter({(batched_path, on): solve.batched_modules, (lone_path, on): lone})
    assert kernels.last_solve_at is not None and kernels_ref.last_solve_at is not None  # either way, the tail is timed
    if ahead:  # the solver thread started chunks nobody waited for yet
        assert solve.chunks > solve.groups >= 4 and solve.solved_ahead > 0
        # small chunks: the next chunk's inverses started while one was solved, inside GPTQModel's run
        assert 0 < solve.inverses_ahead < solve.chunks
    else:
        assert solve.groups == solve.chunks >= 4 and solve.solved_ahead == 0  # gate/up and down of 2 layers at least
    # streams are counted for CUDA chunks only ("own" without deterministic algorithms)
    assert solve.streams == (Counter({"own": solve.chunks}) if on == "cuda" else Counter())
    assert solve.block_updates == Counter({"matmul_sub": solve.chunks})  # GPTQModel's matmul and subtraction
    # GPTQModel's own log rows (samples, damp, loss) are those of the per-module run.
    def rows(r):
        return sorted((row["layer"], row["module"], row["samples"], row["damp"], row["loss"]) for row in r.log["gptq"])

    assert rows(result) == rows(reference)


@pytest.mark.slow
def test_chunks_and_out_of_memory_fall_back_per_module_with_the_same_checkpoint(
    plugin, tiny, tmp_path, per_module, monkeypatch  # noqa: F811
):
    from defuser_quant.integrations.gptqmodel.batched import BatchedSolve

    calls = _second_chunk_runs_out_of_memory(monkeypatch)
    # ~3 modules' worth of working memory per chunk: groups split into several chunks.
    cost = 3 * 128**2 * 4 + 2 * 3 * 128 * 128 * 4
    # With host_results: GPTQModel gets scales/zeros/g_idx already on the CPU (views of one copy per chunk).
    result, _, tensors = _quantize(plugin, tiny, tmp_path, "chunked",
                                   batched_solve=BatchedSolve(chunk_bytes=cost, host_results=True))
    assert max(calls) <= 2 and len(calls) > result.solve.groups
    assert result.solve.per_module["chunk ran out of memory"] == calls[1]
    assert result.solve.host_results == result.solve.batched_modules > 0
    _, _, tensors_ref = per_module
    assert not [k for k in tensors if not torch.equal(tensors[k], tensors_ref[k])]


@pytest.mark.slow
def test_batched_checkpoint_loads_with_gptqmodel_and_defuser_quant_load(plugin, tiny, tmp_path):  # noqa: F811
    from gptqmodel import GPTQModel

    import defuser_quant

    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    result, _, _ = _quantize(plugin, tiny, tmp_path, "ckpt", batched_solve=True)
    assert result.solve.batched_modules > 0
    reloaded = GPTQModel.load(str(tmp_path / "ckpt"), device="cpu")
    with torch.inference_mode():
        a = reloaded.model(**tiny["ids"]).logits.float()
    pytest.importorskip("optimum", reason="defuser_quant.load of a GPTQ checkpoint needs optimum (installed by the set-up)")
    loaded = defuser_quant.load(str(tmp_path / "ckpt"))
    experts = [m for n, m in loaded.named_modules() if ".experts." in n and n.endswith("_proj")]
    assert len(experts) == 48 and not any(isinstance(m, nn.Linear) and not isinstance(m, BaseQuantLinear) for m in experts)
    with torch.inference_mode():
        b = loaded(**tiny["ids"]).logits.float()
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_batched_solve_argument_is_checked(plugin, tiny):  # noqa: F811
    from gptqmodel import GPTQModel, QuantizeConfig

    model = GPTQModel.load(str(tiny["src"]), QuantizeConfig(bits=4, group_size=128))
    with pytest.raises(TypeError, match="batched_solve"):
        plugin.quantize_with_defuser(model, tiny["calibration"], batched_solve="yes")


# ----- CUDA (run on the device machine) ---------------------------------------------------------
_FIRST_LINALG = """
import sys, torch
sys.path.insert(0, sys.argv[1])
from _source import use_source_checkout
use_source_checkout()
from chunk_phases import make_tasks
from defuser_quant.integrations.gptqmodel.batched import batched_gptq_solve

# the process's first CUDA linalg calls, made by 4 inverse threads
threaded = batched_gptq_solve(make_tasks(64, 256, 6, 96, "cuda"), inverse_threads=4)
serial = batched_gptq_solve(make_tasks(64, 256, 6, 96, "cuda"), inverse_threads=1)
assert all(r is not None for r in threaded + serial)
assert all(torch.equal(a, b) for t, s in zip(threaded, serial) for a, b in zip(t.values[:4], s.values[:4]))
print("ok")
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
def test_inverse_threads_may_make_the_processs_first_cuda_linalg_calls(tmp_path):
    """torch loads its CUDA linear-algebra library at the first call, and threads racing to that
    first call fail ("lazy wrapper should be called at most once"): a fresh process whose first
    linalg calls are the solve's four inverse threads gets the serial solve's results."""
    import subprocess

    benchmarks = str(Path(__file__).resolve().parents[1] / "benchmarks")
    proc = subprocess.run([sys.executable, "-c", _FIRST_LINALG, benchmarks], capture_output=True, text=True,
                          timeout=600, cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
def test_caller_streams_put_every_inverse_on_the_callers_stream():
    from types import SimpleNamespace

    from defuser_quant.integrations.gptqmodel.batched import _unit_inverses

    caller = torch.cuda.Stream()
    hessians = [torch.eye(8, device="cuda") * (i + 1) for i in range(6)]
    for own_streams in (False, True):
        seen = []

        def invert(h):
            seen.append(torch.cuda.current_stream(h.device))
            return SimpleNamespace(h=h, tensors=lambda h=h: [h])

        with torch.cuda.stream(caller):
            out = _unit_inverses(hessians, invert, threads=4, own_streams=own_streams)
        assert [o.h for o in out] == hessians and len(seen) == 6
        # "caller": every thread on the caller's stream; "own": every thread on a stream of its own
        assert all((stream == caller) is not own_streams for stream in seen), (own_streams, seen)


def _cuda_task_pair(qcfg):
    """Two equal sets of 8 GPTQ tasks (256 x 512) on CUDA with final Hessians: GPTQModel's and ours."""
    pair = (_tasks(qcfg, n=8, rows=256, cols=512), _tasks(qcfg, n=8, rows=256, cols=512))
    for task in [*pair[0], *pair[1]]:
        task.module.cuda()
        task.module.target_device = torch.device("cuda")
        task.finalize_hessian(target_device=torch.device("cuda"))
    return pair


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
@pytest.mark.parametrize("rows_kernel", [True, False])
@pytest.mark.parametrize("inverse_threads,host_results,streams", [(1, False, "own"), (4, True, "own"), (4, True, "caller")])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_batched_solve_on_cuda_matches_gptqmodels_extension_path(name, inverse_threads, host_results, streams, rows_kernel):
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.gptq_cuda import block_update_available

    from defuser_quant.integrations.gptqmodel.batched import batched_gptq_solve

    reference, batched = _cuda_task_pair(QuantizeConfig(**{"bits": 4, "group_size": 128, **CONFIGS[name]}))
    expected = [t.quantize() for t in reference]
    got = batched_gptq_solve(batched, inverse_threads=inverse_threads, host_results=host_results, streams=streams,
                             rows_kernel=rows_kernel)
    if host_results:
        assert all(v.device.type == "cpu" for r in got for v in r.values[1:4])
        got = [type(r)((r.values[0], *(v.cuda() for v in r.values[1:4]), *r.values[4:]), r.path, r.device, r.blocksize)
               for r in got]
    extension = block_update_available()
    codes = identical = 0
    scale_diff = 0.0
    unequal = []
    for m, (e, r) in enumerate(zip(expected, got, strict=True)):
        # BatchedSolve's default: the chunk's blocks through rows_kernel, where the extension applies
        kind = "batched_rows_block_update" if rows_kernel else "batched_cuda_block_update"
        assert r is not None and r.path == (f"{kind}@cuda" if extension else "batched_torch@cuda")
        q, scale, _, g_idx, *_ = r.values
        step = e[1][:, e[3].long()]  # GPTQModel's scale of every column
        codes += q.numel()
        identical += int((torch.round(q.float() / step) == torch.round(e[0].float() / step)).sum())
        scale_diff = max(scale_diff, float(((scale - e[1]).abs() / e[1].abs()).max()))
        unequal += [f"{m}:{k}" for k, want, have in zip(("q", "scale", "zero", "g_idx"), e[:4], r.values[:4], strict=True)
                    if not torch.equal(want, have)]
        if r.values[5] != e[5]:
            unequal.append(f"{m}:loss")
    print(f"\n{name}, {inverse_threads} inverse thread(s), rows kernel {rows_kernel}: {identical / codes:.5f} of codes identical to GPTQModel's per-module solve, largest relative "
          f"scale difference {scale_diff:.2e}, unequal: {unequal or 'none'}")
    # The same single-matrix linear algebra in the same order as GPTQModel: bit-identical, loss included.
    assert not unequal


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
@pytest.mark.parametrize("name", ["default (act_group_aware)", "desc_act"])
def test_inverses_started_ahead_on_cuda_give_gptqmodels_bits(name):
    """A second chunk whose inverses were started on the inverse threads' own streams while the
    first chunk was solved on another stream: every value bit-identical to GPTQModel's per-module solve."""
    from gptqmodel import QuantizeConfig

    from defuser_quant.integrations.gptqmodel.batched import batched_gptq_solve, start_inverses

    reference, batched = _cuda_task_pair(QuantizeConfig(**{"bits": 4, "group_size": 128, **CONFIGS[name]}))
    expected = [t.quantize() for t in reference]
    held = {}
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        first = batched_gptq_solve(batched[:4], inverse_threads=4, streams="own", inverses_started=lambda: held.update(
            ahead=start_inverses(batched[4:], 4, "own", background=True)))
        assert held["ahead"].background
        second = batched_gptq_solve(batched[4:], inverse_threads=4, streams="own", ahead=held["ahead"])
    stream.synchronize()
    for e, r in zip(expected, [*first, *second], strict=True):
        assert r is not None
        for want, have in zip(e[:4], r.values[:4], strict=True):
            assert torch.equal(want, have.to(want.device))
        assert r.values[5] == e[5]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
def test_batched_solve_on_cuda_end_to_end(tiny, tmp_path):  # noqa: F811
    import json
    import os
    import subprocess

    from test_gptqmodel_multigpu import agreement

    calibration = tmp_path / "calibration.json"
    calibration.write_text(json.dumps(tiny["calibration"]))
    runs = {}
    for name, extra in (("per_module", []), ("batched", ["--batched"]),
                        ("batched_hinv1_device", ["--batched", "--inverse-threads", "1", "--no-host-results"]),
                        # several chunks a group, solved ahead by a solver thread
                        ("batched_ahead_small_chunks", ["--batched", "--solve-ahead", "2", "--chunk-bytes", "2000000"]),
                        # the words packed on the GPU (BatchedSolve.pack), served to GPTQModel's pack_block
                        ("batched_pack", ["--batched", "--pack"]),
                        # under deterministic algorithms "auto" solves on the workers' streams; each its own here
                        ("batched_own_streams", ["--batched", "--streams", "own"])):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0],
               "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
        cmd = [sys.executable, str(Path(__file__).with_name("gptqmodel_run.py")), str(tiny["src"]), str(calibration),
               str(tmp_path / name), "--grouped", *extra]
        proc = subprocess.run([*cmd, "--deterministic"], env=env, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
        runs[name] = json.loads((tmp_path / name / "result.json").read_text())
    reference = _tensors(tmp_path / "per_module" / "checkpoint")
    assert runs["batched_ahead_small_chunks"]["solve"]["chunks"] > runs["batched"]["solve"]["chunks"]
    assert runs["batched"]["solve"]["solved_ahead"] == 0
    assert runs["batched"]["solve"]["streams"] == {"caller": runs["batched"]["solve"]["chunks"]}
    assert runs["batched_own_streams"]["solve"]["streams"] == {"own": runs["batched_own_streams"]["solve"]["chunks"]}
    for name in ("batched", "batched_hinv1_device", "batched_ahead_small_chunks", "batched_pack", "batched_own_streams"):
        batched = runs[name]
        assert batched["fallback"] is None and batched["solve"]["batched_modules"] >= 48
        assert set(batched["solve"]["paths"]) <= {"batched_rows_block_update@cuda", "batched_cuda_block_update@cuda",
                                                  "batched_torch@cuda"}
        # With BatchedSolve(pack=True) every batched module's words are served; else nothing is packed.
        packed = batched["solve"]["batched_modules"]
        want = {"offered": packed, "served": packed, "refused": 0} if name == "batched_pack" else None
        assert batched["solve"]["pack"] == want
        tensors = _tensors(tmp_path / name / "checkpoint")
        close = agreement(reference, tensors)
        unequal = sorted(k for k in reference if not torch.equal(reference[k], tensors[k]))
        print(f"\n{name} vs per-module solve on CUDA: {close}, unequal tensors: {len(unequal)} {unequal[:6]}")
        # GPTQModel's own single-matrix linear algebra per Hessian: the same checkpoint, tensor for tensor.
        assert not unequal, close


def _count_addmm(monkeypatch) -> list[tuple]:
    """Every in-place ``addmm_`` from here on: (output rows, columns, alpha)."""
    calls, real = [], torch.Tensor.addmm_

    def counted(self, mat1, mat2, *, beta=1, alpha=1):
        calls.append((*self.shape, alpha))
        return real(self, mat1, mat2, beta=beta, alpha=alpha)

    monkeypatch.setattr(torch.Tensor, "addmm_", counted)
    return calls


@pytest.mark.parametrize("name", ["default (act_group_aware)", "desc_act", "group 256 (two blocks a group)"])
def test_inplace_update_gives_gptqmodels_bits_with_one_addmm_per_module_and_block(monkeypatch, name):
    """``inplace_update``: each module's update after a column block is one ``addmm_`` (alpha -1) into
    its weights, and the results are still GPTQModel's per-module solve's, bit for bit."""
    from gptqmodel import QuantizeConfig

    from defuser_quant.integrations.gptqmodel.batched import batched_gptq_solve

    kw = dict(CONFIGS[name])
    qcfg = QuantizeConfig(bits=4, group_size=kw.pop("group_size", 128), **kw)
    reference, batched = _tasks(qcfg, n=3, cols=384), _tasks(qcfg, n=3, cols=384)
    expected = [t.quantize() for t in reference]
    calls = _count_addmm(monkeypatch)
    got = batched_gptq_solve(batched, inplace_update=True)
    # three blocks of 128 columns: after the first two, one update per module (64 rows, the columns left)
    assert sorted(calls) == sorted([(64, 256, -1)] * 3 + [(64, 128, -1)] * 3)
    for e, r in zip(expected, got, strict=True):
        assert r is not None
        for want, have in zip(e[:4], r.values[:4], strict=True):
            assert torch.equal(want, have)
        assert r.values[5] == e[5]
    calls.clear()
    batched_gptq_solve(_tasks(qcfg, n=3, cols=384))
    assert calls == []  # the default: GPTQModel's matmul and subtraction


def test_inplace_update_reaches_every_chunk_and_is_counted(monkeypatch):
    from gptqmodel import QuantizeConfig

    from defuser_quant.integrations.gptqmodel.batched import BatchedSolve

    qcfg = QuantizeConfig(bits=4, group_size=128, act_group_aware=False)
    expected = [t.quantize() for t in _tasks(qcfg, n=8, cols=256)]
    calls = _count_addmm(monkeypatch)
    two = 2 * (3 * 256**2 * 4 + 3 * 64 * 256 * 4)  # the working memory of two 64 x 256 tasks: two a chunk
    settings = BatchedSolve(chunk_bytes=two, inplace_update=True)
    results, sizes, _, coordinator = _share_chunks(monkeypatch, _tasks(qcfg, n=8, cols=256), workers=4,
                                                   settings=settings)
    assert sorted(sizes) == [2, 2, 2, 2]
    assert coordinator.stats.block_updates == Counter({"inplace_addmm": 4})
    assert coordinator.stats.as_dict()["block_updates"] == {"inplace_addmm": 4}
    assert len(calls) == 8  # 256 columns: one update per module, after its first block
    for want, got in zip(expected, results, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(want[:4], got.values[:4], strict=True))
    with pytest.raises(TypeError, match="BatchedSolve.inplace_update must be True or False, got 'yes'"):
        BatchedSolve(inplace_update="yes")
    assert BatchedSolve().inplace_update is False


def test_solve_priority_sets_the_solve_stream_priority_and_is_refused_when_unknown(monkeypatch):
    from defuser_quant.integrations.gptqmodel import batched

    made = []

    class FakeStream:
        def __init__(self, device, priority=0):
            made.append((device, priority))

    monkeypatch.setattr(batched.torch.cuda, "Stream", FakeStream)
    for setting, priority in (("normal", 0), ("high", -1)):
        made.clear()
        coordinator = batched._Coordinator(batched.BatchedSolve(solve_priority=setting))
        device = torch.device("cuda", 0)
        assert coordinator._stream(device) is coordinator._stream(device)  # one stream per device, kept
        assert made == [(device, priority)]
    assert batched.BatchedSolve().solve_priority == "normal"
    with pytest.raises(ValueError, match="BatchedSolve.solve_priority must be one of 'normal', 'high', got 'low'"):
        batched.BatchedSolve(solve_priority="low")
