"""Load pickled models in a new Python process, where no class has been generated yet."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

_SCRIPT = """
import sys, torch
torch.set_num_threads(1)  # the suite runs single-threaded: same summation order, exact logits
ids = torch.load(sys.argv[1])
out = {}
for path in sys.argv[3:]:
    model = torch.load(path, weights_only=False).eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    blocks = sorted({type(m).__module__ + "." + type(m).__qualname__ for m in model.modules()
                     if type(m).__module__.startswith("defuser_quant")})
    out[path] = {"logits": logits, "classes": blocks}
torch.save(out, sys.argv[2])
"""


def load_in_fresh_process(paths: list[Path], ids: torch.Tensor, workdir: Path) -> dict[str, dict]:
    """``{path: {"logits": ..., "classes": [defuser_quant classes in the model]}}`` from a new process."""
    ids_file, out_file = workdir / "ids.pt", workdir / "fresh_out.pt"
    torch.save(ids, ids_file)
    proc = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(ids_file), str(out_file), *map(str, paths)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out_file)
