"""GPTQModel's Hessian inverse calls replayed from CUDA graphs (integrations.gptqmodel.inverse_graphs):
the control flow everywhere (a stand-in graph on the CPU), and on CUDA the replays against the eager
calls bit for bit, alone and inside whole batched solves (run on the device machine)."""

from __future__ import annotations

import logging
import threading

import pytest
import torch

from defuser_quant.integrations.gptqmodel import batched, inverse_graphs

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(autouse=True)
def _fresh():
    inverse_graphs.release()
    yield
    inverse_graphs.release()


def _hessian(n: int, seed: int, device: str = "cpu", dead: int | None = 3) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * n, n, generator=g)
    if dead is not None:
        x[:, dead] = 0
    x = x.to(device)  # the product on the device: at 2048 columns the CPU would take seconds a Hessian
    return x.T @ x / x.shape[0]


def _qcfg(act_group_aware: bool = True):
    from gptqmodel import QuantizeConfig

    return QuantizeConfig(bits=4, group_size=32, act_group_aware=act_group_aware)


def _invert(qcfg, n: int):
    return lambda h: batched._invert_unit(h, qcfg, n, qcfg.group_size, float(qcfg.damp_percent))


class _StandInGraph:
    """Records nothing: each replay calls ``invert`` again (optionally changed), as a graph replays its calls."""

    made: list = []
    change = None  # a function applied to each replay's result
    fail = None  # an exception raised while "recording"

    def __init__(self, example, invert):
        if _StandInGraph.fail is not None:
            raise _StandInGraph.fail
        self.invert = invert
        self.input = example.clone()
        self.replays = 0
        _StandInGraph.made.append(self)

    def replay(self, hessian):
        self.input.copy_(hessian)
        self.replays += 1
        out = self.invert(self.input)
        return _StandInGraph.change(out) if _StandInGraph.change else out


@pytest.fixture
def stand_in(monkeypatch):
    _StandInGraph.made, _StandInGraph.change, _StandInGraph.fail = [], None, None
    monkeypatch.setattr(inverse_graphs, "_Graph", _StandInGraph)
    monkeypatch.setattr(inverse_graphs, "_can_record", lambda h: True)
    return _StandInGraph


def test_without_cuda_every_inverse_is_the_eager_calls_and_nothing_is_recorded():
    qcfg = _qcfg()
    run = inverse_graphs.graphed(_invert(qcfg, 64), ("key",), batched._copy_inverse)
    for seed in range(3):
        got, want = run(_hessian(64, seed)), _invert(qcfg, 64)(_hessian(64, seed))
        assert inverse_graphs.same_bits(got, want)
    assert inverse_graphs.stats().as_dict() == {"recorded": 0, "replays": 0, "eager": 3, "refused": {}}


def test_the_first_hessian_is_eager_then_recorded_checked_and_replayed(stand_in):
    qcfg = _qcfg()
    invert = _invert(qcfg, 64)
    run = inverse_graphs.graphed(invert, ("key",), batched._copy_inverse)
    results = [run(_hessian(64, seed)) for seed in range(4)]
    assert len(stand_in.made) == 1 and stand_in.made[0].replays == 4  # one check replay, then three served
    for seed, got in enumerate(results):
        assert inverse_graphs.same_bits(got, invert(_hessian(64, seed)))
    assert inverse_graphs.stats().as_dict() == {"recorded": 1, "replays": 3, "eager": 1, "refused": {}}
    # each result is the caller's own copy: a later replay does not change an earlier result
    assert results[1].hinv.data_ptr() != results[2].hinv.data_ptr()
    assert not torch.equal(results[1].hinv, results[2].hinv)


def test_each_thread_and_each_shape_records_its_own(stand_in):
    qcfg = _qcfg()
    run = inverse_graphs.graphed(_invert(qcfg, 64), ("key",), batched._copy_inverse)
    run(_hessian(64, 0)), run(_hessian(64, 1))
    other = threading.Thread(target=lambda: (run(_hessian(64, 2)), run(_hessian(64, 3))))
    other.start(), other.join()
    run32 = inverse_graphs.graphed(_invert(qcfg, 32), ("key",), batched._copy_inverse)
    run32(_hessian(32, 0))
    assert len(stand_in.made) == 3
    assert inverse_graphs.stats().recorded == 3 and inverse_graphs.stats().replays == 2


