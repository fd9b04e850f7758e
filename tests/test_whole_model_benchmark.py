"""benchmarks/whole_model_gpu.py: the tiny whole-model runs on the CPU, the layer clock and the deadline.

The script runs in a fresh process each time (it patches llm-compressor's / GPTQModel's module
attributes for its own run). Exit codes: 0 complete, 4 stopped at the deadline with a partial JSON.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "whole_model_gpu.py"
sys.path.insert(0, str(ROOT / "benchmarks"))
import whole_model_gpu as bench  # noqa: E402


def _run(tmp_path: Path, backend: str, *flags: str) -> tuple[int, dict, str]:
    pytest.importorskip("llmcompressor" if backend == "llmcompressor" else "gptqmodel")
    out = tmp_path / f"{backend}.json"
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--backend", backend, "--device", "cpu", "--tiny", "--output", str(out),
                           *flags], env=env, capture_output=True, text=True, timeout=240)
    log = (proc.stdout + proc.stderr)[-4000:]
    assert out.exists(), log
    return proc.returncode, json.loads(out.read_text()), log


def _check_complete(rc: int, data: dict, log: str, layers: int) -> None:
    tiny = bench.TINY
    assert rc == bench.EXIT_OK, log
    assert data["status"] == "complete" and data["error"] is None and data["stopped"] is None
    assert data["layers"]["done"] == layers == len(data["layers"]["seconds"])
    assert all(s > 0 for s in data["layers"]["seconds"])
    # the layers lie inside the quantize stage (llm-compressor's also holds set-up and tracing)
    assert sum(data["layers"]["seconds"]) <= data["stages_s"]["quantize"] + 0.05
    expected = layers * tiny["experts"] * 3
    assert data["expert_projections"] == data["expert_projections_quantized"] == data["expert_projections_expected"] == expected
    assert data["all_experts_quantized"] is True and data["checkpoint_bytes"] > 0
    cov = data["coverage_totals"]
    # routed mode: every token reaches top_k experts in every layer, none forced
    assert cov["layers"] == layers and cov["experts"] == layers * tiny["experts"] and cov["forced_tokens"] == 0
    assert cov["routed_tokens"] == cov["calibrated_tokens"] == layers * tiny["samples"] * tiny["seq_len"] * tiny["top_k"]
    assert {"imports", "calibration_data", "build", "quantize", "save"} <= set(data["stages_s"])
    assert data["peak_rss_bytes"] > 0 and data["versions"]["torch"] and data["command"].endswith(f"--layers {layers}")
    proj = data["projection"]
    assert proj["label"].startswith("PROJECTION") and "all_layers_quantize_s" not in proj
    assert proj["per_layer_s_used"] == pytest.approx(statistics.median(data["layers"]["seconds"]), abs=1e-3)


@pytest.mark.slow
def test_llmcompressor_tiny_whole_model_complete(tmp_path):
    rc, data, log = _run(tmp_path, "llmcompressor", "--layers", "2")
    _check_complete(rc, data, log, layers=2)
    assert data["grouped_use"]["grouped"] > 0 and data["grouped_use"]["fallbacks"] == {}
    assert data["llmcompressor_stages"]["solve"]["calls"] >= 2


@pytest.mark.slow
def test_gptqmodel_tiny_whole_model_complete(tmp_path):
    rc, data, log = _run(tmp_path, "gptqmodel", "--layers", "2")
    _check_complete(rc, data, log, layers=2)
    assert data["solve"]["batched_modules"] > 0
    assert data["kernels"] and data["quant_linear_after_quantize"]


@pytest.mark.slow
def test_deadline_stops_at_a_layer_boundary_with_a_labelled_projection(tmp_path):
    # the first layer always runs; the second would end past deadline - reserve = 0.1 s: refused
    rc, data, log = _run(tmp_path, "llmcompressor", "--layers", "3", "--deadline", "60", "--reserve", "59.9")
    assert rc == bench.EXIT_DEADLINE, log
    assert data["status"] == "partial" and "layer 1 not started" in data["stopped"]
    assert data["layers"]["done"] == 1 and len(data["layers"]["seconds"]) == 1
    assert "expert_projections" not in data and "checkpoint_bytes" not in data  # nothing measured that was not
    proj = data["projection"]
    assert proj["label"] == "PROJECTION (not a measurement)"
    assert proj["all_layers_quantize_s"] == pytest.approx(3 * data["layers"]["seconds"][0], abs=0.1)


@pytest.mark.slow
def test_watchdog_writes_a_partial_result_at_the_deadline(tmp_path):
    rc, data, log = _run(tmp_path, "llmcompressor", "--deadline", "0.01")
    assert rc == bench.EXIT_DEADLINE, log
    assert data["status"] == "partial" and data["error"].startswith("watchdog")
    assert data["layers"]["done"] == 0 and "all_layers_quantize_s" not in data["projection"]


class _Layers(torch.nn.Module):
    def __init__(self, n: int):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Identity() for _ in range(n))


def test_layer_clock_times_layers_once_and_refuses_after_the_deadline():
    model = _Layers(3)
    t0 = time.perf_counter()
    clock = bench.LayerClock(total=3, t0=t0, deadline=1000.0)
    clock.attach(list(model.layers))
    x = torch.zeros(1)
    model.layers[0](x)
    time.sleep(0.05)
    model.layers[0](x)  # a second batch of the running layer: not a new start
    model.layers[1](x)
    assert len(clock.starts) == 2 and clock.seconds()[0] >= 0.05
    with pytest.raises(RuntimeError, match="layer 2 started before layer 0"):
        bench.LayerClock(total=3, t0=t0, deadline=1000.0).enter(2)
    clock.deadline = time.perf_counter() - t0  # now: layer 2 would end past it
    with pytest.raises(bench.DeadlineReached):
        model.layers[2](x)
    assert clock.stopped and len(clock.seconds()) == 2  # layer 1 ended when layer 2 was refused
    with pytest.raises(bench.DeadlineReached):
        model.layers[1](x)  # every later call too
    clock.detach()
    model.layers[2](x)
    with pytest.raises(RuntimeError, match="expected 3"):
        clock.attach(list(model.layers)[:2])


def test_deepseek_projection_scales_the_median_layer_by_experts_times_gemm_size():
    args = bench.parse_args(["--backend", "llmcompressor"])
    assert (args.layers, args.experts, args.hidden, args.intermediate) == (48, 128, 2048, 768)
    proj = bench.projection(args, [10.0, 6.0, 7.0], layers_done=3)
    ds = bench.DEEPSEEK_V3
    factor = (ds["routed_experts"] + ds["shared_experts"]) * ds["hidden"] * ds["intermediate"] / (128 * 2048 * 768)
    assert proj["deepseek_v3"]["per_layer_s"] == pytest.approx(7.0 * factor, abs=0.1)
    assert proj["deepseek_v3"]["quantize_s"] == pytest.approx(7.0 * factor * ds["layers"], abs=1)
    assert proj["all_layers_quantize_s"] == pytest.approx(23.0 + 45 * 7.0)
    assert bench.projection(args, [], layers_done=0)["label"].startswith("PROJECTION")
