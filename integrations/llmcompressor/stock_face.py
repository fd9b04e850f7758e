"""What stock llm-compressor expects of a linearized experts block, offered by our blocks.

Blocks that llm-compressor's linearization builds through our hook (``linearize.py``) stand in
for its ``LinearExperts2D``; code written for stock llm-compressor must keep working on them:

* ``moe_calibration_context()`` (which ``oneshot`` enters by default) sends every token through
  every expert: :class:`FollowCalibrationFlag` is their default ``forward_override`` and does so
  while the flag is set (outputs stay those of top-k routing);
* ``repack_moe()`` finds ``LinearExperts2D`` instances and calls ``to_experts_module()``: our
  blocks are instances (:func:`linear_experts_view`) whose ``to_experts_module`` re-fuses with
  the core and packs ``weight_*`` quantization parameters the way llm-compressor does;
* ``num_experts``, ``intermediate_size``, ``has_gate``, ``has_bias``, ``is_transposed``,
  ``is_concatenated``, ``act_fn``, ``alpha``, ``limit``, ``_source_experts_cls``, ``_source_config`` read as on
  ``LinearExperts2D``. ``num_experts`` cannot be changed (llm-compressor's REAP pruning edits
  ``LinearExperts2D`` children in place, which a defused block does not support: it fails
  instead of pruning wrongly).
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn
from transformers.activations import ACT2FN

from defuser_quant.calibration.routing import whole_batch_forward
from defuser_quant.core import DefusedExperts, DefuserQuantError, fuse_model
from defuser_quant.core.generated import pickled_through

__all__ = ["FollowCalibrationFlag", "linear_experts_face", "linear_experts_view", "stock_calibration_flag"]

# Keep in sync with llm-compressor 0.14 linear_experts._WEIGHT_QPARAM_NAMES.
_WEIGHT_QPARAMS = tuple(f"weight_{s}" for s in ("global_scale", "scale", "shape", "zero_point", "g_idx"))


def stock_calibration_flag() -> bool:
    """llm-compressor's all-experts flag (set inside ``moe_calibration_context()``)."""
    from llmcompressor.modeling.moe.context import get_calibrate_all_experts_flag

    return get_calibrate_all_experts_flag()


class FollowCalibrationFlag:
    """``forward_override`` of blocks built for llm-compressor: all experts while its flag is set.

    The output is always ``routed_forward``'s (top-k routing, exact); with the flag set every
    expert's ``nn.Linear`` hooks see one call per batch over every token in token order
    (:func:`~defuser_quant.calibration.routing.whole_batch_forward`), the calls stock
    ``LinearExperts2D`` makes.
    """

    def __call__(self, block: DefusedExperts, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if stock_calibration_flag():
            return whole_batch_forward(block, hidden, index, weights)[0]
        return block.routed_forward(hidden, index, weights)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FollowCalibrationFlag)

    def __hash__(self) -> int:
        return hash(FollowCalibrationFlag)


def _stacked(block: DefusedExperts, role: str, qparam: str) -> torch.Tensor | None:
    values = [getattr(expert.projection(role), qparam, None) for expert in block]
    return None if any(v is None for v in values) else torch.stack(values)


def _pack_weight_qparams(block: DefusedExperts, fused: nn.Module) -> None:
    """Per-expert ``weight_*`` qparams onto ``fused`` as ``{gate_up,up,down}_proj_{suffix}``, as
    llm-compressor's ``LinearExperts2D._pack_weight_qparams`` does (by role, whatever the names)."""
    for qparam in _WEIGHT_QPARAMS:
        suffix = qparam.removeprefix("weight_")
        packed = {}
        if block.layout.has_gate:
            gate, up = _stacked(block, "gate", qparam), _stacked(block, "up", qparam)
            if gate is not None and up is not None:
                packed["gate_up_proj"] = torch.stack([gate, up], dim=-1) if gate.ndim == 1 else torch.cat([gate, up], dim=-1)
        elif (up := _stacked(block, "up", qparam)) is not None:
            packed["up_proj"] = up
        if (down := _stacked(block, "down", qparam)) is not None:
            packed["down_proj"] = down
        for name, tensor in packed.items():
            setattr(fused, f"{name}_{suffix}", nn.Parameter(tensor, requires_grad=False))


