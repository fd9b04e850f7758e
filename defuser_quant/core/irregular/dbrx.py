"""dbrx: expert FFN weights flattened over experts in a child ``DbrxExpertGLU``.

``experts.mlp.w1`` / ``v1`` / ``w2`` are ``[E*I, H]``; expert ``e`` computes
``act(x @ w1_e.T) * (x @ v1_e.T) @ w2_e``, so ``w2_e`` is the transpose of a ``down_proj``
``nn.Linear`` weight and is relaid out in place (one expert at a time, undone by ``fuse_model``).
The block is called with ``[batch, seq, H]`` hidden states and returns that shape.
"""

from __future__ import annotations

import torch
from torch import nn

from ..defused import DefusedExperts, GateFunction
from ..layout import ExpertLayout, ExpertShapes
from ..slicing import whole_slab
from ..tensors import FusedTensor
from .base import StandardAdapter, require


def _transposed(slab: torch.Tensor) -> list[torch.Tensor]:
    return [slab.transpose(0, 1)]


class DbrxDefusedExperts(DefusedExperts):
    """``DbrxExperts`` defused: same call and output shapes, per-expert ``nn.Linear`` inside."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        batch_size = hidden_states.shape[0]
        hidden = self.fused_shell.hidden_size
        flat = hidden_states.reshape(-1, hidden)
        out = self.dispatch(flat, top_k_index, top_k_weights)
        return out.view(batch_size, -1, hidden)


class DbrxAdapter(StandardAdapter):
    """Three flattened tensors; gate and up stored ``[out, in]``, down stored ``[in, out]``."""

    block_class = DbrxDefusedExperts

    def applies(self, module: nn.Module) -> bool:
        return all(hasattr(getattr(module, "mlp", None), n) for n in ("w1", "v1", "w2"))

    def layout(self, module: nn.Module) -> ExpertLayout:
        return ExpertLayout(has_gate=True, has_bias=False, is_transposed=False, is_concatenated=False)

    def _slab(self, module: nn.Module) -> tuple[int, int]:
        return (module.ffn_hidden_size, module.hidden_size)

    def tensors(self, module: nn.Module | None, layout: ExpertLayout) -> list[FusedTensor]:
        slab = self._slab(module) if module is not None else None  # None: checkpoint patterns only
        return [
            FusedTensor("mlp.w1", whole_slab, (("gate", "weight"),), slab_shape=slab),
            FusedTensor("mlp.v1", whole_slab, (("up", "weight"),), slab_shape=slab),
            FusedTensor("mlp.w2", _transposed, (("down", "weight"),), slab_shape=slab),
        ]

    def check(self, module: nn.Module, layout: ExpertLayout, path: str) -> ExpertShapes:
        experts, (inter, hidden) = module.num_experts, self._slab(module)
        for name in ("mlp.w1", "mlp.v1", "mlp.w2"):
            require(module, path, name, (experts * inter, hidden))
        return ExpertShapes(experts, hidden, inter)

    def gate(self, shell: nn.Module, layout: ExpertLayout) -> GateFunction:
        return GateFunction(shell, layout, act=shell.mlp.activation_fn)

    def describe(self, layout: ExpertLayout) -> str:
        return "flattened w1/v1/w2 [E*I,H]"

    def exact(self, layout: ExpertLayout) -> bool:
        return False  # w2 is used as x @ w2_e; the Linear computes x @ W.T on the relaid-out copy
