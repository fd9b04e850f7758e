"""benchmarks/chunk_pipeline.py on the CPU: its flags, the GPU busy share's interval union, and a real (tiny) run."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import chunk_pipeline  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def test_bad_flags_are_refused_with_what_is_wrong(capsys):
    for argv, says in ((["--shapes", "64x256x2", "--share", "2,1"], "--share needs one value per shape (1), got 2"),
                       (["--graphs", "maybe"], "choose from on, off, loop, both"),
                       (["--chunks", "0"], "must be >= 1"),
                       (["--inverse-threads", "0"], "--inverse-threads"),
                       (["--solve-priority", "urgent"], "argument --solve-priority: invalid choice: 'urgent'"),
                       (["--compare-updates", "--inplace-update"],
                        "--compare-updates times both updates; leave out --inplace-update")):
        with pytest.raises(SystemExit):
            chunk_pipeline.parse_args(["--device", "cpu", *argv])
        assert says in capsys.readouterr().err


def _event(start: float, end: float, device: str = "CUDA"):
    return SimpleNamespace(device_type=SimpleNamespace(name=device), time_range=SimpleNamespace(start=start, end=end))


def test_the_busy_share_is_the_union_of_the_device_intervals():
    prof = SimpleNamespace(events=lambda: [
        _event(0, 10), _event(5, 20),  # overlapping: 0-20
        _event(30, 40), _event(32, 35),  # nested: 30-40
        _event(0, 100, device="CPU"),  # host events do not count
        _event(50, 50),  # empty
    ])
    assert chunk_pipeline.busy_share(prof, 100.0) == 0.3
    assert chunk_pipeline.busy_share(SimpleNamespace(events=lambda: []), 100.0) is None


def test_a_tiny_cpu_run_reports_each_cell_and_the_graph_counts(tmp_path):
    out = tmp_path / "pipeline.json"
    assert chunk_pipeline.main(["--device", "cpu", "--shapes", "64x256x4", "--share", "2", "--chunks", "2",
                                "--tokens", "96", "--inverse-threads", "1,2", "--graphs", "on,both", "--repeats", "1",
                                "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["complete"] is True and report["meta"]["device"] == "cpu"
    assert report["meta"]["solve_priority"] == "normal"
    assert report["meta"]["inplace_update"] is False and chunk_pipeline._inplace_update is False
    (row,) = report["rows"]
    assert (row["rows"], row["columns"], row["modules"], row["share"], row["chunks"]) == (64, 256, 4, 2, 2)
    assert [(c["graphs"], c["inverse_threads"]) for c in row["cells"]] == [("on", 1), ("on", 2), ("both", 1), ("both", 2)]
    for cell in row["cells"]:
        assert cell["pipeline_s"] > 0 and cell["inverses_only_s"] > 0 and cell["loop_only_s"] > 0
    # no graphs on the CPU: neither the inverses nor the loops are wrapped there
    none = {"recorded": 0, "replays": 0, "eager": 0, "refused": {}}
    assert row["graph_stats"] == {s: {"inverses": none, "loops": {**none, "arena_bytes": 0}} for s in ("on", "both")}


def test_inplace_update_runs_every_loop_with_one_addmm_per_module_and_block(tmp_path, monkeypatch):
    from test_gptqmodel_batched import _count_addmm

    calls = _count_addmm(monkeypatch)
    out = tmp_path / "pipeline.json"
    assert chunk_pipeline.main(["--device", "cpu", "--shapes", "64x256x4", "--share", "2", "--chunks", "2",
                                "--tokens", "96", "--inverse-threads", "1", "--graphs", "off", "--repeats", "1",
                                "--inplace-update", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["inplace_update"] is True and report["rows"][0]["cells"]
    # 256 columns: one update a module after its first block; 4 modules, 2 chunks, in the pipeline, the warm-up
    # and the loops alone
    assert calls and {alpha for *_, alpha in calls} == {-1} and len(calls) % 8 == 0


def test_compare_updates_times_both_updates_in_turn_and_puts_the_setting_back(tmp_path, monkeypatch):
    seen = []  # the in-place setting each timed pipeline and loop ran with, in order
    real_run, real_loops = chunk_pipeline.run_pipeline, chunk_pipeline._loops

    def run(*args, **kwargs):
        seen.append(("pipeline", chunk_pipeline._inplace_update))
        return real_run(*args, **kwargs)

    def loops(*args, **kwargs):
        seen.append(("loops", chunk_pipeline._inplace_update))
        return real_loops(*args, **kwargs)

    monkeypatch.setattr(chunk_pipeline, "run_pipeline", run)
    monkeypatch.setattr(chunk_pipeline, "_loops", loops)
    out = tmp_path / "pipeline.json"
    assert chunk_pipeline.main(["--device", "cpu", "--shapes", "64x256x4", "--share", "2", "--chunks", "2",
                                "--tokens", "96", "--inverse-threads", "1", "--graphs", "off", "--repeats", "3",
                                "--compare-updates", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["compare_updates"] is True and report["meta"]["inplace_update"] is False
    (cell,) = report["rows"][0]["cells"]
    assert all(cell[k] > 0 for k in ("pipeline_s", "pipeline_inplace_s", "loop_only_s", "loop_only_inplace_s"))
    # after the warm-up: each repeat both ways, the order flipped every repeat
    turns = [False, True, True, False, False, True]
    assert seen[1:] == [("pipeline", t) for t in turns] + [("loops", t) for t in turns]
    assert chunk_pipeline._inplace_update is False


def test_the_overlap_of_solves_and_inverses_is_measured_on_their_union():
    got = chunk_pipeline.overlap([(0.0, 10.0), (20.0, 30.0)], [(5.0, 25.0), (6.0, 8.0), (40.0, 40.0)])
    assert got == {"span_ms": 30.0, "busy_ms": 30.0, "solves_ms": 20.0, "inverses_ms": 20.0,
                   "inverses_beside_solves_share": 0.5}  # 5-10 and 20-25 of the 20 ms of solves; the nested one once
    apart = chunk_pipeline.overlap([(0.0, 4.0)], [(6.0, 10.0)])
    assert apart["inverses_beside_solves_share"] == 0.0 and apart["span_ms"] == 10.0 and apart["busy_ms"] == 8.0
    assert chunk_pipeline.overlap([], [])["inverses_beside_solves_share"] is None


def test_a_traced_cpu_run_marks_every_solve_and_inverse_and_puts_the_wrappers_back(tmp_path):
    from defuser_quant.integrations.gptqmodel import batched, inverse_graphs

    eager, graphed = batched._invert_unit, inverse_graphs.graphed
    out = tmp_path / "pipeline.json"
    assert chunk_pipeline.main(["--device", "cpu", "--shapes", "64x256x4", "--share", "2", "--chunks", "3",
                                "--tokens", "96", "--inverse-threads", "2", "--graphs", "off", "--repeats", "1",
                                "--trace", "--solve-priority", "high", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["meta"]["solve_priority"] == "high" and chunk_pipeline._solve_priority == -1
    assert chunk_pipeline.SOLVE_PRIORITIES == batched.SOLVE_PRIORITIES  # the plugin's opt-in, as GPTQModel runs it
    trace = report["rows"][0]["trace"]
    assert (trace["inverse_threads"], trace["graphs"]) == (2, "off")
    assert len(trace["solve_spans_ms"]) == 3 and len(trace["inverse_spans_ms"]) == 3 * 2  # two shared Hessians a chunk
    spans = trace["solve_spans_ms"] + trace["inverse_spans_ms"]
    assert all(0 <= start <= end for start, end in spans)
    assert trace["span_ms"] == pytest.approx(max(e for _, e in spans) - min(s for s, _ in spans), abs=2e-3)
    solves = trace["solve_spans_ms"]
    assert all(a[1] <= b[0] for a, b in zip(solves, solves[1:]))  # one chunk after another
    assert 0 <= trace["inverses_beside_solves_share"] <= 1
    assert (batched._invert_unit, inverse_graphs.graphed) == (eager, graphed)


def test_a_chunk_left_to_gptqmodel_is_reported_with_its_cause_and_the_run_still_completes(tmp_path, monkeypatch):
    from defuser_quant.integrations.gptqmodel import batched

    made = chunk_pipeline.make_tasks

    def one_bad_hessian(*args, seed=0, **kwargs):
        tasks = made(*args, seed=seed, **kwargs)
        if seed == 1:
            tasks[0].H.neg_()  # no Cholesky factor (and no longer its partner's Hessian): GPTQModel's own solve takes it
        return tasks

    monkeypatch.setattr(chunk_pipeline, "make_tasks", one_bad_hessian)
    original = batched._task_results
    out = tmp_path / "pipeline.json"
    assert chunk_pipeline.main(["--device", "cpu", "--shapes", "64x256x4", "--share", "2", "--chunks", "2",
                                "--tokens", "96", "--inverse-threads", "2", "--graphs", "off,on", "--repeats", "1",
                                "--trace", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["complete"] is True
    (row,) = report["rows"]
    assert row["cells"] == []
    for setting in ("off", "on"):
        message = row["errors"][setting]
        assert message.startswith("chunk 1: 1 of 4 modules left to GPTQModel's per-module solve")
        assert "'failed_factorizations': 1, 'nan_losses': 0" in message
    assert row["trace"]["error"] == row["errors"]["off"] and "solve_spans_ms" not in row["trace"]
    assert set(row["graph_stats"]) == {"off", "on"}
    assert batched._task_results is original
