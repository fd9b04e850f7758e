"""The batched solve's column loop on a device's buffers and replayed from a CUDA graph
(integrations.gptqmodel.loop_graph): the control flow everywhere (a stand-in recorder on the CPU, whose
replays run the loop again into the recorded outputs), and on CUDA real graphs against the eager loop
and GPTQModel's per-module solve, bit for bit (run on the device machine)."""

from __future__ import annotations

import logging

import pytest
import torch

from defuser_quant.integrations.gptqmodel import batched, inverse_graphs, loop_graph
from test_gptqmodel_batched import CONFIGS, _cuda_task_pair, _tasks
from test_gptqmodel_inverse_graphs import assert_same_bits, cuda_chunks, solve_in_turn

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _fresh():
    loop_graph.release()
    yield
    loop_graph.release()


class _StandInRecorder:
    """``inverse_graphs.record`` on the CPU: recording runs the loop once for its outputs (the graph's) and
    puts the arena's buffers back (a real recording runs nothing), each replay runs it again into those
    outputs, then ``change`` (a replay that differs) if set."""

    def __init__(self):
        self.recorded, self.replays, self.pools = 0, 0, []
        self.change = None
        self.fail: BaseException | None = None

    def __call__(self, fn, pool=None):
        if self.fail is not None:
            raise self.fail
        self.pools.append(pool)
        buffer = loop_graph._arenas[CPU].buffer
        before = buffer.clone()
        outputs = fn()
        buffer.copy_(before)
        self.recorded += 1
        recorder = self

        class Graph:
            def replay(self):
                recorder.replays += 1
                for static, fresh in zip(outputs, fn(), strict=True):
                    static.copy_(fresh)
                if recorder.change is not None:
                    recorder.change()

        return Graph(), outputs


@pytest.fixture
def recorder(monkeypatch):
    stand_in = _StandInRecorder()
    monkeypatch.setattr(inverse_graphs, "record", stand_in)
    monkeypatch.setattr(loop_graph, "can_record", lambda device: True)
    monkeypatch.setattr(loop_graph, "_new_pool", lambda: "the arena's pool")
    return stand_in


def _qcfg(name: str):
    from gptqmodel import QuantizeConfig

    return QuantizeConfig(**{"bits": 4, "group_size": 128, **CONFIGS[name]})


def _solve_chunks(qcfg, loop_graphs: bool, sizes=(4, 4, 4), dtype=torch.bfloat16, cols: int = 256,
                  host_results: bool = True) -> list:
    out = []
    for k, n in enumerate(sizes):
        tasks = _tasks(qcfg, n=n, cols=cols, seed=k)
        if dtype != torch.bfloat16:
            for task in tasks:
                task.module.to(dtype)
        out += batched.batched_gptq_solve(tasks, host_results=host_results, loop_graphs=loop_graphs)
    return out


def _assert_same(got: list, want: list) -> None:
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert a is not None and b is not None
        for x, y in zip(a.values[:4], b.values[:4], strict=True):
            assert x.dtype == y.dtype and torch.equal(x, y)
        assert a.values[5] == b.values[5]  # the loss, summed as GPTQModel sums it


@pytest.mark.parametrize("name", ["default (act_group_aware)", "desc_act", "group 256 (two blocks a group)",
                                  "per channel", "asym", "3 bit mse"])
def test_chunks_of_one_shape_record_once_then_replay_with_the_eager_loops_bits(recorder, name):
    qcfg = _qcfg(name)
    want = _solve_chunks(qcfg, loop_graphs=False)
    got = _solve_chunks(qcfg, loop_graphs=True)
    _assert_same(got, want)
    stats = loop_graph.stats().as_dict()
    assert {k: stats[k] for k in ("recorded", "replays", "eager", "refused")} == \
        {"recorded": 1, "replays": 2, "eager": 1, "refused": {}}
    assert stats["arena_bytes"] >= 3 * 4 * 64 * 256 * 4 + 4 * 256 * 256 * 4  # W, Q, losses and the inverses
    assert recorder.recorded == 1 and recorder.pools == ["the arena's pool"]
    (graph,) = loop_graph._arenas[CPU].graphs.values()
    plan, constants = graph.kept  # what the graph reads besides the buffers stays alive with it
    assert isinstance(plan, batched._LoopPlan) and isinstance(plan.maxq, torch.Tensor)
    assert all(isinstance(c, torch.Tensor) for c in constants)


