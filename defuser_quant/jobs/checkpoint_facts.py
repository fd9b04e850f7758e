"""Facts read back from a written checkpoint: how many expert projections were quantized."""

from __future__ import annotations

import re
from pathlib import Path

from safetensors import safe_open

_EXPERT_PROJ = re.compile(r"^(?P<proj>.*\.experts\.\d+\.[A-Za-z0-9_]+)\.(?P<leaf>[A-Za-z0-9_]+)$")
_QUANTIZED_LEAVES = {"qweight", "weight_packed", "weight_scale", "scales"}


def expert_projection_counts(checkpoint: Path) -> tuple[int, int]:
    """(expert projections, of which quantized) in the safetensors files of ``checkpoint``."""
    leaves: dict[str, set[str]] = {}
    for file in sorted(Path(checkpoint).glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            for key in handle.keys():
                match = _EXPERT_PROJ.match(key)
                if match:
                    leaves.setdefault(match["proj"], set()).add(match["leaf"])
    quantized = sum(1 for names in leaves.values() if names & _QUANTIZED_LEAVES)
    return len(leaves), quantized
