"""A benchmark script's ``main`` run in-process by its tests, and the JSON it wrote."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType


def run_main_json(bench: ModuleType, script: str, argv: list[str], out: Path) -> dict:
    """``bench.main(argv + --output out)`` must exit 0 and record its own command line; returns the JSON."""
    argv = [*argv, "--output", str(out)]
    assert bench.main(argv) == 0
    data = json.loads(out.read_text())
    assert data["meta"]["command"] == f"python benchmarks/{script} " + " ".join(argv)
    return data
