"""``benchmarks/gpu_clock_ramp.py``: the idle-spell probe's summary and its refusals (the measuring needs CUDA)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import gpu_clock_ramp  # noqa: E402


def test_each_spell_is_set_against_the_hot_one():
    points = [{"idle_s": 0.0, "gpu_s": 0.10}, {"idle_s": 1.0, "gpu_s": 0.35}, {"idle_s": 0.5, "gpu_s": 0.10}]
    out = gpu_clock_ramp.summarize(points)
    assert out["0"] == {"gpu_s": 0.1, "extra_s": 0.0, "slowdown": 1.0}
    assert out["1"] == {"gpu_s": 0.35, "extra_s": 0.25, "slowdown": 3.5}
    assert out["0.5"]["extra_s"] == 0.0
    with pytest.raises(ValueError, match="must include 0"):
        gpu_clock_ramp.summarize(points[1:])


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(BENCH / "gpu_clock_ramp.py"), *args], capture_output=True, text=True, timeout=120)


def test_spells_without_the_hot_reference_or_unreadable_are_refused_in_one_line():
    for idle, says in (("1,2", "needs a 0"), ("0,-1", "no negative spell"), ("0,soon", "comma list of seconds")):
        done = run("--idle", idle)
        assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_without_cuda_it_says_so_and_writes_nothing(tmp_path):
    done = run("--output", str(tmp_path / "out.json"))
    assert done.returncode == 2 and "no CUDA device here" in done.stderr
    assert not (tmp_path / "out.json").exists()
