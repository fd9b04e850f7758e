"""``benchmarks/log_lines.py``: GPTQModel's log lines through LogBar, timed in child processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import log_lines as bench  # noqa: E402


def test_bad_counts_are_one_error_line(capsys):
    for argv in (["--lines", "0"], ["--repeats", "0"], ["--bars", "-1"]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert "error:" in err[-1] and len([line for line in err if "error:" in line]) == 1


@pytest.mark.slow
def test_a_real_run_times_the_lines_and_splits_a_line(tmp_path):
    pytest.importorskip("gptqmodel")
    out = tmp_path / "lines.json"
    assert bench.main(["--lines", "40", "--repeats", "1", "--bars", "1", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["command"].startswith("python benchmarks/log_lines.py --lines 40")
    rows = data["rows"]
    assert [r["bars"] for r in rows] == [1] and rows[0]["lines"] == 40 and len(rows[0]["seconds"]) == 1
    for r in rows:
        assert r["median_s"] > 0 and r["per_line_ms"] == pytest.approx(r["median_s"] / 40 * 1000, abs=0.002)
        assert r["stdout_bytes"] > 40 * 50  # every record reached the child's stdout
        shares = r["shares_of_a_line"]
        assert set(shares) == set(bench.SPLIT) and all(0 < v <= 1 for v in shares.values())
