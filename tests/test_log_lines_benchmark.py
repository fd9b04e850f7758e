"""``benchmarks/log_lines.py``: GPTQModel's log lines through LogBar, timed in child processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import log_lines as bench  # noqa: E402


def test_bad_counts_are_one_error_line(capsys):
    for argv in (["--lines", "0"], ["--repeats", "0"], ["--bars", "-1"], ["--modes", "stock,fast"], ["--modes", ","]):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        err = capsys.readouterr().err.strip().splitlines()
        assert "error:" in err[-1] and len([line for line in err if "error:" in line]) == 1


@pytest.mark.slow
def test_a_real_run_times_the_lines_and_splits_a_line(tmp_path):
    pytest.importorskip("gptqmodel")
    out = tmp_path / "lines.json"
    assert bench.main(["--lines", "40", "--repeats", "1", "--bars", "1", "--modes", "stock,lean", "--output", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["command"].startswith("python benchmarks/log_lines.py --lines 40")
    rows = data["rows"]
    assert [(r["mode"], r["bars"]) for r in rows] == [("stock", 1), ("lean", 1)]
    assert all(r["lines"] == 40 and len(r["seconds"]) == 1 for r in rows)
    for r in rows:
        assert r["median_s"] > 0 and r["per_line_ms"] == pytest.approx(r["median_s"] / 40 * 1000, abs=0.002)
        assert r["stdout_bytes"] > 40 * 50  # every record reached the child's stdout
        shares = r["shares_of_a_line"]
        assert set(shares) == set(bench.SPLIT) and all(0 < v <= 1 for v in shares.values())
    assert rows[0]["record_lines"] == rows[1]["record_lines"] == 40  # the plugin's LogBar parts print every line
    assert rows[1]["stdout_bytes"] <= rows[0]["stdout_bytes"]  # ... with the bar drawn no more often


def test_the_lean_mode_runs_inside_the_plugins_logbar_parts(monkeypatch):
    pytest.importorskip("gptqmodel")
    from logbar import logbar as logbar_module
    from logbar import terminal

    original = terminal._is_headless_environment
    seen = []
    monkeypatch.setattr(logbar_module.LogBar, "_process", lambda self, *a, **k: seen.append(terminal._is_headless_environment))
    bench._log_lines(2, 0, "lean")
    assert len(seen) == 2 and all(fn is not original for fn in seen)  # each line under the headless memo
    assert terminal._is_headless_environment is original  # restored after
    seen.clear()
    bench._log_lines(2, 0, "stock")
    assert seen == [original, original]


def test_each_lean_mode_runs_inside_its_logbar_parts(monkeypatch):
    pytest.importorskip("gptqmodel")
    from logbar import logbar as logbar_module

    render = logbar_module._render_progress_stack_locked
    seen = []
    monkeypatch.setattr(logbar_module.LogBar, "_process", lambda self, *a, **k: seen.append(logbar_module._render_progress_stack_locked))
    for mode in ("lean", "lean-noline"):
        bench._log_lines(1, 0, mode)
    assert seen[0] is not render and seen[1] is render  # line_redraw in lean only
    assert logbar_module._render_progress_stack_locked is render
