"""``routing: budgeted`` under ``torchrun``: top-ups decided from every rank's counts.

In one process ``budgeted`` tops up, batch by batch, the experts still under ``min_tokens``.
Under ``torchrun`` each rank sees only its share of the data, so per-batch decisions would
differ between ranks. Instead, during a layer's calibration pass every rank routes normally and
keeps, per expert, up to ``min_tokens`` rows of its own data that were *not* routed to it
(spread over its batches). Right before GPTQ compresses that layer (``ranks.before_compress``),
the ranks sum their routed counts; each expert's deficit ``min_tokens - routed`` is split over
the ranks in rank order from what they kept, and each rank runs its share through the expert
(provenance ``"forced"``, so the quantizer's hooks see them before the solve). Every rank
decides the same; an expert ends with ``max(routed, min_tokens)`` tokens when the data holds
enough other tokens, and the forced total is at most what a one-process run forces (that one
tops up before it knows the later batches' routing).
"""

from __future__ import annotations

import logging

import torch

from defuser_quant.calibration import distributed, provenance
from defuser_quant.core import DefusedExperts

__all__ = ["RankBudget"]

logger = logging.getLogger(__name__)


class RankBudget:
    """Candidate rows kept during a calibration pass and the top-up run before each compression."""

    def __init__(self, blocks: list[tuple[str, DefusedExperts]], min_tokens: int, counts: dict[str, dict[str, list[int]]]):
        self.blocks = dict(blocks)
        self.order = [path for path, _ in blocks]
        self.min_tokens = min_tokens
        self.counts = counts  # the modifier's live per-expert counters (routed / forced)
        self.rows: dict[str, list[list[torch.Tensor]]] = {}
        self.kept: dict[str, list[int]] = {}
        self.seen: set[str] = set()

    def record(self, path: str, block: DefusedExperts, hidden: torch.Tensor, index: torch.Tensor) -> None:
        """Keep, per expert still short of ``min_tokens`` kept rows, this batch's rows not routed to it."""
        self.seen.add(path)
        experts = block.num_experts
        kept = self.kept.setdefault(path, [0] * experts)
        rows = self.rows.setdefault(path, [[] for _ in range(experts)])
        need = [self.min_tokens - k for k in kept]
        if max(need) <= 0:
            return
        tokens = hidden.shape[0]
        hit = torch.zeros(tokens, experts + 1, dtype=torch.bool, device=index.device)
        hit.scatter_(1, index.reshape(tokens, -1).long().clamp(max=experts), True)
        for expert in range(experts):
            if need[expert] <= 0:
                continue
            missed = (~hit[:, expert]).nonzero().flatten()
            if missed.numel() > need[expert]:
                picks = torch.arange(need[expert], device=missed.device) * missed.numel() // need[expert]
                missed = missed[picks]
            if missed.numel():
                rows[expert].append(hidden[missed].detach().clone())
                kept[expert] += missed.numel()

    def top_up(self) -> None:
        """A collective: force every rank's share of each calibrated block's deficit through its experts."""
        calibrated = distributed.all_reduce_ints([int(path in self.seen) for path in self.order])
        for path, flag in zip(self.order, calibrated):
            if not flag:
                continue
            block = self.blocks[path]
            experts = block.num_experts
            counts = self.counts[path]
            have = distributed.all_reduce_ints([r + f for r, f in zip(counts["routed"], counts["forced"])])
            available = distributed.all_gather_ints(self.kept.get(path, [0] * experts))
            share = [0] * experts
            for expert in range(experts):
                remaining = max(0, self.min_tokens - have[expert])
                for rank, kept in enumerate(available):
                    take = min(kept[expert], remaining)
                    remaining -= take
                    if rank == distributed.rank():
                        share[expert] = take
            rows = self.rows.pop(path, [])
            with torch.no_grad(), provenance("forced"):
                for expert, take in enumerate(share):
                    if take:
                        block[expert](torch.cat(rows[expert])[:take])
            self.kept.pop(path, None)
            self.seen.discard(path)
            logger.debug("%s: rank %d forced %d token(s) over %d expert(s)", path, distributed.rank(), sum(share),
                         sum(1 for s in share if s))
