"""llama4: experts called with inputs already grouped per expert (``[E*T, H]``).

``Llama4TextMoe`` repeats every token once per expert, scales each copy by its router score
(zero for experts outside the top-k) and calls ``experts(routed_in)``; expert ``e`` owns rows
``e*T .. (e+1)*T``. The storage is the transposed concatenated layout (``gate_up_proj``
``[E, H, 2I]``, ``down_proj`` ``[E, I, H]``). The defused block states that contract as routing
(row ``r`` goes to expert ``r // T`` with weight 1), so ``forward_override`` and calibration see
the usual ``(hidden_states, top_k_index, top_k_weights)``; multiplying by 1 and adding into
zeros are exact.
"""

from __future__ import annotations

import torch
from torch import nn

from ..defused import DefusedExperts
from ..layout import ExpertLayout
from .base import StandardAdapter


def grouped_routing(rows: int, num_experts: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-1 routing of ``rows`` rows grouped in ``num_experts`` equal runs, weight 1."""
    per_expert = rows // num_experts
    index = torch.arange(num_experts, device=like.device).repeat_interleave(per_expert).unsqueeze(1)
    return index, torch.ones(rows, 1, dtype=like.dtype, device=like.device)


class BatchedInputExperts(DefusedExperts):
    """``Llama4TextExperts`` defused: ``forward(hidden_states [E*T, H]) -> [E*T, H]``."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        if flat.shape[0] % self.num_experts:
            raise ValueError(f"{flat.shape[0]} rows do not group into {self.num_experts} experts")
        index, weights = grouped_routing(flat.shape[0], self.num_experts, flat)
        return self.dispatch(flat, index, weights)


class BatchedInputAdapter(StandardAdapter):
    """Standard transposed concatenated storage, batched-input call contract."""

    block_class = BatchedInputExperts

    def applies(self, module: nn.Module) -> bool:
        return hasattr(module, "gate_up_proj") and hasattr(module, "down_proj")

    def layout(self, module: nn.Module) -> ExpertLayout:
        return ExpertLayout(has_gate=True, has_bias=False, is_transposed=True, is_concatenated=True)

    def describe(self, layout: ExpertLayout) -> str:
        return f"{layout.describe()}, batched input"
