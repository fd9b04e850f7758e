"""``benchmarks/gptqmodel_gpu.py`` run for real on the tiny shape on the CPU, as the slow tests call it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_tiny_cpu(out: Path, *flags: str, timeout: int = 300) -> dict:
    """The benchmark's JSON after ``gptqmodel_gpu.py --device cpu --tiny <flags> --output out``; an
    exit other than 0 fails with the end of its output."""
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": "",
           "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gptqmodel_gpu.py"), "--device", "cpu", "--tiny",
                           *flags, "--output", str(out)], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return json.loads(out.read_text())