def test_a_replay_that_differs_is_not_kept_said_once_and_the_eager_result_returned(stand_in, caplog):
    qcfg = _qcfg()
    invert = _invert(qcfg, 64)

    def nudged(inv):
        inv.hinv = inv.hinv.clone()
        inv.hinv[0, 0] = torch.nextafter(inv.hinv[0, 0], torch.tensor(float("inf")))  # one ulp: still refused
        return inv

    stand_in.change = nudged
    run = inverse_graphs.graphed(invert, ("key",), batched._copy_inverse)
    with caplog.at_level(logging.WARNING, logger=inverse_graphs.__name__):
        results = [run(_hessian(64, seed)) for seed in range(3)]
    for seed, got in enumerate(results):
        assert inverse_graphs.same_bits(got, invert(_hessian(64, seed)))
    assert len(stand_in.made) == 1  # not recorded again for that thread and shape
    stats = inverse_graphs.stats()
    assert (stats.recorded, stats.replays, stats.eager) == (0, 0, 3)
    assert stats.refused == {"the replay differed from the eager calls": 1}
    assert sum("without a CUDA graph" in r.message for r in caplog.records) == 1


def test_a_recording_that_fails_leaves_the_eager_calls_said_once(stand_in, caplog):
    stand_in.fail = RuntimeError("operation not permitted when stream is capturing\nmore")
    qcfg = _qcfg(act_group_aware=False)
    invert = _invert(qcfg, 64)
    run = inverse_graphs.graphed(invert, ("key",), batched._copy_inverse)
    with caplog.at_level(logging.WARNING, logger=inverse_graphs.__name__):
        got = [run(_hessian(64, seed)) for seed in range(2)]
    assert all(inverse_graphs.same_bits(g, invert(_hessian(64, s))) for s, g in enumerate(got))
    assert inverse_graphs.stats().refused == {
        "recording failed: RuntimeError: operation not permitted when stream is capturing": 1}
    assert [r.message for r in caplog.records if "without a CUDA graph" in r.message] == [
        "Hessian inverses run without a CUDA graph here (recording failed: RuntimeError: operation not permitted "
        "when stream is capturing); results are the same, only slower"]


def test_release_drops_the_graphs_and_a_recording_across_it_is_not_kept(stand_in):
    qcfg = _qcfg()
    invert = _invert(qcfg, 64)
    run = inverse_graphs.graphed(invert, ("key",), batched._copy_inverse)
    run(_hessian(64, 0))
    inverse_graphs.release()
    assert inverse_graphs.stats().as_dict() == {"recorded": 0, "replays": 0, "eager": 0, "refused": {}}
    run(_hessian(64, 1))  # eager again, then recorded afresh
    assert len(stand_in.made) == 2

    class ReleasedWhileRecording(_StandInGraph):
        def __init__(self, example, invert):
            super().__init__(example, invert)
            inverse_graphs.release()  # e.g. the run ended while this thread recorded

    inverse_graphs._Graph = ReleasedWhileRecording
    run2 = inverse_graphs.graphed(invert, ("other",), batched._copy_inverse)
    run2(_hessian(64, 2))
    assert inverse_graphs.stats().recorded == 0 and not inverse_graphs._graphs


def test_the_setting_is_checked_and_its_counts_reach_the_run_stats():
    with pytest.raises(TypeError, match="BatchedSolve.inverse_graphs must be True or False"):
        batched.BatchedSolve(inverse_graphs="yes")
    assert batched.BatchedSolve().inverse_graphs is True  # the default since round 61 (faster on an H200)
    with batched.batched_solves(batched.BatchedSolve()) as stats:
        pass
    assert stats.as_dict()["inverse_graphs"] == {"recorded": 0, "replays": 0, "eager": 0, "refused": {}}
    with batched.batched_solves(batched.BatchedSolve(inverse_graphs=False)) as stats:
        pass
    assert stats.as_dict()["inverse_graphs"] is None