def test_a_replay_that_differs_is_refused_said_once_and_the_eager_loops_values_stay(recorder, caplog):
    qcfg = _qcfg("default (act_group_aware)")
    want = _solve_chunks(qcfg, loop_graphs=False, sizes=(4, 4, 2, 2))
    recorder.change = lambda: loop_graph._arenas[CPU].buffer.fill_(7)  # every buffer, the codes included
    with caplog.at_level(logging.WARNING, logger=loop_graph.__name__):
        got = _solve_chunks(qcfg, loop_graphs=True, sizes=(4, 4, 2, 2))
    _assert_same(got, want)
    stats = loop_graph.stats()
    assert stats.refused == {"the replay differed from the eager loop": 2}  # each shape once, then eager
    assert stats.eager == 4 and stats.replays == 0 and stats.recorded == 0 and recorder.replays == 2
    assert sum("without a CUDA graph" in r.getMessage() for r in caplog.records) == 1


def test_a_recording_that_fails_leaves_the_eager_loop(recorder, caplog):
    qcfg = _qcfg("default (act_group_aware)")
    want = _solve_chunks(qcfg, loop_graphs=False)
    recorder.fail = RuntimeError("operation not permitted when stream is capturing\nmore")
    with caplog.at_level(logging.WARNING, logger=loop_graph.__name__):
        got = _solve_chunks(qcfg, loop_graphs=True)
    _assert_same(got, want)
    stats = loop_graph.stats()
    assert stats.refused == {"recording failed: RuntimeError: operation not permitted when stream is capturing": 1}
    assert stats.eager == 3 and stats.replays == 0
    assert sum("recording failed" in r.getMessage() for r in caplog.records) == 1


def test_a_larger_chunk_makes_a_new_arena_and_drops_the_graphs_on_the_old_one(recorder):
    qcfg = _qcfg("default (act_group_aware)")
    sizes = (2, 2, 4, 4, 2, 2)
    want = _solve_chunks(qcfg, loop_graphs=False, sizes=sizes)
    got = _solve_chunks(qcfg, loop_graphs=True, sizes=sizes)
    _assert_same(got, want)
    stats = loop_graph.stats()
    # 2 recorded, replayed; 4 grows the arena (2's graph dropped), recorded, replayed; 2 again fits: recorded anew
    assert (stats.recorded, stats.replays, stats.eager) == (3, 3, 3)
    _, need4 = loop_graph._offsets([((4, 64, 256), torch.float32)] * 3 + [((4, 256, 256), torch.float32)]
                                   + [((4 * 64, 1), torch.float32)] * 2)
    assert stats.arena_bytes == need4 == loop_graph._arenas[CPU].buffer.numel()


def test_an_interrupted_loop_leaves_the_arena_free_and_unchanged_for_the_next(recorder, monkeypatch):
    qcfg = _qcfg("default (act_group_aware)")
    want = _solve_chunks(qcfg, loop_graphs=False, sizes=(4, 4))
    loop = batched._column_loop
    calls = []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return loop(*args)

    monkeypatch.setattr(batched, "_column_loop", interrupted)
    with pytest.raises(KeyboardInterrupt):
        _solve_chunks(qcfg, loop_graphs=True, sizes=(4,))
    assert not loop_graph._arenas[CPU].lock.locked()
    _assert_same(_solve_chunks(qcfg, loop_graphs=True, sizes=(4, 4)), want)


