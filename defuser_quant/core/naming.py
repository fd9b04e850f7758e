"""Per-expert projection names, read from Transformers' checkpoint conversion mappings.

Transformers v5 merges per-expert checkpoints (``experts.{i}.<gate>.weight``, ...) into fused
tensors through ``WeightConverter`` entries. Those entries name what the family's original
per-expert checkpoints called each projection (mixtral: ``w1``/``w3``/``w2``); a defused block
exposes the same names, so a saved checkpoint matches what vLLM and older loaders expect.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from .families import PROJECTION_NAME_OVERRIDES


@dataclass(frozen=True)
class ProjectionNames:
    """Child names of one defused expert: gate (None when ungated), up and down projections."""

    gate: str | None = "gate_proj"
    up: str = "up_proj"
    down: str = "down_proj"

    def as_tuple(self) -> tuple[str, ...]:
        return tuple(n for n in (self.gate, self.up, self.down) if n is not None)


DEFAULT_NAMES = ProjectionNames()
UNGATED_DEFAULT_NAMES = ProjectionNames(gate=None)
_PER_EXPERT_SOURCE = re.compile(r"experts\.\*\.(\w+)\.weight$")


@functools.lru_cache(maxsize=None)
def _names_from_conversion_mapping(model_type: str) -> tuple[str | None, str | None, str | None] | None:
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # pragma: no cover - transformers without conversion mappings
        return None
    gate = up = down = None
    for transform in get_checkpoint_conversion_mapping(model_type) or []:
        targets = list(getattr(transform, "target_patterns", []) or [])
        sources = list(getattr(transform, "source_patterns", []) or [])
        if len(targets) != 1:
            continue
        names = [m.group(1) for s in sources if (m := _PER_EXPERT_SOURCE.search(s))]
        if len(names) != len(sources) or not names:
            continue
        if targets[0].endswith("experts.gate_up_proj") and len(names) == 2:
            gate, up = names
        elif targets[0].endswith("experts.up_proj") and len(names) == 1:
            up = names[0]
        elif targets[0].endswith("experts.down_proj") and len(names) == 1:
            down = names[0]
    if up is None and down is None:
        return None
    return gate, up, down


def projection_names(model_type: str | None, has_gate: bool, fallback_type: str | None = None) -> ProjectionNames:
    """Names for the per-expert projections of ``model_type``'s experts.

    ``fallback_type`` (the top-level model's type) is consulted when the experts' own config type
    has no mapping: nested text configs (``minimax_m3_vl_text``) inherit the composite model's.
    """
    default = DEFAULT_NAMES if has_gate else UNGATED_DEFAULT_NAMES
    for candidate in (model_type, fallback_type):
        if candidate in PROJECTION_NAME_OVERRIDES:
            gate, up, down = PROJECTION_NAME_OVERRIDES[candidate]
            return ProjectionNames(gate=gate, up=up, down=down)
    found = next((f for c in (model_type, fallback_type) if c and (f := _names_from_conversion_mapping(c))), None)
    if found is None:
        return default
    gate, up, down = found
    return ProjectionNames(
        gate=(gate or default.gate) if has_gate else None,
        up=up or default.up,
        down=down or default.down,
    )


def stock_loads_per_expert(*model_types: str | None) -> bool:
    """True when stock Transformers merges per-expert checkpoints of any of ``model_types`` on load."""
    return any(
        t is not None and (t in PROJECTION_NAME_OVERRIDES or _names_from_conversion_mapping(t) is not None)
        for t in model_types
    )