def _wrapped_by_start_inverses(monkeypatch, device: str, streams: str) -> list:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from chunk_phases import make_tasks

    asked = []
    real = inverse_graphs.graphed
    monkeypatch.setattr(inverse_graphs, "graphed", lambda invert, key, copy: asked.append(key) or real(invert, key, copy))
    tasks = make_tasks(32, 128, 4, 64, device, share=2)
    stream = torch.cuda.Stream() if device == "cuda" else None
    with torch.cuda.stream(stream) if stream is not None else torch.no_grad():
        ahead = batched.start_inverses(tasks, 2, streams, background=True, graphs=True)
        assert len(ahead.collect()) == 2
    return asked


def test_graphs_are_not_asked_for_on_the_cpu(monkeypatch):
    assert _wrapped_by_start_inverses(monkeypatch, "cpu", "own") == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
def test_graphs_are_asked_for_only_with_own_streams_on_cuda(monkeypatch):
    """On CUDA only "own" streams replay graphs; with "caller" streams (deterministic runs, every
    inverse on the solving worker's stream in GPTQModel's order) the eager calls run."""
    assert _wrapped_by_start_inverses(monkeypatch, "cuda", "own") == [(False, True, 128, 128, 0.05)]
    assert _wrapped_by_start_inverses(monkeypatch, "cuda", "caller") == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
@pytest.mark.parametrize("n", [2048, 768])
@pytest.mark.parametrize("act_group_aware", [True, False])
def test_cuda_replays_give_the_eager_calls_bits(n, act_group_aware):
    from gptqmodel import QuantizeConfig

    qcfg = QuantizeConfig(bits=4, group_size=128, act_group_aware=act_group_aware)
    invert = lambda h: batched._invert_unit(h, qcfg, n, 128, float(qcfg.damp_percent))  # noqa: E731
    run = inverse_graphs.graphed(invert, ("k", act_group_aware), batched._copy_inverse)
    hessians = [_hessian(n, seed, "cuda", dead=seed if seed % 2 else None) for seed in range(5)]
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        got = [run(h) for h in hessians]
        want = [invert(h) for h in hessians]
    stream.synchronize()
    assert inverse_graphs.stats().as_dict() == {"recorded": 1, "replays": 4, "eager": 1, "refused": {}}
    assert all(inverse_graphs.same_bits(a, b) for a, b in zip(got, want))
    assert bool(got[1].dead[1]) and not bool(got[2].dead.any())


def cuda_chunks(sizes: tuple[int, ...]) -> list[list]:
    """One chunk of GPTQ tasks per size, 256 x 512 on CUDA, pairs sharing a Hessian (the benchmarks' tasks)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from chunk_phases import make_tasks

    return [make_tasks(256, 512, n, 1024, "cuda", seed=k, share=2) for k, n in enumerate(sizes)]


def solve_in_turn(chunks: list[list], **options) -> list:
    """Each chunk's batched solve (four inverse threads, the rows kernel) on one side stream, waited for
    before the next as a GPTQModel worker waits; every chunk's results, in order."""
    out = []
    stream = torch.cuda.Stream()
    for tasks in chunks:
        with torch.cuda.stream(stream):
            out += batched.batched_gptq_solve(tasks, inverse_threads=4, host_results=True, streams="own",
                                              rows_kernel=True, **options)
        stream.synchronize()
    return out


