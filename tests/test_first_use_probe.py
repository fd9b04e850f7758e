"""``benchmarks/first_use_probe.py``: its fresh-process timings of the solve steps (plumbing on the CPU) and refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("gptqmodel")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "first_use_probe.py"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_each_fresh_process_times_every_step_of_both_orders(tmp_path):
    from defuser_quant.integrations.gptqmodel.solve_warmup import STEPS

    out = tmp_path / "probe.json"
    done = run("--device", "cpu", "--rows", "64", "--columns", "256", "--output", str(out))
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["command"].endswith("--device cpu --rows 64 --columns 256 --output " + str(out))
    for run_name in ("cold", "warm", "rehearsal", "rehearsed"):
        assert set(result[run_name]) == {*STEPS, "total"} and all(v >= 0 for v in result[run_name].values())


def test_bad_sizes_and_a_machine_without_cuda_get_one_line():
    done = run("--device", "cpu", "--columns", "100")
    assert done.returncode == 2 and "a multiple of 128" in done.stderr and "Traceback" not in done.stderr
    if not torch.cuda.is_available():
        done = run()
        assert done.returncode == 2 and "no CUDA device here" in done.stderr
