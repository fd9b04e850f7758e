"""The benchmarks' wall-clock stack sampler (``DQ_SAMPLE_DIR``): every thread, named, with the
functions it spent its time in, as ``maybe_profile`` writes it."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _profile import maybe_profile  # noqa: E402


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def _worker_waits(done: threading.Event) -> None:
    done.wait()


def _seconds(report: str, thread: str, section: str, label: str) -> float:
    """The seconds ``report`` gives ``label`` in ``thread``'s ``section`` (inclusive or self)."""
    block = report.split(f"## thread {thread}:")[1].split("\n## thread ")[0]
    part = block.split(f"### {section}\n")[1].split("###")[0]
    for line in part.splitlines():
        if line.strip().endswith(label):
            return float(line.split()[0])
    return 0.0


def test_sampler_names_each_threads_time(tmp_path, monkeypatch):
    monkeypatch.setenv("DQ_SAMPLE_DIR", str(tmp_path))
    done = threading.Event()
    worker = threading.Thread(target=_worker_waits, args=(done,), name="Waiter")
    with maybe_profile("run"):
        worker.start()
        _spin(0.6)
        done.set()
        worker.join()
    report = (tmp_path / "run.sampled.txt").read_text()
    assert report.startswith("# wall ")
    # The main thread spun for ~0.6 s; the worker spent that time waiting on its event.
    assert _seconds(report, "MainThread", "inclusive", "test_benchmark_sampler.py:_spin") > 0.3
    assert _seconds(report, "Waiter", "inclusive", "test_benchmark_sampler.py:_worker_waits") > 0.3
    assert _seconds(report, "Waiter", "inclusive", "test_benchmark_sampler.py:_spin") == 0.0
    stacks = (tmp_path / "run.stacks.txt").read_text().splitlines()
    assert any(line.startswith("MainThread;") and "test_benchmark_sampler.py:_spin" in line for line in stacks)
    assert all(line.rsplit(" ", 1)[1].isdigit() for line in stacks)  # flamegraph input: "stack count"


def test_the_tail_from_the_runs_mark_is_reported_alone(tmp_path, monkeypatch):
    monkeypatch.setenv("DQ_SAMPLE_DIR", str(tmp_path))
    with maybe_profile("run") as sampler:
        _spin(0.4)
        sampler.since = time.perf_counter()
        _spin_after_the_mark(0.4)
    whole = (tmp_path / "run.sampled.txt").read_text()
    tail = (tmp_path / "run.tail.sampled.txt").read_text()
    assert "(the tail: from the mark the run set on)" in tail.splitlines()[0]
    assert float(tail.split()[2]) == pytest.approx(0.4, abs=0.15)  # "# wall 0.40 s": from the mark on
    # The spin before the mark is in the whole run's report only; the tail's work in both.
    assert _seconds(whole, "MainThread", "inclusive", "test_benchmark_sampler.py:_spin") > 0.2
    assert _seconds(tail, "MainThread", "inclusive", "test_benchmark_sampler.py:_spin") == 0.0
    assert _seconds(tail, "MainThread", "inclusive", "test_benchmark_sampler.py:_spin_after_the_mark") > 0.2


def test_the_ticks_share_one_object_per_distinct_sample():
    from _sampler import StackSampler

    sampler = StackSampler(0.002).start()
    _spin(0.2)
    sampler.stop()
    mine = [key for tick in sampler.by_tick for key in tick if key[0] == "MainThread"]
    assert len(mine) > 10
    assert len({id(key) for key in mine}) == len(set(mine))  # equal samples are the same object


def test_without_a_mark_there_is_no_tail_report(tmp_path, monkeypatch):
    monkeypatch.setenv("DQ_SAMPLE_DIR", str(tmp_path))
    with maybe_profile("run") as sampler:
        _spin(0.1)
    assert sampler.since is None and (tmp_path / "run.sampled.txt").exists()
    assert not (tmp_path / "run.tail.sampled.txt").exists()


def _spin_after_the_mark(seconds: float) -> None:
    """``_spin`` under another name, so the reports tell the two apart."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_without_the_variable_nothing_is_sampled(tmp_path, monkeypatch):
    for name in ("DQ_SAMPLE_DIR", "DQ_PROFILE_DIR", "DQ_TORCH_PROFILE_DIR"):
        monkeypatch.delenv(name, raising=False)
    before = threading.active_count()
    with maybe_profile("run"):
        assert threading.active_count() == before  # no sampler thread started
    assert not list(tmp_path.iterdir())


def test_cprofile_also_profiles_gptqmodels_finalizes_on_their_worker_threads(tmp_path, monkeypatch):
    pytest.importorskip("gptqmodel")
    from gptqmodel.looper.gptq_processor import GPTQProcessor

    def finalize(self, module, model):  # stands in for GPTQModel's finalize of one module
        _spin(0.02)
        return module

    monkeypatch.setattr(GPTQProcessor, "submodule_finalize", finalize)
    monkeypatch.setenv("DQ_PROFILE_DIR", str(tmp_path))
    with maybe_profile("run"):
        assert GPTQProcessor.submodule_finalize is not finalize  # profiled while the block runs
        workers = [threading.Thread(target=lambda: GPTQProcessor.submodule_finalize(None, "m", None), name=f"w{i}")
                   for i in range(2)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
    assert GPTQProcessor.submodule_finalize is finalize  # restored
    text = (tmp_path / "run.finalize.txt").read_text()
    assert text.startswith("# 2 finalize worker threads") and "_spin" in text and "finalize" in text
    assert (tmp_path / "run.finalize.prof").is_file() and (tmp_path / "run.txt").is_file()


def test_from_python_3_12_one_profiler_records_every_thread_and_no_finalize_profiler_is_started(tmp_path, monkeypatch):
    """Python 3.12's cProfile allows one active profiler per process: a finalize worker enabling its own raised
    "Another profiling tool is already active" and killed the H200 run (round 35b)."""
    pytest.importorskip("gptqmodel")
    import _profile
    from gptqmodel.looper.gptq_processor import GPTQProcessor

    original = GPTQProcessor.submodule_finalize
    monkeypatch.setattr(_profile, "PER_THREAD", False)
    monkeypatch.setenv("DQ_PROFILE_DIR", str(tmp_path))
    monkeypatch.delenv("DQ_SAMPLE_DIR", raising=False)
    monkeypatch.delenv("DQ_TORCH_PROFILE_DIR", raising=False)
    with maybe_profile("run"):
        assert GPTQProcessor.submodule_finalize is original  # nothing enables a second profiler
        _spin(0.02)
    text = (tmp_path / "run.txt").read_text()
    assert text.startswith(_profile.ALL_THREADS_NOTE) and "_spin" in text
    assert not (tmp_path / "run.finalize.txt").exists()
