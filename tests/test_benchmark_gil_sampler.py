"""The benchmarks' interpreter-lock sampler (``DQ_GIL_DIR``, ``benchmarks/_gil_sampler.py``): py-spy attached for the
timed block, its lock holders summed per thread and function."""

from __future__ import annotations

import json
import os
import shutil
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _gil_sampler as gil  # noqa: E402
from _profile import maybe_profile  # noqa: E402

RAW = "\n".join([
    "thread (101): MainThread;<module> (bench.py:3);quantize (gptqmodel/base.py:10);load (gptqmodel/turtle.py:5) 30",
    "thread (101): MainThread;<module> (bench.py:3);quantize (gptqmodel/base.py:12);load (gptqmodel/turtle.py:9) 20",
    "thread (102): DPWorker-cpu07;run (threading.py:1);finalize (gptqmodel/proc.py:4);pack (gptqmodel/q.py:2) 40",
    "thread (103): DPWorker-cpu11;run (threading.py:1);finalize (gptqmodel/proc.py:4);finalize (gptqmodel/proc.py:8) 10",
    "thread (104): Reader-3 0",
    "not a sample line",
])


def test_lock_holders_are_summed_per_thread_pool_and_function():
    out = gil.summarize(RAW, rate=100, wall_seconds=2.0)
    assert out["samples"] == 100 and out["gil_seconds"] == 1.0 and out["wall_seconds"] == 2.0
    assert out["by_thread"] == {"MainThread": 0.5, "DPWorker-cpu#": 0.5, "Reader-#": 0.0}  # a pool's threads together
    own = dict(out["own"])
    assert own["load (gptqmodel/turtle.py)"] == 0.5  # the same function on two lines is one function
    assert own["pack (gptqmodel/q.py)"] == 0.4 and own["finalize (gptqmodel/proc.py)"] == 0.1
    inclusive = dict(out["inclusive"])
    assert inclusive["finalize (gptqmodel/proc.py)"] == 0.5  # a recursive frame counts once per sample
    assert inclusive["quantize (gptqmodel/base.py)"] == 0.5 and inclusive["run (threading.py)"] == 0.5
    assert dict(out["by_thread_inclusive"]["DPWorker-cpu#"])["pack (gptqmodel/q.py)"] == 0.4
    assert "quantize (gptqmodel/base.py)" not in dict(out["by_thread_inclusive"]["DPWorker-cpu#"])


def _stand_in(tmp_path: Path, body: str) -> Path:
    """A py-spy stand-in: a Python script run with this interpreter, ``args`` its command line."""
    script = tmp_path / "py-spy"
    script.write_text(f"#!{sys.executable}\nimport signal, sys, time\nargs = sys.argv[1:]\n" + textwrap.dedent(body))
    script.chmod(0o755)
    return script


def test_py_spy_is_attached_for_the_block_and_stopped_with_sigint(tmp_path, monkeypatch):
    seen = tmp_path / "args.json"
    binary = _stand_in(tmp_path, f"""
        import json
        out = args[args.index("--output") + 1]
        stop = []
        signal.signal(signal.SIGINT, lambda *a: stop.append(1))
        open({str(seen)!r}, "w").write(json.dumps(args))
        while not stop:
            time.sleep(0.01)
        open(out, "w").write("thread (1): MainThread;spin (test.py:1) 50\\n")
    """)
    monkeypatch.setenv("DQ_GIL_DIR", str(tmp_path / "gil"))
    monkeypatch.setenv("DQ_PYSPY", str(binary))
    with maybe_profile("run") as sample:
        assert isinstance(sample, gil.GilSample) and sample.summary is None
    args = json.loads(seen.read_text())
    assert args[:3] == ["record", "--pid", str(os.getpid())]
    assert {"--gil", "--threads", "--nonblocking"} <= set(args) and args[args.index("--format") + 1] == "raw"
    assert sample.summary["gil_seconds"] == 50 / gil.RATE and sample.summary["by_thread"] == {"MainThread": 50 / gil.RATE}
    assert json.loads((tmp_path / "gil" / "run.gil.json").read_text()) == sample.summary
    assert (tmp_path / "gil" / "run.gil.txt").exists()


def test_a_py_spy_that_cannot_run_is_reported_and_the_block_still_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("DQ_GIL_DIR", str(tmp_path / "gil"))
    monkeypatch.setenv("DQ_PYSPY", str(_stand_in(tmp_path, 'print("Permission denied (os error 13)"); sys.exit(1)\n')))
    (tmp_path / "gil").mkdir()
    (tmp_path / "gil" / "run.gil.txt").write_text("thread (1): MainThread;old (x.py:1) 9\n")  # an earlier run's stacks
    ran = []
    with maybe_profile("run") as sample:
        ran.append(1)
    assert ran and "py-spy exited 1 without output" in sample.summary["error"]
    assert "Permission denied" in sample.summary["error"]
    monkeypatch.delenv("DQ_PYSPY")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with maybe_profile("run") as sample:
        ran.append(2)
    assert ran == [1, 2] and "no py-spy" in sample.summary["error"]


def test_unset_it_samples_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("DQ_GIL_DIR", raising=False)
    monkeypatch.delenv("DQ_SAMPLE_DIR", raising=False)
    monkeypatch.delenv("DQ_PROFILE_DIR", raising=False)
    monkeypatch.delenv("DQ_TORCH_PROFILE_DIR", raising=False)
    with maybe_profile("run") as sample:
        assert sample is None


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


@pytest.mark.skipif(shutil.which("py-spy") is None and not os.environ.get("DQ_PYSPY"), reason="py-spy not installed")
def test_with_the_real_py_spy_the_spinning_thread_holds_the_lock(tmp_path, monkeypatch):
    monkeypatch.setenv("DQ_GIL_DIR", str(tmp_path))
    sleeper = threading.Thread(target=time.sleep, args=(1.0,), name="Sleeper")
    with maybe_profile("run") as sample:
        sleeper.start()
        _spin(1.0)
        sleeper.join()
    summary = sample.summary
    assert "error" not in summary, summary
    assert summary["by_thread"].get("MainThread", 0) > 0.5 and summary["by_thread"].get("Sleeper", 0) < 0.1
    assert dict(summary["inclusive"]).get("_spin (test_benchmark_gil_sampler.py)", 0) > 0.5
