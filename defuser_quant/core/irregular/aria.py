"""aria: grouped-GEMM experts that route from router logits themselves.

``AriaExperts`` holds ``fc1.weight`` ``[E, H, 2I]`` and ``fc2.weight`` ``[E, I, H]`` (the
transposed concatenated layout, in ``AriaGroupedExpertsGemm`` children) and is called as
``experts(hidden_states, router_logits)``: it takes the top-k itself, runs the experts on tokens
sorted by expert, and sums the weighted outputs per token. The first half of ``fc1`` goes through
SiLU (our ``gate_proj``), the second half multiplies it (``up_proj``).
"""

from __future__ import annotations

import torch
from torch import nn

from ..defused import DefusedExperts, GateFunction
from ..layout import ExpertLayout, ExpertShapes
from ..tensors import FusedTensor, layout_tensors
from .base import StandardAdapter, require


class AriaDefusedExperts(DefusedExperts):
    """``AriaExperts`` defused: same call, same per-token weighted sum."""

    def forward(self, hidden_states: torch.Tensor, router_logits: torch.Tensor) -> torch.Tensor:
        top_k_index, top_k_weights = self.fused_shell.route_tokens_to_experts(router_logits)
        return self.dispatch(hidden_states, top_k_index, top_k_weights)

    def routed_forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        """Aria's permute / per-expert GEMM / unpermute / weighted sum, expert by expert."""
        top_k = top_k_index.shape[1]
        flat = top_k_index.view(-1)
        sorted_indices = torch.argsort(flat)
        permuted = hidden_states.index_select(0, sorted_indices // top_k)
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        outputs = []
        start = 0
        for expert_idx, count in enumerate(counts):
            if count:
                outputs.append(self[expert_idx](permuted[start : start + count]))
            start += count
        expert_output = torch.cat(outputs) if outputs else permuted.new_zeros(0, hidden_states.shape[-1])
        unpermuted = torch.zeros(
            (top_k_weights.shape[0] * top_k, expert_output.size(1)), dtype=expert_output.dtype, device=expert_output.device
        )
        unpermuted.index_copy_(0, sorted_indices, expert_output)
        unpermuted = unpermuted.view(-1, top_k, expert_output.size(1))
        return (unpermuted * top_k_weights.unsqueeze(-1)).sum(dim=1)


class AriaAdapter(StandardAdapter):
    """Transposed concatenated storage under ``fc1.weight`` / ``fc2.weight``."""

    block_class = AriaDefusedExperts

    def applies(self, module: nn.Module) -> bool:
        return hasattr(getattr(module, "fc1", None), "weight") and hasattr(getattr(module, "fc2", None), "weight")

    def layout(self, module: nn.Module) -> ExpertLayout:
        return ExpertLayout(has_gate=True, has_bias=False, is_transposed=True, is_concatenated=True)

    def tensors(self, module: nn.Module, layout: ExpertLayout) -> list[FusedTensor]:
        gate_up, down = layout_tensors(layout)
        return [FusedTensor("fc1.weight", gate_up.pieces, gate_up.leaves), FusedTensor("fc2.weight", down.pieces, down.leaves)]

    def check(self, module: nn.Module, layout: ExpertLayout, path: str) -> ExpertShapes:
        experts, hidden, inter = module.fc1.groups, module.fc1.in_features, module.fc2.in_features
        require(module, path, "fc1.weight", (experts, hidden, 2 * inter))
        require(module, path, "fc2.weight", (experts, inter, hidden))
        return ExpertShapes(experts, hidden, inter)

    def gate(self, shell: nn.Module, layout: ExpertLayout) -> GateFunction:
        return GateFunction(shell, layout, act=nn.functional.silu)

    def describe(self, layout: ExpertLayout) -> str:
        return f"fc1/fc2 {layout.describe()}, routes itself"
