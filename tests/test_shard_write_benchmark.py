"""benchmarks/shard_write.py: the shard write alone, GPTQModel's writer against the plugin's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import shard_write as bench  # noqa: E402


@pytest.mark.parametrize("argv, message", [
    (["--scale", "0"], "--scale must be in (0, 1], got 0.0"),
    (["--scale", "1.5"], "--scale must be in (0, 1], got 1.5"),
    (["--repeats", "0"], "must be >= 1"),
    (["--threads", "1"], "--threads must be comma-separated whole numbers >= 2, got 1"),
    (["--threads", "2,x"], "--threads must be comma-separated whole numbers >= 2, got '2,x'"),
])
def test_bad_arguments_are_one_error_line(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        bench.parse_args(["--output", str(tmp_path / "x.json"), *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1]
    assert not (tmp_path / "x.json").exists()


def test_a_small_run_writes_gptqmodels_bytes_and_a_report(tmp_path):
    pytest.importorskip("gptqmodel")
    out = tmp_path / "report.json"
    assert bench.main(["--scale", "0.003", "--repeats", "2", "--workdir", str(tmp_path / "w"), "--threads", "2,3",
                       "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["same_bytes_as_gptqmodel"] == {"ours": True, "ours-mapped-as-ranges": True, "ours-threads2": True,
                                                 "ours-threads3": True}
    assert set(report["seconds"]) == {"gptqmodel", "ours", "ours-mapped-as-ranges", "ours-threads2", "ours-threads3"}
    assert report["written_through_mapping"] == {"ours-threads2": [True, True], "ours-threads3": [True, True]}
    assert all(len(v) == 2 and all(s > 0 for s in v) for v in report["seconds"].values())
    kinds = report["bytes"]
    assert kinds["mapped"] > 0 and kinds["in_memory"] > 0 and kinds["offloaded"] > 0
    assert report["total_bytes"] == sum(kinds.values())
    assert list((tmp_path / "w").iterdir()) == []  # sources and shards removed


def test_other_bytes_fail_the_run(tmp_path, monkeypatch, capsys):
    pytest.importorskip("gptqmodel")
    from defuser_quant.integrations.gptqmodel import shard_writer

    def wrong(path, entries, metadata, stats=None):
        with open(path, "wb") as f:
            f.write(b"not a shard")
        return 11

    monkeypatch.setattr(shard_writer, "write_shard_file", wrong)
    out = tmp_path / "report.json"
    assert bench.main(["--scale", "0.003", "--repeats", "1", "--threads", "", "--output", str(out)]) == 1
    assert json.loads(out.read_text())["same_bytes_as_gptqmodel"] == {"ours": False, "ours-mapped-as-ranges": False}
    assert "ours, ours-mapped-as-ranges wrote other bytes than GPTQModel's writer" in capsys.readouterr().err


def test_writes_under_the_clocks_rounding_have_no_ratio(tmp_path, monkeypatch):
    """A writer that takes less than the 0.1 ms the timings are rounded to (CI's fast disk, a tiny --scale) gives no
    speed-up figure instead of a ZeroDivisionError."""
    pytest.importorskip("gptqmodel")
    ticks = iter(range(10_000))
    monkeypatch.setattr(bench.time, "perf_counter", lambda: next(ticks) * 1e-6)  # 1 µs a call: every write "0 s"
    out = tmp_path / "report.json"
    assert bench.main(["--scale", "0.003", "--repeats", "1", "--threads", "2", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["median_s"] == {"gptqmodel": 0.0, "ours": 0.0, "ours-mapped-as-ranges": 0.0, "ours-threads2": 0.0}
    assert data["speedup_vs_gptqmodel"] == {"ours": None, "ours-mapped-as-ranges": None, "ours-threads2": None}
