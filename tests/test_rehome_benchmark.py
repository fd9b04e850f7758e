"""``benchmarks/rehome_check.py``: GPTQModel's per-batch rehome against the ``rehome`` lean part, in one process."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import rehome_check as bench  # noqa: E402
from benchmark_runs import run_main_json  # noqa: E402


def test_bad_sizes_are_one_error_line(capsys):
    for argv, flag, why in ((["--experts", "0"], "--experts", "must be >= 1, got 0"),
                            (["--calls", "0"], "--calls", "must be >= 1, got 0"),
                            (["--repeats", "-1"], "--repeats", "must be >= 1, got -1"),
                            (["--hidden", "2.5"], "--hidden", "expected a whole number, got '2.5'")):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert f"error: argument {flag}: {why}" in err[-1]


def test_a_real_run_times_both_and_the_lean_calls_are_answered_by_the_walk(tmp_path):
    pytest.importorskip("gptqmodel")
    argv = ["--experts", "8", "--hidden", "64", "--intermediate", "32", "--calls", "3", "--repeats", "2"]
    data = run_main_json(bench, "rehome_check.py", argv, tmp_path / "rehome.json")
    assert data["modules"] > 8 * 3 and data["layer_unchanged_by_stock"] is True
    assert data["lean_calls"] == {"skipped": 1 + 2 * 3, "stock": 0, "reasons": {}}  # the warm call and the timed ones
    assert all(len(v) == 2 and min(v) > 0 for v in data["per_call_ms"].values())
    assert data["stock_over_lean"] == pytest.approx(data["median_ms"]["stock"] / data["median_ms"]["lean"], rel=0.01)
