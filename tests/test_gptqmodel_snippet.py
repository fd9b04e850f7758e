"""The GPTQModel worked example in docs/gptqmodel.md is complete and runs as written on a small
machine, without GPTQMODEL_CPU_WORKERS set (issue 14 item 8)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from defuser_quant.assets import TINY_MOE_PATH

DOC = Path(__file__).resolve().parents[1] / "docs" / "gptqmodel.md"


def _worked_example() -> str:
    section = DOC.read_text().split("## Worked example", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
def test_worked_example_runs_as_written(tmp_path):
    code = _worked_example()
    # the tiny model and a smaller sample, nothing else changed
    code = code.replace('"path/to/qwen3-moe"', repr(str(TINY_MOE_PATH)))
    code = code.replace("num_samples=64, seq_len=512", "num_samples=8, seq_len=64")
    env = {k: v for k, v in os.environ.items() if k != "GPTQMODEL_CPU_WORKERS"}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "out" / "coverage.json").is_file()
    assert (tmp_path / "out" / "qwen3-moe-gptq" / "quantize_config.json").is_file()
    assert (tmp_path / "out" / "qwen3-moe-dequantized" / "config.json").is_file()


def test_install_gives_gptqmodel_a_pool_that_starts(tmp_path):
    """On any core count, after install() GPTQModel's CPU pool has at least the 2 workers it needs."""
    code = (
        "import os, gptqmodel\n"
        "from defuser_quant.integrations.gptqmodel import install\n"
        "install()\n"
        "print(gptqmodel._default_cpu_workers())\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GPTQMODEL_CPU_WORKERS"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.strip().splitlines()[-1]) >= 2
