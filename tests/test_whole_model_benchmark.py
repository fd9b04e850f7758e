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


def _check_complete(rc: int, data: dict, log: str, layers: int, routing: str = "routed") -> None:
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
    cov, tokens = data["coverage_totals"], layers * tiny["samples"] * tiny["seq_len"]
    assert data["routing"] == routing and f"{routing} grouped" in data["variant_is"]
    assert cov["layers"] == layers and cov["experts"] == layers * tiny["experts"]
    # every token reaches its top_k experts in every layer; in 'all' every other expert sees it too (forced)
    assert cov["routed_tokens"] == tokens * tiny["top_k"]
    forced = 0 if routing == "routed" else tokens * (tiny["experts"] - tiny["top_k"])
    assert cov["forced_tokens"] == forced and cov["calibrated_tokens"] == cov["routed_tokens"] + forced
    assert {"imports", "calibration_data", "build", "quantize", "save"} <= set(data["stages_s"])
    assert data["peak_rss_bytes"] > 0 and data["versions"]["torch"] and f"--layers {layers}" in data["command"]
    proj = data["projection"]
    assert proj["label"].startswith("PROJECTION") and "all_layers_quantize_s" not in proj
    assert proj["per_layer_s_used"] == pytest.approx(statistics.median(data["layers"]["seconds"]), abs=1e-3)


@pytest.mark.slow
def test_llmcompressor_tiny_whole_model_complete(tiny_runs):
    rc, data, log, _ = tiny_runs["llmc_ours"]
    _check_complete(rc, data, log, layers=3)
    assert data["grouped_use"]["grouped"] > 0 and data["grouped_use"]["fallbacks"] == {}
    assert data["llmcompressor_stages"]["solve"]["calls"] >= 2


@pytest.mark.slow
def test_llmcompressor_tiny_whole_model_routing_all(tmp_path):
    """``--routing all``: every expert calibrated on every token, as stock llm-compressor calibrates."""
    rc, data, log = _run(tmp_path, "llmcompressor", "--layers", "2", "--routing", "all")
    _check_complete(rc, data, log, layers=2, routing="all")
    assert data["grouped_use"]["grouped"] > 0 and data["grouped_use"]["fallbacks"] == {}


def test_routing_is_ours_setting_and_names_the_output(capsys):
    args = bench.parse_args(["--backend", "llmcompressor", "--device", "cpu", "--tiny", "--routing", "all"])
    assert args.routing == "all" and bench.default_output(args).name == "whole_model_llmcompressor_all_cpu_tiny.json"
    assert bench.parse_args(["--backend", "gptqmodel", "--device", "cpu", "--tiny"]).routing == "routed"
    assert bench.parse_args(["--backend", "gptqmodel", "--stock", "--device", "cpu", "--tiny"]).routing is None
    with pytest.raises(SystemExit):
        bench.parse_args(["--backend", "llmcompressor", "--stock", "--routing", "all"])
    assert "--routing is ours' setting" in capsys.readouterr().err
    assert set(bench.STOCK_ROUTING) == {"llmcompressor", "gptqmodel"}


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


# ----- --stock: the backends as shipped, and whole_model_compare.py --------------------------------
import whole_model_compare as cmp  # noqa: E402

COMPARE = ROOT / "benchmarks" / "whole_model_compare.py"


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory):
    """Real tiny CPU runs: llm-compressor stock and ours (3 layers), GPTQModel stock (2 layers)."""
    runs = {}
    for key, backend, flags in (("llmc_stock", "llmcompressor", ("--stock", "--layers", "3")),
                                ("llmc_ours", "llmcompressor", ("--layers", "3")),
                                ("gptq_stock", "gptqmodel", ("--stock", "--layers", "2"))):
        path = tmp_path_factory.mktemp(key)
        rc, data, log = _run(path, backend, *flags)
        runs[key] = (rc, data, log, path / f"{backend}.json")
    return runs


def _check_stock(rc: int, data: dict, log: str, layers: int) -> None:
    assert rc == bench.EXIT_OK, log
    assert data["variant"] == "stock" and data["status"] == "complete" and data["error"] is None
    assert data["layers"]["done"] == layers == len(data["layers"]["seconds"]) and all(s > 0 for s in data["layers"]["seconds"])
    expected = layers * bench.TINY["experts"] * 3
    assert data["expert_projections"] == data["expert_projections_quantized"] == expected
    assert data["all_experts_quantized"] is True and data["checkpoint_bytes"] > 0
    assert data["coverage_totals"] is None and "no coverage report" in data["coverage_is"]
    assert "--stock" in data["command"] and data["projection"]["label"].startswith("PROJECTION")


