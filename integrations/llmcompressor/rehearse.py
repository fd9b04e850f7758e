"""``DefuseModifier(rehearse=True)``: the calibration's and the GPTQ solve's CUDA kernels launched once ahead.

A fresh ``oneshot`` process loads each CUDA kernel the first time it launches it, and its main thread waits
for every load (``defuser_quant.calibration.first_use``). At ``on_initialize`` the modifier starts
:func:`calibration_steps` on a background thread: the attention, the projections' half-precision products,
the GPTQ Hessian products of every input width and the grouped expert forward, at the model's sizes, while
llm-compressor's own set-up (quantization schemes, offloading, tracing) runs on the CPU. At
``on_calibration_start``, once the schemes are attached, :func:`solve_steps` adds llm-compressor's
``quantize_weight`` (the Hessian factorization, the block updates) on a batch of two zero weights of each
distinct quantized shape and scheme, long before layer 0's solve. Every shape and dtype is read here, on the
main thread; the steps touch no model tensor and no llm-compressor state.
"""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from defuser_quant.calibration.first_use import (
    rehearse_attention,
    rehearse_grouped_experts,
    rehearse_hessian_products,
    rehearse_linears,
)
from defuser_quant.core import DefusedExperts
from defuser_quant.core.model_config import text_config

__all__ = ["calibration_steps", "cuda_device", "solve_steps", "triton_key_step"]

logger = logging.getLogger(__name__)

Step = tuple[str, Callable[[], Any]]


def cuda_device(model: nn.Module) -> torch.device | None:
    """The CUDA device of the model's first parameter there (None: nothing of it on a GPU)."""
    for parameter in model.parameters():
        if parameter.device.type == "cuda":
            return parameter.device
    return None


def _linears(model: nn.Module) -> list[nn.Linear]:
    output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return [m for m in model.modules() if isinstance(m, nn.Linear) and m is not output]


def calibration_steps(model: nn.Module, blocks: Iterable[DefusedExperts], device: torch.device,
                      tokens: int = 256) -> list[Step]:
    """The steps a calibration forward's first calls need (see the module docstring); shapes read now."""
    blocks = list(blocks)
    config = getattr(model, "config", None)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    experts = {id(m) for block in blocks for m in block.modules()}
    linears = _linears(model)
    shapes = [tuple(m.weight.shape) for m in linears if id(m) not in experts]
    widths = [m.in_features for m in linears]
    grouped: list[Step] = []
    if blocks and len(blocks[0]):
        block, first = blocks[0], blocks[0][0]
        gate, up, down = (first.projection(role) for role in ("gate", "up", "down"))
        hidden, intermediate = up.in_features, down.in_features
        shapes.append((block.num_experts, hidden))  # the router's product
        top_k = int(getattr(text_config(config), "num_experts_per_tok", None) or 2)
        gate_fn = first.gate_fn
        grouped.append(("grouped_experts", lambda: rehearse_grouped_experts(
            device, dtype, hidden, intermediate, top_k, gate_fn, gated=gate is not None, tokens=tokens)))
    steps: list[Step] = [("linears", lambda: rehearse_linears(device, dtype, shapes, tokens)),
                         ("hessian_products", lambda: rehearse_hessian_products(device, dtype, widths, tokens)),
                         *grouped]
    if config is not None:  # late: its masked kernel (padded batches only) took 1.1 s to load on an H100 (round 44)
        # llm-compressor calibrates with eager attention: the modeling file's own function then
        eager = getattr(sys.modules.get(type(model).__module__), "eager_attention_forward", None)
        steps.append(("attention", lambda: rehearse_attention(device, config, dtype, tokens=tokens, eager=eager)))
    steps.append(("triton_key", triton_key_step))
    return steps


def triton_key_step() -> bool:
    """Triton's ``triton_key`` (a hash of Triton's own files, cached per process; its first call took 0.5 s
    of layer 0's solve on an H100, round 45); False where Triton or the function is missing."""
    for module_name in ("triton.runtime.cache", "triton.compiler.compiler"):
        try:
            key = getattr(importlib.import_module(module_name), "triton_key", None)
        except ImportError:
            continue
        if callable(key):
            key()
            return True
    return False


def solve_steps(model: nn.Module, device: torch.device) -> list[Step]:
    """llm-compressor's ``quantize_weight`` on two zero weights (identity Hessians) of each distinct shape,
    dtype and weight scheme among the modules with a quantization scheme (none before the schemes are attached)."""
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    seen: dict[tuple, Step] = {}
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        args = getattr(scheme, "weights", None)
        weight, scale, zero = (getattr(module, n, None) for n in ("weight", "weight_scale", "weight_zero_point"))
        if args is None or not all(isinstance(t, torch.Tensor) for t in (weight, scale, zero)) or weight.dim() != 2:
            continue
        global_scale = getattr(module, "weight_global_scale", None)
        key = (tuple(weight.shape), tuple(scale.shape), scale.dtype, tuple(zero.shape), zero.dtype,
               global_scale is not None, args.model_dump_json() if hasattr(args, "model_dump_json") else repr(args))
        if key not in seen:
            same_shape = sum(k[0] == key[0] for k in seen)  # another scheme of that shape: a name of its own
            name = f"solve {tuple(weight.shape)}" + (f" #{same_shape + 1}" if same_shape else "")
            seen[key] = (name, _solve(quantize_weight, device, tuple(weight.shape), scale, zero, global_scale is not None,
                                      args))
    return list(seen.values())


def _solve(quantize_weight: Callable, device: torch.device, shape: tuple[int, int], scale: torch.Tensor,
           zero: torch.Tensor, has_global_scale: bool, args: Any, batch: int = 2) -> Callable[[], None]:
    rows, columns = shape
    scale_shape, scale_dtype, zero_shape, zero_dtype = tuple(scale.shape), scale.dtype, tuple(zero.shape), zero.dtype

    def run() -> None:
        with torch.no_grad():
            weights = torch.zeros(batch, rows, columns, device=device, dtype=torch.float32)
            hessians = torch.eye(columns, device=device, dtype=torch.float32).expand(batch, columns, columns).clone()
            scales = torch.ones((batch, *scale_shape), device=device, dtype=scale_dtype)
            zeros = torch.zeros((batch, *zero_shape), device=device, dtype=zero_dtype)
            global_scales = torch.ones(batch, device=device, dtype=torch.float32) if has_global_scale else None
            quantize_weight(weights, hessians, scales, zeros, global_scales, args)

    return run