def _stock_moe_config(block: DefusedExperts) -> Any:
    """What llm-compressor reads from the config for a ``LinearExperts2D`` (activation, alpha, limit)."""
    from llmcompressor.modeling.moe.helpers import MoEConfig

    return MoEConfig.from_config(block._source_config)


class _Holder(nn.Module):
    def __init__(self, experts: nn.Module):
        super().__init__()
        self.experts = experts


@functools.lru_cache(maxsize=None)
def linear_experts_face() -> type:
    """A ``LinearExperts2D`` subclass holding the stock attributes, mixed into our block classes."""
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D

    class LinearExpertsFace(LinearExperts2D):
        def __init__(self, *args: Any, **kwargs: Any) -> None:  # our block constructors build the module
            nn.Module.__init__(self)

        @property
        def num_experts(self) -> int:
            return self.__dict__["num_experts"]

        @num_experts.setter
        def num_experts(self, value: int) -> None:
            current = self.__dict__.get("num_experts")
            if current is not None and value != current:
                raise DefuserQuantError(
                    f"{type(self).__name__}: the number of experts of a defused block is fixed ({current}); pruning "
                    "experts in place (llm-compressor's REAP) is not supported on defuser-quant blocks. Load the model "
                    "without `import defuser_quant.integrations.llmcompressor` to prune with llm-compressor's own blocks"
                )
            self.__dict__["num_experts"] = value

        @property
        def intermediate_size(self) -> int:
            return self[0].projection("up").out_features

        has_gate = property(lambda self: self.layout.has_gate)
        has_bias = property(lambda self: self.layout.has_bias)
        is_transposed = property(lambda self: self.layout.is_transposed)
        is_concatenated = property(lambda self: self.layout.is_concatenated)
        @property
        def act_fn(self) -> Any:
            shell_act = getattr(self.fused_shell, "act_fn", None)
            return shell_act if shell_act is not None else ACT2FN[_stock_moe_config(self).hidden_act]

        alpha = property(lambda self: _stock_moe_config(self).alpha)
        limit = property(lambda self: _stock_moe_config(self).limit)
        swiglu_limit = limit
        _source_experts_cls = property(lambda self: self.fused_class)
        _source_config = property(lambda self: self.__dict__.get("config", getattr(self.fused_shell, "config", None)))

        @torch.no_grad()
        def to_experts_module(self) -> nn.Module:
            """This block re-fused into its native experts class, with ``weight_*`` qparams packed."""
            holder = _Holder(self)
            fuse_model(holder)
            fused = holder.experts
            _pack_weight_qparams(self, fused)
            return fused

    LinearExpertsFace.__module__ = __name__
    return LinearExpertsFace


@functools.lru_cache(maxsize=None)
def linear_experts_view(block_cls: type[DefusedExperts]) -> type:
    """``block_cls`` that is also a stock ``LinearExperts2D`` (what ``repack_moe`` and stock code look for)."""
    body = {"__module__": __name__, **pickled_through(linear_experts_view, block_cls)}
    return type(block_cls.__name__, (block_cls, linear_experts_face()), body)


def as_stock_linear_experts(block: DefusedExperts) -> DefusedExperts:
    """``block``, now also a ``LinearExperts2D`` that follows llm-compressor's all-experts flag (in place)."""
    if not isinstance(block, linear_experts_face()):
        block.__class__ = linear_experts_view(type(block))
    if block.forward_override is None:
        block.forward_override = FollowCalibrationFlag()
    return block