@pytest.mark.slow
def test_llmcompressor_stock_is_llmcompressor_as_shipped(tiny_runs):
    rc, data, log, _ = tiny_runs["llmc_stock"]
    _check_stock(rc, data, log, layers=3)
    # llm-compressor's own linearization ran, not ours (importing our integration would replace it)
    assert data["experts_classes"] == ["llmcompressor.modeling.moe.linear_experts.LinearExperts2D"]
    assert "defuser_quant.core.defuse" not in log and data["grouped_use"] is None
    assert data["llmcompressor_stages"]["linearize"]["calls"] == 1
    ours_rc, ours, ours_log, _ = tiny_runs["llmc_ours"]
    assert ours_rc == bench.EXIT_OK, ours_log
    assert ours["variant"] == "ours" and ours["coverage_totals"] is not None
    assert not any(c.startswith("llmcompressor.") for c in ours["experts_classes"])
    assert ours["expert_projections_quantized"] == data["expert_projections_quantized"]


@pytest.mark.slow
def test_gptqmodel_stock_is_gptqmodel_as_shipped(tiny_runs):
    rc, data, log, _ = tiny_runs["gptq_stock"]
    _check_stock(rc, data, log, layers=2)
    assert data["gptqmodel_hooks"]["gptqmodel.models.loader.defuser"] == "defuser"
    assert all(bench._stock_origin(where) for where in data["gptqmodel_hooks"].values())
    assert data["solve"] is None and data["kernels"] and data["quant_linear_after_quantize"]
    assert data["build_parts_s"]["build_on_device"] > 0  # the random build replaced the weight loading
    args = bench.parse_args(["--backend", "gptqmodel", "--device", "cpu", "--tiny"])
    assert (data["batch_size"], data["gptq_kernel"]) == (args.batch_size, args.gptq_kernel)


def test_stock_origin_refuses_our_plugin():
    assert bench._stock_origin("defuser") and bench._stock_origin("gptqmodel.models.loader._convert_model_with_defuser")
    assert not bench._stock_origin("defuser_quant.integrations.gptqmodel.loader.DefuserQuantShim")


def test_stock_blocks_our_llmcompressor_integration(monkeypatch):
    monkeypatch.delitem(sys.modules, bench.LLMC_INTEGRATION, raising=False)
    bench.block_llmcompressor_integration()
    with pytest.raises(ImportError):
        import defuser_quant.integrations.llmcompressor  # noqa: F401
    monkeypatch.setitem(sys.modules, bench.LLMC_INTEGRATION, object())
    with pytest.raises(RuntimeError, match="already imported"):
        bench.block_llmcompressor_integration()


def test_stock_output_name_and_variant_flag():
    args = bench.parse_args(["--backend", "gptqmodel", "--stock", "--device", "cpu", "--tiny"])
    assert args.stock and bench.default_output(args).name == "whole_model_gptqmodel_stock_cpu_tiny.json"
    args = bench.parse_args(["--backend", "gptqmodel", "--device", "cpu", "--tiny"])
    assert not args.stock and bench.default_output(args).name == "whole_model_gptqmodel_cpu_tiny.json"


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gptqmodel", "llmcompressor"])
def test_stock_deadline_stops_with_a_partial_result(tmp_path, backend):
    # GPTQModel's finalize threads are still busy at the stop: the exit must still be 4, not an abort
    rc, data, log = _run(tmp_path, backend, "--stock", "--layers", "3", "--deadline", "60", "--reserve", "59.9")
    assert rc == bench.EXIT_DEADLINE, log
    assert data["variant"] == "stock" and data["status"] == "partial" and "layer 1 not started" in data["stopped"]
    assert data["layers"]["done"] == 1 and "expert_projections" not in data
    assert data["projection"]["all_layers_quantize_s"] == pytest.approx(3 * data["layers"]["seconds"][0], abs=0.1)


def _compare_cli(tmp_path: Path, a: Path, b: Path) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "compare.json"
    proc = subprocess.run([sys.executable, str(COMPARE), str(a), str(b), "--output", str(out)],
                          capture_output=True, text=True, timeout=60)
    return proc, out


