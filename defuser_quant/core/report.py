"""Structured results of conversions: what was converted, what was skipped and why."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class BlockRecord:
    """One fused (or defused) block that a conversion looked at."""

    path: str
    class_name: str
    layout: str
    num_experts: int
    action: str  # "defused" | "fused" | "skipped"
    reason: str = ""
    zero_copy: bool = True
    expert_bytes: int = 0
    model_type: str | None = None
    stock_loads_per_expert: bool = True  # False: save through ``temporarily_fused`` for stock loaders
    kind: str = "experts"  # "experts" | "dense_mlp" (a fused gate_up_proj MLP split in place)


@dataclass
class ConversionReport:
    """Result of ``convert_model``/``fuse_model``; truthy when something was converted."""

    converted: list[BlockRecord] = field(default_factory=list)
    skipped: list[BlockRecord] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.converted)

    @property
    def num_experts(self) -> int:
        return sum(r.num_experts for r in self.converted)

    @property
    def experts_blocks(self) -> list[BlockRecord]:
        return [r for r in self.converted if r.kind == "experts"]

    @property
    def dense_mlps(self) -> list[BlockRecord]:
        return [r for r in self.converted if r.kind == "dense_mlp"]

    def to_dict(self) -> dict[str, Any]:
        return {"converted": [asdict(r) for r in self.converted], "skipped": [asdict(r) for r in self.skipped]}

    def summary(self) -> str:
        dense = len(self.dense_mlps)
        lines = [
            f"{len(self.experts_blocks)} block(s) converted ({self.num_experts} experts)"
            + (f", {dense} dense MLP(s) split" if dense else "")
            + f", {len(self.skipped)} skipped"
        ]
        lines += [
            f"  + {r.path}: {r.class_name} {r.layout}" + (f", {r.num_experts} experts" if r.kind == "experts" else "")
            for r in self.converted
        ]
        lines += [f"  - {r.path}: {r.reason}" for r in self.skipped]
        return "\n".join(lines)
