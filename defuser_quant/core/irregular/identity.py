"""longcat_flash: routed experts plus weightless identity ("zero") experts.

The router picks among ``n_routed_experts + zero_expert_num`` experts; indices at or past
``n_routed_experts`` return their input unchanged (times the routing weight). ``gate_up_proj``
holds a slab for every index (the identity ones are never read), ``down_proj`` only the routed
ones. The defused block has ``n_routed_experts`` numbered experts and keeps the identity experts
in its routing; the unread slabs stay in the fused storage (a re-fused block built from
per-expert weights has zeros there).
"""

from __future__ import annotations

import torch
from torch import nn

from ..defused import DefusedExperts
from ..layout import ExpertLayout, ExpertShapes
from ..tensors import FusedTensor, layout_tensors
from .base import StandardAdapter, require


class IdentityExpertsBlock(DefusedExperts):
    """Routed forward where indices ``>= num_experts`` are identity experts."""

    @property
    def total_experts(self) -> int:
        return self.fused_shell.total_experts

    def routed_forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        final_hidden_states = torch.zeros_like(hidden_states)
        if top_k_index.numel() == 0:
            return final_hidden_states
        expert_mask = nn.functional.one_hot(top_k_index, num_classes=self.total_experts).permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero(as_tuple=False)
        for expert_idx in expert_hit.flatten().tolist():
            selection_idx, token_idx = torch.where(expert_mask[expert_idx].squeeze(0))
            if token_idx.numel() == 0:
                continue
            current = hidden_states[token_idx]
            if expert_idx < self.num_experts:
                current = self[expert_idx](current)
            current = current * top_k_weights[token_idx, selection_idx, None]
            final_hidden_states.index_add_(0, token_idx, current.to(hidden_states.dtype))
        return final_hidden_states


class IdentityExpertsAdapter(StandardAdapter):
    """Standard storage; ``gate_up_proj`` has extra (unread) slabs for the identity experts."""

    block_class = IdentityExpertsBlock
    # Transformers merges the per-expert weights into [n_routed, 2I, H] but the model holds
    # [n_routed + zero_expert_num, 2I, H]: a per-expert checkpoint fails to load stock.
    stock_per_expert = False

    def applies(self, module: nn.Module) -> bool:
        return getattr(module, "gate_up_proj", None) is not None and getattr(module, "down_proj", None) is not None

    def layout(self, module: nn.Module) -> ExpertLayout:
        return ExpertLayout()

    def tensors(self, module: nn.Module | None, layout: ExpertLayout) -> list[FusedTensor]:
        gate_up, down = layout_tensors(layout)
        routed = module.num_routed_experts if module is not None else None  # None: checkpoint patterns only
        return [FusedTensor(gate_up.path, gate_up.pieces, gate_up.leaves, carved_experts=routed), down]

    def check(self, module: nn.Module, layout: ExpertLayout, path: str) -> ExpertShapes:
        routed, total = module.num_routed_experts, module.total_experts
        hidden, inter = module.hidden_size, module.intermediate_size
        require(module, path, "gate_up_proj", (total, 2 * inter, hidden))
        require(module, path, "down_proj", (routed, hidden, inter))
        return ExpertShapes(routed, hidden, inter)

    def describe(self, layout: ExpertLayout) -> str:
        return f"{layout.describe()} + identity experts"
