"""Triton compiles inside a benchmark's timed region: the counter, the rows and tables, the warm-up."""

from __future__ import annotations

import json
import subprocess
import sys
import types
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _triton_compiles as tc  # noqa: E402
import distributed_gpu as dg  # noqa: E402
import gptqmodel_gpu as gg  # noqa: E402


@pytest.fixture
def fake_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    """An importable ``triton`` without knobs (the counter then resolves the cache from the env)."""
    monkeypatch.setitem(sys.modules, "triton", types.ModuleType("triton"))
    for name in ("TRITON_CACHE_DIR", "TRITON_HOME"):
        monkeypatch.delenv(name, raising=False)


def _compile(cache: Path, key: str, kernel: str = "_quantize_kernel") -> None:
    """What Triton leaves for one compiled kernel: a folder per compile key with its group file."""
    (cache / key).mkdir(parents=True)
    (cache / key / f"{kernel}.cubin").write_bytes(b"\0")
    (cache / key / f"__grp__{kernel}.json").write_text("{}")


def test_counts_the_kernels_compiled_inside_the_block_only(tmp_path, monkeypatch, fake_triton):
    cache = tmp_path / "cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(cache))
    _compile(cache, "OLD")
    with tc.count_triton_compiles() as seen:
        assert seen.kernels is None  # known at the block's end
        _compile(cache, "NEW1")
        _compile(cache, "NEW2", "other_kernel")
        (cache / "STUB").mkdir()
        (cache / "STUB" / "__triton_launcher.so").write_bytes(b"\0")  # a launcher stub, not a kernel
    assert seen.cache_dir == cache
    assert seen.kernels == 2
    with tc.count_triton_compiles() as again:
        pass
    assert again.kernels == 0  # everything was there before


def test_a_cache_created_inside_the_block_counts(tmp_path, monkeypatch, fake_triton):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "not-yet"))
    compiles = tc.TritonCompiles.start()
    _compile(tmp_path / "not-yet", "K")
    assert compiles.stop() == 1 == compiles.kernels


def test_the_cache_directory_is_resolved_like_triton(tmp_path, monkeypatch, fake_triton):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tc.triton_cache_dir() == tmp_path / "home" / ".triton" / "cache"
    monkeypatch.setenv("TRITON_HOME", str(tmp_path / "th"))
    assert tc.triton_cache_dir() == tmp_path / "th" / ".triton" / "cache"
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "explicit"))
    assert tc.triton_cache_dir() == tmp_path / "explicit"


def test_none_without_triton(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # import triton -> ImportError
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))
    assert tc.triton_cache_dir() is None
    with tc.count_triton_compiles() as seen:
        _compile(tmp_path, "K")
    assert seen.kernels is None  # not known, not 0


# ----- distributed_gpu.py -------------------------------------------------------------------------
def _row(variant: str, nproc: int, compiles: list[int | None] | None) -> dict:
    row = {"variant": variant, "nproc": nproc, "oneshot_s": 10.0, "end_to_end_s": 20.0, "peak_gpu_gib": [1.0] * nproc,
           "stages_max": dict.fromkeys(dg.STAGES, 0.5), "grouped_use": [None] * nproc, "coverage_totals": None}
    if compiles is not None:
        row["triton_compiles"] = compiles
    return row


def test_the_tables_mark_a_run_that_compiled_triton_kernels():
    rows = [_row("stock", 1, [3]), _row("stock", 2, [0, 2]), _row("routed", 1, [0]), _row("routed", 2, [None, None]),
            _row("all", 1, None)]
    stages = dg.stage_markdown(rows).splitlines()
    assert "| stock x1 (Triton compiled 3 kernels in this run) | 10.0 |" in stages[2]
    assert "| stock x2 (Triton compiled 2 kernels in this run) | 10.0 |" in stages[3]  # the most of any rank
    assert all("Triton" not in line for line in stages[4:])  # 0, None, or not recorded: no mark
    table = dg.markdown(rows, 2)
    assert "| stock (Triton compiled 3 kernels in the x1 run) (Triton compiled 2 kernels in the x2 run) |" in table
    assert table.count("Triton") == 2
    rows[2]["vs_stock"] = {"oneshot_ratio": 1.0, "peak_gpu_ratio": 1.0, "checkpoint": {"qweights_equal": "1/1", "max_scale_diff": 0.0}}
    assert "| routed x1 | 10.0 | 10.0 (Triton compiled 3 kernels in stock) |" in dg.stock_markdown(rows)


