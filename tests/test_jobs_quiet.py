"""Quiet by default (issue 14 item 7): the terminal gets our stages, per-layer progress and the
summary; the quantizers' own output goes to <output>/logs/quantizer.log, named in the summary."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml


# Longer than a summary table cell: the printed paths must still come out whole, on one line each.
OUT = "an-output-folder-with-a-long-name-" * 4 + "out"


def _run(tmp_path, backend: str, *flags: str) -> subprocess.CompletedProcess:
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "model": {"path": "builtin:tiny-qwen3-moe"},
                "quantization": {"backend": backend},
                "calibration": {"data": {"num_samples": 4, "seq_len": 32}, "routing": "all", "min_tokens": 8},
                "output": {"dir": str(tmp_path / OUT)},
                "evaluation": {"enabled": False},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # warnings as a user sees them
    return subprocess.run(
        [sys.executable, "-m", "defuser_quant", *flags, "run", str(job)],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env=env,
    )


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["gptqmodel", "llmcompressor"])
def test_third_party_output_goes_to_the_log(tmp_path, backend):
    result = _run(tmp_path, backend)
    assert result.returncode == 0, result.stderr[-3000:]
    log = tmp_path / OUT / "logs" / "quantizer.log"
    lines = result.stdout.splitlines()
    assert f"quantizer logs: {log}" in lines and f"output: {tmp_path / OUT}" in lines and "job summary" in result.stdout
    assert "4/4 layers" in result.stdout  # per-layer progress of the long stage
    assert len(lines) < 80 and result.stderr.strip() == ""
    text = log.read_text()
    assert text.strip()  # what the quantizer printed is kept, not lost
    assert "Attempting to save a model with offloaded modules" not in text + result.stdout
    assert not (tmp_path / "logs").exists()  # nothing in the current folder


@pytest.mark.slow
def test_verbose_shows_third_party_output_and_keeps_it_in_the_log(tmp_path):
    result = _run(tmp_path, "gptqmodel", "-v")
    assert result.returncode == 0, result.stderr[-3000:]
    terminal = result.stdout + result.stderr
    assert len(terminal.splitlines()) > 500  # GPTQModel's own tables
    log = (tmp_path / OUT / "logs" / "quantizer.log").read_text()
    assert len(log.splitlines()) > 500  # ... and the same output kept in the log file
    assert "job summary" in terminal