def assert_same_bits(got: list, want: list) -> None:
    """Two runs' results: codes, scales, zeros and ``g_idx`` equal bit for bit."""
    for a, b in zip(got, want, strict=True):
        for x, y in zip(a.values[:4], b.values[:4]):
            assert torch.equal(inverse_graphs._bits(x.cpu()), inverse_graphs._bits(y.cpu()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
def test_cuda_batched_solves_with_and_without_graphs_are_bit_identical():
    """Three chunks of 12 modules (pairs sharing a Hessian), inverses ahead on four threads as the
    coordinator starts them: with graphs every result is the eager run's, bit for bit."""
    chunks = cuda_chunks((12, 12, 12))
    eager = solve_in_turn(chunks, inverse_graphs=False)
    graphed = solve_in_turn(chunks, inverse_graphs=True)
    stats = inverse_graphs.stats()
    assert stats.replays > 0 and not stats.refused
    assert_same_bits(graphed, eager)


class _FakeCUDAGraph:
    """torch.cuda.CUDAGraph's recording calls, each recorded; ``end_fails``: capture_end raises as it does
    after a capture that a synchronizing call invalidated."""

    def __init__(self, end_fails: bool):
        self.end_fails, self.calls = end_fails, []

    def capture_begin(self, pool=None, capture_error_mode=None):
        assert inverse_graphs._record_lock.locked()  # recordings hold the lock empty_cache waits for
        self.calls.append(("begin", capture_error_mode))

    def capture_end(self):
        self.calls.append(("end",))
        if self.end_fails:
            raise RuntimeError("CUDA error: operation failed due to a previous error during capture")

    def pool(self):
        return (7, 3)


@pytest.fixture
def fake_cuda(monkeypatch):
    """A fake graph per recording and the allocator's two calls, recorded."""
    made, released = [], []

    def new_graph(end_fails=False):
        made.append(_FakeCUDAGraph(end_fails))
        return made[-1]

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch._C, "_cuda_endAllocateToPool", lambda d, p: released.append(("end", d, p)), raising=False)
    monkeypatch.setattr(torch._C, "_cuda_releasePool", lambda d, p: released.append(("release", d, p)), raising=False)
    return made, released, new_graph


@pytest.mark.parametrize("invert_fails, end_fails, handed_back", [
    (False, False, False),  # recorded: the graph object releases its pool when dropped
    (True, False, False),  # a Python error inside a capture that is still whole: capture_end did it all
    (True, True, True),  # a call that synchronized: the capture is invalid, capture_end raises before the allocator
    (False, True, True),
])
def test_a_failed_recording_ends_its_capture_in_the_allocator_and_frees_its_pool(monkeypatch, fake_cuda,
                                                                                   invert_fails, end_fails, handed_back):
    made, released, new_graph = fake_cuda
    monkeypatch.setattr(inverse_graphs, "_new_graph", lambda: new_graph(end_fails))

    def invert(h):
        if invert_fails:
            raise RuntimeError("operation not permitted when stream is capturing")
        return h * 2

    if invert_fails or end_fails:
        with pytest.raises(RuntimeError):
            inverse_graphs._Graph(torch.ones(3), invert)
    else:
        graph = inverse_graphs._Graph(torch.ones(3), invert)
        assert torch.equal(graph.output, torch.full((3,), 2.0))
    assert made[0].calls[0] == ("begin", "thread_local") and made[0].calls[1:] == [("end",)]
    assert released == ([("end", 0, (7, 3)), ("release", 0, (7, 3))] if handed_back else [])
    assert not inverse_graphs._record_lock.locked()


def test_empty_cache_waits_for_a_recording_and_is_put_back(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(threading.current_thread().name))
    original = torch.cuda.empty_cache
    with inverse_graphs.guarded_empty_cache():
        assert torch.cuda.empty_cache is not original
        inverse_graphs._record_lock.acquire()  # a recording under way
        caller = threading.Thread(target=torch.cuda.empty_cache, name="janitor")
        caller.start()
        caller.join(0.2)
        assert caller.is_alive() and emptied == []  # it waits
        inverse_graphs._record_lock.release()
        caller.join(5)
        assert emptied == ["janitor"]
    assert torch.cuda.empty_cache is original
    with pytest.raises(KeyboardInterrupt), inverse_graphs.guarded_empty_cache():
        raise KeyboardInterrupt  # Ctrl-C inside the run: put back all the same
    assert torch.cuda.empty_cache is original
    replaced = lambda: None  # noqa: E731
    with inverse_graphs.guarded_empty_cache():
        torch.cuda.empty_cache = replaced  # someone else's wrapper, installed inside: left in place
    assert torch.cuda.empty_cache is replaced


def test_the_batched_solves_guard_empty_cache_unless_both_graphs_are_off(monkeypatch):
    original = lambda: None  # noqa: E731
    monkeypatch.setattr(torch.cuda, "empty_cache", original)
    with batched.batched_solves(batched.BatchedSolve()):
        assert torch.cuda.empty_cache is not original
    assert torch.cuda.empty_cache is original
    with batched.batched_solves(batched.BatchedSolve(inverse_graphs=False)):
        assert torch.cuda.empty_cache is original