@pytest.mark.slow
def test_compare_two_complete_runs(tmp_path, tiny_runs):
    assert tiny_runs["llmc_stock"][0] == tiny_runs["llmc_ours"][0] == bench.EXIT_OK, tiny_runs["llmc_ours"][2]
    a_path, b_path = tiny_runs["llmc_stock"][3], tiny_runs["llmc_ours"][3]
    proc, out = _compare_cli(tmp_path, a_path, b_path)
    assert proc.returncode == cmp.EXIT_OK, proc.stderr
    result = json.loads(out.read_text())
    sa, sb = (json.loads(p.read_text())["layers"]["seconds"] for p in (a_path, b_path))
    assert (result["a"]["file"], result["b"]["file"]) == (str(a_path), str(b_path))
    assert (result["a"]["variant"], result["b"]["variant"]) == ("stock", "ours")
    st = result["steady_state"]
    assert st["label"] == "measured" and st["layers"] == "2..3" and st["layers_compared"] == 2
    assert st["a_median_s"] == pytest.approx(statistics.median(sa[1:]), abs=1e-3)
    assert st["ratio_a_over_b"] == pytest.approx(statistics.median(sa[1:]) / statistics.median(sb[1:]), abs=2e-3)
    assert result["a"]["total"] == {"seconds": round(sum(sa), 1), "label": "measured", "note": "sum of the 3 measured layers"}
    assert result["total_ratio_a_over_b"]["label"] == "measured" and "PROJECTION" not in proc.stdout
    assert "| variant, status | stock, complete | ours, complete |" in proc.stdout
    assert (result["a"]["routing"], result["b"]["routing"]) == (bench.STOCK_ROUTING["llmcompressor"], "routed")
    assert f"| calibration routing | {bench.STOCK_ROUTING['llmcompressor']} | routed | |" in proc.stdout
    assert result["a_over_b_means"].startswith("stock / ours")


def test_compare_a_partial_run_projects_its_total(tmp_path):
    # the committed H200 run (layer 1 holds the warm-up), cut where a --deadline stop after 10 layers leaves it
    full_path = ROOT / "benchmarks" / "results" / "whole_model_llmcompressor_cuda.json"
    full = json.loads(full_path.read_text())
    partial = json.loads(json.dumps(full))
    partial["status"], partial["layers"]["seconds"], partial["layers"]["done"] = "partial", full["layers"]["seconds"][:10], 10
    a = tmp_path / "partial.json"
    a.write_text(json.dumps(partial))
    result = cmp.compare(cmp.load(a), cmp.load(full_path), "partial.json", "full.json")
    s, total = partial["layers"]["seconds"], full["layers"]["total"]
    assert result["a"]["total"]["label"] == cmp.PROJECTION and "10 measured layers + 38 x" in result["a"]["total"]["note"]
    assert result["a"]["total"]["seconds"] == pytest.approx(sum(s) + (total - 10) * statistics.median(s[1:]), abs=0.06)
    assert result["b"]["total"] == {"seconds": round(sum(full["layers"]["seconds"]), 1), "label": "measured",
                                    "note": f"sum of the {total} measured layers"}
    assert result["total_ratio_a_over_b"]["label"] == cmp.PROJECTION
    st = result["steady_state"]  # measured over the layers both completed: the same layers, ratio 1
    assert (st["label"], st["layers"], st["ratio_a_over_b"]) == ("measured", "2..10", 1.0)
    assert st["a_median_s"] == pytest.approx(statistics.median(s[1:]), abs=1e-3)
    table = cmp.markdown(result)
    assert "(PROJECTION)" in table and "| layers done | 10/48 | 48/48 | |" in table


@pytest.mark.slow
def test_compare_refuses_different_backends_in_one_line(tmp_path, tiny_runs):
    proc, out = _compare_cli(tmp_path, tiny_runs["llmc_stock"][3], tiny_runs["gptq_stock"][3])
    assert proc.returncode == cmp.EXIT_REFUSED and not out.exists()
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "refusing to compare" in lines[0] and "backend llmcompressor vs gptqmodel" in lines[0]


@pytest.mark.slow
def test_compare_refuses_other_shapes_and_failed_runs(tmp_path, tiny_runs):
    data = json.loads(tiny_runs["llmc_ours"][3].read_text())
    other = json.loads(json.dumps(data))
    other["shape"]["experts"] += 1
    n = data["shape"]["experts"]
    with pytest.raises(cmp.Refused, match=rf"different shape \(experts {n} vs {n + 1}\)"):
        cmp.compare(data, other, "a", "b")
    other = json.loads(json.dumps(data))
    other["status"], other["error"] = "error", "RuntimeError: boom"
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(other))
    with pytest.raises(cmp.Refused, match="ended in an error"):
        cmp.load(bad)
    other = json.loads(json.dumps(data))
    other["fallback"] = "gptq solves ran torch, not the CUDA block-update extension"
    bad.write_text(json.dumps(other))
    with pytest.raises(cmp.Refused, match="fell back to a slower path"):
        cmp.load(bad)
    (tmp_path / "junk.json").write_text("{}")
    with pytest.raises(cmp.Refused, match="not a whole_model_gpu.py result"):
        cmp.load(tmp_path / "junk.json")
