"""Real quantized checkpoints of the shipped tiny qwen3_moe, one per backend, made once per session.

Both test_load*.py and test_check*.py use them: the cache below (not a fixture scope, which is
per module for imported fixtures) makes each backend's job run once however many modules ask.
``broken_copy`` writes an edited copy of one for the must-fail cases.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import yaml

_MADE: dict[str, Path] = {}


def quantized_checkpoint(backend: str, base: Path, method: str = "gptq", scheme: str = "W4A16") -> Path:
    """The per-expert checkpoint ``backend`` writes for the tiny model (a real job run; GPTQ W4A16 by default)."""
    key = f"{backend}-{method}-{scheme}"
    if key not in _MADE:
        from defuser_quant.cli import main

        out = base / f"quantized-{key}"
        job = base / f"{key}.yaml"
        job.write_text(yaml.safe_dump({
            "model": {"path": "builtin:tiny-qwen3-moe"},
            "quantization": {"backend": backend, "method": method, "scheme": scheme},
            "calibration": {"data": {"num_samples": 8, "seq_len": 64}, "routing": "all", "min_tokens": 1},
            "output": {"dir": str(out), "layout": "per-expert"},
            "evaluation": {"enabled": False},
        }))
        assert main(["run", str(job)]) == 0
        _MADE[key] = out
    return _MADE[key]


def broken_copy(src: Path, dst: Path, edit: Callable[[dict], None]) -> Path:
    """A copy of checkpoint ``src`` at ``dst`` whose tensors went through ``edit(tensors)`` (in place)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.png"))
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst
