"""``benchmarks/fingerprint_threads.py``: a weight fingerprint's cost one at a time and on many threads, torch's sums
against numpy's. Structure only: the timings are the machine's."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fingerprint_threads  # noqa: E402


def test_each_way_runs_in_turns_and_the_result_is_written_whole(tmp_path, capsys):
    out = tmp_path / "fingerprint.json"
    assert fingerprint_threads.main(["--shape", "64", "96", "--members", "6", "--threads", "3", "--repeat", "2",
                                     "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [(t["round"], t["way"]) for t in result["turns"]] == [(0, "torch"), (0, "numpy"), (1, "torch"),
                                                                 (1, "numpy")]
    assert all(t["one_thread_ms"] > 0 and t["threads_ms"] > 0 for t in result["turns"])
    for way in ("torch", "numpy"):
        ones = sorted(t["one_thread_ms"] for t in result["turns"] if t["way"] == way)
        assert result["medians"][way]["one_thread_ms"] == pytest.approx(sum(ones) / 2, abs=1e-3)
    assert result["shape"] == [64, 96] and result["threads"] == 3
    assert result["command"] == ("python benchmarks/fingerprint_threads.py --shape 64 96 --members 6 --threads 3 "
                                 f"--repeat 2 --output {out}")
    assert not [p for p in tmp_path.iterdir() if p.name != "fingerprint.json"]  # no temporary left beside it
    assert "a member on 3 threads" in capsys.readouterr().out


def test_bad_settings_are_one_clear_error(capsys):
    for bad in (["--threads", "1"], ["--shape", "64"], ["--members", "0"]):
        with pytest.raises(SystemExit) as exc:
            fingerprint_threads.main(bad)
        assert exc.value.code == 2
    assert "must be >= 2, got 1" in capsys.readouterr().err


def test_sums_that_differ_are_refused_before_any_timing(monkeypatch, tmp_path):
    monkeypatch.setitem(fingerprint_threads.WAYS, "numpy", lambda bits, accumulate: bits.sum(-1, dtype=accumulate))
    out = tmp_path / "fingerprint.json"
    with pytest.raises(SystemExit, match="torch's and numpy's sums differ; nothing timed"):
        fingerprint_threads.main(["--shape", "64", "96", "--members", "2", "--threads", "2", "--output", str(out)])
    assert not out.exists()
