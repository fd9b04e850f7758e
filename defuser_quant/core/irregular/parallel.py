"""jetmoe: ``JetMoeParallelExperts``, one packed projection per expert over grouped inputs.

Each instance holds ``weight`` ``[E, out, in]`` and is called as ``(inputs, expert_size)`` with
the rows already grouped per expert; jetmoe uses it for the MoE input (gate and up packed in one
``[2I, H]`` projection) and output projections and for the attention experts' query/output
projections. Every expert becomes one ``nn.Linear`` named ``linear`` (the names GPTQModel's
granite/jetmoe definitions use). The grouping is stated as top-1 routing with weight 1, so
``forward_override`` and calibration see the usual contract; the arithmetic is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from ..defused import DefusedExpert, DefusedExperts, GateFunction
from ..layout import ExpertLayout, ExpertShapes
from ..naming import ProjectionNames
from ..slicing import whole_slab
from ..tensors import FusedTensor
from .base import StandardAdapter, require

PARALLEL_NAMES = ProjectionNames(gate=None, up="linear", down=None)  # type: ignore[arg-type]


class SingleLinearExpert(DefusedExpert):
    """One expert that is a single projection."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden_states)


class ParallelLinearExperts(DefusedExperts):
    """``JetMoeParallelExperts`` defused: ``forward(inputs, expert_size) -> [rows, out]``."""

    def forward(self, inputs: torch.Tensor, expert_size) -> torch.Tensor:
        sizes = torch.as_tensor(expert_size, device=inputs.device)
        index = torch.arange(self.num_experts, device=inputs.device).repeat_interleave(sizes).unsqueeze(1)
        weights = torch.ones(inputs.shape[0], 1, dtype=inputs.dtype, device=inputs.device)
        return self.dispatch(inputs, index, weights)

    def new_output(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """One row per input row, ``out_features`` wide (these experts are single projections)."""
        return hidden_states.new_zeros(hidden_states.shape[0], self[0].linear.out_features)


class ParallelLinearAdapter(StandardAdapter):
    """``weight`` ``[E, out, in]``: each slab is one ``nn.Linear`` weight as it is."""

    block_class = ParallelLinearExperts
    expert_class = SingleLinearExpert

    def applies(self, module: nn.Module) -> bool:
        return isinstance(getattr(module, "weight", None), torch.Tensor)

    def layout(self, module: nn.Module) -> ExpertLayout:
        return ExpertLayout(has_gate=False, has_bias=False, is_transposed=False, is_concatenated=True)

    def tensors(self, module: nn.Module, layout: ExpertLayout) -> list[FusedTensor]:
        return [FusedTensor("weight", whole_slab, (("up", "weight"),))]

    def check(self, module: nn.Module, layout: ExpertLayout, path: str) -> ExpertShapes:
        require(module, path, "weight", (module.num_experts, module.output_size, module.input_size))
        return ExpertShapes(module.num_experts, module.input_size, module.output_size)

    def names(self, layout: ExpertLayout, model_type: str | None, fallback_type: str | None) -> ProjectionNames:
        return PARALLEL_NAMES

    def gate(self, shell: nn.Module, layout: ExpertLayout) -> GateFunction:
        return GateFunction(shell, layout, act=lambda x: x)  # unused: an expert is one projection

    def describe(self, layout: ExpertLayout) -> str:
        return "parallel linears [E,out,in], grouped input"
