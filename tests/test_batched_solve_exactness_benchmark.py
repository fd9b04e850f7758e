"""benchmarks/batched_solve_exactness.py: the batched solve against GPTQModel's per-module solve (CPU smoke run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "batched_solve_exactness.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import batched_solve_exactness as bench  # noqa: E402


@pytest.mark.parametrize("deterministic,plugin_settings,workers,inplace", [(False, False, False, False),
                                                                           (True, True, False, False),
                                                                           (False, True, True, True)])
def test_tiny_cpu_run_is_exact_with_the_paths_the_plugin_takes(tmp_path, deterministic, plugin_settings, workers,
                                                               inplace):
    pytest.importorskip("gptqmodel")
    out = tmp_path / "exactness.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    flags = (["--deterministic"] if deterministic else []) + (["--inverse-threads", "4", "--host-results"]
                                                             if plugin_settings else []) + (
        ["--on-worker-threads"] if workers else []) + (["--inplace-update", "--rows-kernel"] if inplace else [])
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--output", str(out), *flags],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    data = json.loads(out.read_text())
    assert data["deterministic"] is deterministic and data["shape"] == bench.TINY
    assert (data["cublas_workspace_config"] == ":4096:8") if deterministic else True
    assert (data["inverse_threads"], data["host_results"]) == ((4, True) if plugin_settings else (1, False))
    assert data["on_worker_threads"] is workers
    assert data["inplace_update"] is inplace and data["rows_kernel"] is inplace  # the rows kernel: CUDA only
    # the plugin's default streams: the caller's under deterministic algorithms, each thread's own otherwise
    assert (data["streams"], data["streams_ran"]) == ("auto", "caller" if deterministic else "own")
    side = ["worker"] if workers else ["main"]
    assert data["solves_ran_on"] == {"reference": side, "plugin": side}
    attention, experts = data["results"]["attention"], data["results"]["experts"]
    # q alone in its shape (per module), k/v batched on the factor of the Hessian they adopted from q
    assert attention["paths"] == {"per module": 1, "batched_torch@cpu": 2}
    assert experts["paths"] == {"batched_torch@cpu": 3 * bench.TINY["experts"]}
    for result in (attention, experts):
        assert result["all_equal"] and result["qweights_equal"] == result["modules"] and result["unequal"] == []
        assert result["max_rel_scale_diff"] == 0.0


def test_compare_names_each_unequal_module():
    import torch

    a = (torch.ones(2, 4), torch.ones(2, 1), torch.zeros(2, 1), torch.zeros(4), 0.0, 1.5)
    b = (torch.ones(2, 4), torch.full((2, 1), 1.25), torch.zeros(2, 1), torch.zeros(4), 0.0, 1.5)
    result = bench.compare({"m0": a, "m1": a}, {"m0": a, "m1": b}, {"m0": "per module", "m1": "batched_torch@cpu"})
    assert result["qweights_equal"] == 2 and not result["all_equal"] and result["max_rel_scale_diff"] == 0.25
    assert [(u["module"], u["scale"], u["q"]) for u in result["unequal"]] == [("m1", False, True)]


def test_bad_arguments_are_refused_in_one_line(capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--experts", "1"])
    assert "--experts must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--inverse-threads", "0"])
    assert "--inverse-threads must be >= 1" in capsys.readouterr().err


def test_on_fresh_thread_runs_off_the_main_thread_and_raises_what_it_raised():
    import threading

    import _threads

    assert bench.on_fresh_thread is _threads.on_fresh_thread  # the shared helper, not a copy
    assert _threads.on_fresh_thread(lambda: threading.current_thread() is threading.main_thread()) is False
    with pytest.raises(ValueError, match="boom"):
        _threads.on_fresh_thread(lambda: (_ for _ in ()).throw(ValueError("boom")))