def test_warmup_flags_and_the_workers_calibration_file(tmp_path):
    args = dg.parse_args([])
    assert args.warmup is False and args.warmup_samples == 8 and args.calibration is None
    args = dg.parse_args(["--warmup", "--warmup-samples", "3"])
    assert args.warmup is True and args.warmup_samples == 3
    with pytest.raises(SystemExit):
        dg.parse_args(["--warmup-samples", "0"])
    worker = dg.parse_args(["--worker", "stock", "--workdir", str(tmp_path)])
    assert dg.calibration_file(worker) == tmp_path / "calibration.json"  # unchanged without --calibration
    worker = dg.parse_args(["--worker", "stock", "--workdir", str(tmp_path), "--calibration", str(tmp_path / "w.json")])
    assert dg.calibration_file(worker) == tmp_path / "w.json"


def test_the_warmup_calibration_file_holds_warmup_samples_rows(tmp_path):
    rows = [{"input_ids": [i, i + 1], "attention_mask": [1, 1]} for i in range(20)]
    args = dg.parse_args(["--warmup"])
    assert dg.write_calibration(rows, tmp_path / "w.json", args.warmup_samples) == 8
    assert json.loads((tmp_path / "w.json").read_text()) == rows[:8]
    assert dg.write_calibration(rows, tmp_path / "all.json") == 20
    assert json.loads((tmp_path / "all.json").read_text()) == rows