def test_results_left_on_the_device_are_their_own_not_views_of_the_buffers(recorder):
    """float32 weights in natural order: the codes would be the buffer itself, the scales and zeros the
    graph's outputs, overwritten by the next replay."""
    qcfg = _qcfg("natural order")
    want = _solve_chunks(qcfg, loop_graphs=False, sizes=(3, 3, 3), dtype=torch.float32, host_results=False)
    got = _solve_chunks(qcfg, loop_graphs=True, sizes=(3, 3, 3), dtype=torch.float32, host_results=False)
    _assert_same(got, want)  # the first chunks' results survived the later chunks' loops
    buffer = loop_graph._arenas[CPU].buffer.untyped_storage().data_ptr()
    assert all(r.values[0].untyped_storage().data_ptr() != buffer for r in got)


def test_a_device_constant_is_never_made_while_recording(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    with pytest.raises(RuntimeError, match="not made before the CUDA graph recording"):
        batched._device_constant([5, 4, 3, 2, 1, 0, 9], torch.int32, torch.device("cuda"))
    assert batched._device_constant([5, 4, 3], torch.int32, CPU).tolist() == [5, 4, 3]  # the CPU: no capture


def test_the_setting_is_checked_and_its_counts_reach_the_run_stats(monkeypatch):
    with pytest.raises(TypeError, match="BatchedSolve.loop_graphs must be True or False"):
        batched.BatchedSolve(loop_graphs=1)
    assert batched.BatchedSolve().loop_graphs is False
    original = lambda: None  # noqa: E731
    monkeypatch.setattr(torch.cuda, "empty_cache", original)
    released = []
    monkeypatch.setattr(loop_graph, "release", lambda: released.append(1))
    with batched.batched_solves(batched.BatchedSolve(loop_graphs=True)) as stats:
        assert torch.cuda.empty_cache is not original  # recordings and the allocator's cache emptying exclude each other
    assert stats.loop_graphs == {"recorded": 0, "replays": 0, "eager": 0, "refused": {}, "arena_bytes": 0}
    assert stats.as_dict()["loop_graphs"] == stats.loop_graphs and released == [1]
    with batched.batched_solves(batched.BatchedSolve()) as stats:
        pass
    assert stats.loop_graphs is None and released == [1]


def test_loop_graphs_are_not_asked_for_on_the_cpu():
    assert not loop_graph.can_record(CPU)
    qcfg = _qcfg("default (act_group_aware)")
    _solve_chunks(qcfg, loop_graphs=True, sizes=(2,))
    assert loop_graph.stats().eager == 0 and not loop_graph._arenas


# ----- CUDA (the device machine) -------------------------------------------------------------------------
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
@pytest.mark.parametrize("name", ["default (act_group_aware)", "desc_act", "group 256 (two blocks a group)",
                                  "per channel"])
def test_cuda_loop_graphs_give_gptqmodels_per_module_bits(name):
    """Two chunks of four on a side stream, the second replayed: every value GPTQModel's own."""
    reference, tasks = _cuda_task_pair(_qcfg(name))
    expected = [t.quantize() for t in reference]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    got = []
    with torch.cuda.stream(stream):
        for chunk in (tasks[:4], tasks[4:]):
            got += batched.batched_gptq_solve(chunk, inverse_threads=4, streams="own", rows_kernel=True,
                                              loop_graphs=True)
    stream.synchronize()
    stats = loop_graph.stats()
    assert stats.refused == {} and stats.replays == 1 and stats.recorded == 1, stats
    for e, r in zip(expected, got, strict=True):
        assert r is not None
        for want, have in zip(e[:4], r.values[:4], strict=True):
            assert torch.equal(want, have.to(want.device))
        assert r.values[5] == e[5]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
def test_cuda_chunks_with_both_graphs_are_the_eager_runs_bit_for_bit():
    """Four chunks of 12 modules (pairs sharing a Hessian) at 512 columns, then one of 6, inverses on four
    threads: with loop and inverse graphs every result is the eager run's."""
    chunks = cuda_chunks((12, 12, 12, 12, 6))
    eager = solve_in_turn(chunks)
    graphed = solve_in_turn(chunks, inverse_graphs=True, loop_graphs=True)
    stats = loop_graph.stats()
    assert stats.replays == 3 and stats.recorded == 2 and not stats.refused, stats
    assert_same_bits(graphed, eager)
    assert [r.values[5] for r in graphed] == [r.values[5] for r in eager]  # the losses
    inverse_graphs.release()
