"""What an offline checkpoint conversion did."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .plan import BlockAction


@dataclass(frozen=True)
class ProgressUpdate:
    """Sent to a progress callback after each output tensor is written."""

    done: int
    total: int
    done_bytes: int
    total_bytes: int
    name: str


@dataclass
class CheckpointReport:
    """Result of ``convert_checkpoint``."""

    src: str
    dst: str
    to: str
    model_type: str
    architecture: str
    blocks: list[BlockAction] = field(default_factory=list)
    tensors_in: int = 0
    tensors_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    shards_in: int = 0
    shards_out: int = 0
    side_files: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def converted(self) -> list[BlockAction]:
        """Blocks whose layout changed (merged or split)."""
        return [b for b in self.blocks if b.action in ("merged", "split")]

    @property
    def stock_loadable(self) -> bool:
        """False when stock ``from_pretrained`` needs ``replace_fused_blocks`` to load the result."""
        return all(b.stock_loadable for b in self.blocks)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["converted_blocks"] = len(self.converted)
        return data

    def summary(self) -> str:
        moved = sum(b.tensors_in for b in self.converted)
        made = sum(b.tensors_out for b in self.converted)
        lines = [
            f"{self.src} -> {self.dst} ({self.to}, {self.model_type})",
            f"  {len(self.converted)} of {len(self.blocks)} experts block(s) converted: {moved} tensors -> {made}",
            f"  {self.tensors_in} tensors in {self.shards_in} shard(s) -> {self.tensors_out} tensors in "
            f"{self.shards_out} shard(s), {self.bytes_out / 2**30:.2f} GiB, {self.seconds:.1f} s",
        ]
        lines += [f"  ! {w}" for w in self.warnings]
        return "\n".join(lines)