def _fake_workers(monkeypatch: pytest.MonkeyPatch, compiles: int | None) -> list[list[str]]:
    """``subprocess.run`` in distributed_gpu replaced by one that writes every rank's JSON; returns the commands."""
    commands: list[list[str]] = []

    def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        commands.append(cmd)
        out = Path(cmd[cmd.index("--output") + 1])
        nproc = int(next((c.split("=")[1] for c in cmd if c.startswith("--nproc-per-node=")), 1))
        for rank in range(nproc):
            (out / "checkpoint").mkdir(exist_ok=True)
            (out / f"rank{rank}.json").write_text(json.dumps(
                {"oneshot_s": 1.0, "worker_s": 2.0, "peak_gpu_bytes": None, "stages": {}, "grouped_use": None,
                 "experts_classes": [], "coverage_totals": None, "triton_compiles": compiles}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(dg.subprocess, "run", run)
    return commands


def test_a_row_keeps_every_ranks_triton_compiles(tmp_path, monkeypatch):
    commands = _fake_workers(monkeypatch, 4)
    row = dg.run_one("routed", 2, dg.parse_args(["--device", "cpu"]), tmp_path, 60)
    assert row["triton_compiles"] == [4, 4] and dg.triton_compiled(row) == 4
    assert "--calibration" not in commands[0]  # the timed runs read WORKDIR/calibration.json as before


def test_every_run_starts_after_the_earlier_runs_are_written_back(tmp_path, monkeypatch):
    """os.sync() before each worker starts: a later run's save must not wait on an earlier run's dirty pages."""
    commands = _fake_workers(monkeypatch, 0)
    events: list[str] = []
    original = dg.subprocess.run
    monkeypatch.setattr(dg.os, "sync", lambda: events.append("sync"))
    monkeypatch.setattr(dg.subprocess, "run", lambda cmd, **kw: events.append("run") or original(cmd, **kw))
    for variant in ("stock", "routed"):
        row = dg.run_one(variant, 1, dg.parse_args(["--device", "cpu"]), tmp_path, 60)
        assert isinstance(row["sync_before_s"], float)
    assert events == ["sync", "run", "sync", "run"] and len(commands) == 2


def test_the_warmup_runs_the_variant_once_in_one_process_on_its_rows_and_deletes_its_output(tmp_path, monkeypatch):
    commands = _fake_workers(monkeypatch, 1)
    rows = [{"input_ids": [i], "attention_mask": [1]} for i in range(20)]
    args = dg.parse_args(["--device", "cpu", "--warmup", "--warmup-samples", "5"])
    warmup = dg.run_warmup("stock", rows, args, tmp_path, 60)
    assert set(warmup) == {"variant", "samples", "seconds", "error", "triton_compiles"}
    assert (warmup["variant"], warmup["samples"], warmup["error"], warmup["triton_compiles"]) == ("stock", 5, None, 1)
    (cmd,) = commands
    assert not any(c.startswith("--nproc-per-node") for c in cmd) and cmd[cmd.index("--worker") + 1] == "stock"
    calibration = Path(cmd[cmd.index("--calibration") + 1])
    assert len(json.loads(calibration.read_text())) == 5
    assert not (tmp_path / "warmup-stock").exists()  # its checkpoint is gone
    assert not (tmp_path / "stock-n1").exists()  # and it did not use the timed run's folder


# ----- gptqmodel_gpu.py ---------------------------------------------------------------------------
def test_the_gptqmodel_table_marks_a_run_that_compiled_triton_kernels():
    base = {"load_s": 1.0, "quantize_s": 2.0, "save_s": 0.5, "total_s": 3.5, "peak_rss_bytes": 2**30, "experts_quantized": 1,
            "expert_projections": 1, "peak_gpu_bytes": None, "stages": {"save": 0.5}}
    rows = [{**base, "variant": "stock", "triton_compiles": 2}, {**base, "variant": "ours", "triton_compiles": 0},
            {**base, "variant": "ours-all", "triton_compiles": None}, {**base, "variant": "ours-grouped"}]
    lines = gg.markdown(rows).splitlines()
    marked = [line for line in lines if "Triton" in line]
    assert len(marked) == 2  # the main table and the stage table, both for stock only
    assert all(line.startswith("| stock (Triton compiled 2 kernels in this run) |") for line in marked)


def test_a_run_listed_before_stock_is_compared_with_stock_once_stock_has_run(monkeypatch):
    monkeypatch.setattr(dg, "compare_checkpoints", lambda a, b: {"tensors": f"{a.name}-{b.name}"})

    def row(variant: str, seconds: float) -> dict:
        return {"variant": variant, "nproc": 1, "oneshot_s": seconds, "peak_gpu_gib": [2.0], "checkpoint": f"/x/{variant}"}

    routed, stock, failed = row("routed", 10.0), row("stock", 40.0), {**row("all", 1.0), "error": "exit 1"}
    rows = [routed]
    dg.vs_stock(rows, routed)
    assert "vs_stock" not in routed  # stock has not run yet
    rows += [failed, stock]
    for r in rows:
        dg.vs_stock(rows, r)
    assert routed["vs_stock"] == {"oneshot_ratio": 4.0, "peak_gpu_ratio": 1.0, "checkpoint": {"tensors": "stock-routed"}}
    assert "vs_stock" not in stock and "vs_stock" not in failed
    routed["vs_stock"]["oneshot_ratio"] = "kept"
    dg.vs_stock(rows, routed)
    assert routed["vs_stock"]["oneshot_ratio"] == "kept"  # computed once


def test_repeat_interleaves_rounds_and_compares_each_run_with_its_own_rounds_stock(tmp_path, monkeypatch):
    """--repeat 2: stock, routed, stock, routed; each routed run against the stock run of its round; medians."""
    seconds = {("stock", 0): 40.0, ("routed", 0): 10.0, ("stock", 1): 60.0, ("routed", 1): 12.0}
    commands: list[list[str]] = []

    def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
        commands.append(cmd)
        out = Path(cmd[cmd.index("--output") + 1])
        variant, round_ = cmd[cmd.index("--worker") + 1], int(out.name.rpartition("-r")[2])
        (out / "checkpoint").mkdir(exist_ok=True)
        (out / "rank0.json").write_text(json.dumps(
            {"oneshot_s": seconds[variant, round_], "worker_s": 1.0, "peak_gpu_bytes": None, "stages": {},
             "grouped_use": None, "experts_classes": [], "coverage_totals": None, "triton_compiles": 0}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(dg.subprocess, "run", run)
    monkeypatch.setattr(dg.os, "sync", lambda: None)
    monkeypatch.setattr(sys.modules["gptqmodel_gpu"], "build_source", lambda args, path: [{"input_ids": [1]}])
    monkeypatch.setattr(dg, "compare_checkpoints", lambda a, b: {"qweights_equal": f"{a.parent.name}~{b.parent.name}",
                                                                 "max_scale_diff": 0.0, "tensors": "3/3", "only_in_one": 0})
    out = tmp_path / "result.json"
    assert dg.main(["--device", "cpu", "--variants", "stock@1,routed@1", "--repeat", "2", "--workdir", str(tmp_path / "w"),
                    "--output", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["variant"], r["repeat"]) for r in rows] == [("stock", 0), ("routed", 0), ("stock", 1), ("routed", 1)]
    assert [Path(c[c.index("--output") + 1]).name for c in commands] == ["stock-n1-r0", "routed-n1-r0", "stock-n1-r1", "routed-n1-r1"]
    routed = [r for r in rows if r["variant"] == "routed"]
    assert [r["vs_stock"]["oneshot_ratio"] for r in routed] == [4.0, 5.0]
    assert [r["vs_stock"]["checkpoint"]["qweights_equal"] for r in routed] == ["stock-n1-r0~routed-n1-r0", "stock-n1-r1~routed-n1-r1"]
    # the rounds' runs grouped by identical checkpoints: one read (the second stock run against the first)
    groups = json.loads(out.read_text())["checkpoint_groups"]["x1"]
    assert groups["groups"] == [["stock x1 r0", "stock x1 r1", "routed x1 r0", "routed x1 r1"]]
    assert [x["pair"] for x in groups["read"]] == [["stock x1 r0", "stock x1 r1"]]
    table = json.loads(out.read_text())["repeat_table"].splitlines()
    assert "| routed x1 | 10.0 / 12.0 | 11.0 | 4.50x | 4.00x | 5.00x |" in table
    assert "| stock x1 | 40.0 / 60.0 | 50.0 | - | - | - |" in table
    with pytest.raises(SystemExit):
        dg.parse_args(["--repeat", "0"])


def test_gil_probe_flag_reaches_every_rank_and_its_summaries_the_row(tmp_path, monkeypatch):
    seen = {}

    def run(cmd, **kwargs):
        seen["cmd"] = cmd
        out = Path(cmd[cmd.index("--output") + 1])
        (out / "rank0.json").write_text(json.dumps(
            {"oneshot_s": 1.0, "worker_s": 2.0, "peak_gpu_bytes": None, "stages": {}, "grouped_use": None,
             "experts_classes": [], "coverage_totals": None, "triton_compiles": 0, "gil_probe": {"mean_ms": 0.5}}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(dg.subprocess, "run", run)
    monkeypatch.setattr(dg.os, "sync", lambda: None)
    row = dg.run_one("routed", 1, dg.parse_args(["--device", "cpu", "--gil-probe"]), tmp_path, timeout=10)
    assert "--gil-probe" in seen["cmd"] and row["gil_probe"] == [{"mean_ms": 0.5}]
    row = dg.run_one("routed", 1, dg.parse_args(["--device", "cpu"]), tmp_path, timeout=10)
    assert "--gil-probe" not in seen["cmd"] and "gil_probe" not in row


def test_the_gptqmodel_table_shows_the_lock_probe_when_it_ran():
    base = {"load_s": 1.0, "quantize_s": 2.0, "save_s": 0.5, "total_s": 3.5, "peak_rss_bytes": 2**30, "experts_quantized": 1,
            "expert_projections": 1, "peak_gpu_bytes": None}
    probe = {"switch_interval_ms": 0.5, "mean_ms": 0.4, "p90_ms": 0.9, "over_1ms": 0.05, "waited_s": 1.2}
    rows = [{**base, "variant": "stock"},
            {**base, "variant": "ours+si500", "gil_probe": probe, "bookkeeping": {"recopy_skipped": 768},
             "solve": {"batched_modules": 760, "per_module": {}, "host_results": 760}}]
    lines = gg.markdown(rows).splitlines()
    assert "| ours+si500 | 0.5 | 0.4 | 0.9 | 0.05 | 1.2 | 768 | 760 |" in lines
    assert not any(line.startswith("| stock | 5") for line in lines)  # stock had no probe: no row there
    assert "Interpreter lock" not in gg.markdown(rows[:1])
