"""llm-compressor's GPTQ Hessian hooks, run for all the experts of a role at once in the grouped forward.

``GPTQModifier`` registers ``calibrate_module`` as a forward hook on every Linear it quantizes
(through ``HooksMixin.register_hook``, which wraps it so ``HooksMixin.disable_hooks`` can switch it
off). Per call and expert that hook converts the rows to float32, scales them by sqrt(2), adds
``inp.matmul(inp.t())`` to the module's Hessian and one to its sample count: about eight small
kernels and a Python call chain per expert, which on a GPU bound the calibration forward.

:func:`batched_gptq_hessians` registers the hook with the grouped forward
(``calibration.grouped.register_batched_hook``): per grouped call each role's input is converted
and scaled once, each expert's product is computed once (the same operands, strides and summation
order as the hook's matmul) and added to every Hessian whose module saw those rows (gate and up
share their input: one product for both), and the sample counts are bumped in one multi-tensor
add. The Hessians are those of the hook, bit for bit where the matmul kernel is the same. A hook that is
switched off is skipped, as it would return at once; a module the hook has not seen yet (first
call: it allocates the Hessian), a Hessian on another device, or not a plain ``nn.Linear`` gets the
hook itself; a subclass's own ``calibrate_module``, or a changed llm-compressor (another hook
wrapper), is never batched.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from defuser_quant.calibration.gram import PRODUCT_BUDGET, QueuedAdds, gram_operands
from defuser_quant.calibration.grouped import (
    BatchedForwardHook,
    register_batched_hook,
    unregister_batched_hook,
    wrapper_code,
)

from .grouped import hooks_mixin_live, hooks_mixin_parts

__all__ = ["GPTQ_HESSIANS", "HessianBatching", "batched_gptq_hessians", "last_batching"]

logger = logging.getLogger(__name__)

GPTQ_HESSIANS = "llmcompressor.gptq_calibrate_module"


@dataclass
class HessianBatching:
    """What ran inside one :func:`batched_gptq_hessians` block: accumulations done batched, the
    products they needed (roles that share their rows share one), and accumulations left to the
    hook itself (first call of a module, Hessian elsewhere, not a plain Linear)."""

    batched: int = 0
    products: int = 0
    by_hook: int = 0


_LAST = HessianBatching()


def last_batching() -> HessianBatching:
    """The counts of the latest (or current) :func:`batched_gptq_hessians` block."""
    return _LAST


class _LLMC:
    """llm-compressor names, resolved when the batched hook is registered."""

    GPTQModifier = None
    HooksMixin = None
    precision = torch.float32
    wrapped_hook_code = None


def _match(hook: Callable) -> tuple[object, object] | None:
    """``(the GPTQModifier, the hook's handle cell)`` for GPTQ's wrapped ``calibrate_module`` hook."""
    parts = hooks_mixin_parts(hook, _LLMC.wrapped_hook_code)
    if parts is None:
        return None
    bound, handle = parts
    if getattr(bound, "__func__", None) is not _LLMC.GPTQModifier.calibrate_module:  # an override is called as is
        return None
    return bound.__self__, handle


def _run(modifier: object, members: list) -> None:
    """The hooks of one grouped call: each distinct input converted and scaled once, each expert's
    product computed once and added to every Hessian whose module saw those rows (gate and up).

    Products are held until :data:`PRODUCT_BUDGET` bytes of them are waiting, then added in one
    multi-tensor kernel (a block's products kept together would be experts x features^2 floats)."""
    live = hooks_mixin_live(_LLMC.HooksMixin)
    if live is None:
        return  # every wrapped hook returns at once (the propagation pass)
    hessians, counts = modifier._hessians, modifier._num_samples
    inputs: dict[int, tuple[torch.Tensor, dict[tuple[int, int], list[torch.Tensor]]]] = {}
    bumped = []
    for module, handle, rows, start, size in members:
        if not live(handle):
            continue  # the wrapped hook returns at once
        hessian = hessians.get(module) if module in counts else None
        if hessian is None or type(module) is not nn.Linear or hessian.device != rows.device or rows.dim() != 2:
            modifier.calibrate_module(module, (rows[start:start + size],), None)  # the hook's own path (allocates on first use)
            _LAST.by_hook += 1
            continue
        inputs.setdefault(id(rows), (rows, {}))[1].setdefault((start, size), []).append(hessian)
        bumped.append(counts[module])
    adds = QueuedAdds(PRODUCT_BUDGET)
    for rows, spans in inputs.values():
        scaled = math.sqrt(2) * rows.to(dtype=_LLMC.precision)  # the hook's conversion, elementwise: once per input
        for (inp, inp_t), targets in zip(gram_operands(scaled, list(spans)), spans.values()):
            # the hook's inp.matmul(inp.t()): inp is its [features, rows] view of the [rows, features] input
            adds.add(targets, torch.mm(inp, inp_t))
            _LAST.products += 1
        adds.flush()
        del scaled
    if bumped:
        torch._foreach_add_(bumped, 1)  # a 2-D input is one sample to the hook (unsqueezed to a batch of one)
        _LAST.batched += len(bumped)


@contextmanager
def batched_gptq_hessians() -> Iterator[bool]:
    """Register GPTQ's Hessian hook as batchable inside the ``with`` block; yields whether it could be
    recognised (False: llm-compressor's hook wrapper changed, the hooks are called one by one)."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.gptq.helpers import GPTQ_PRECISION
    from llmcompressor.modifiers.utils.hooks import HooksMixin

    _LLMC.GPTQModifier, _LLMC.HooksMixin, _LLMC.precision = GPTQModifier, HooksMixin, GPTQ_PRECISION
    _LLMC.wrapped_hook_code = wrapper_code(HooksMixin.register_hook, "wrapped_hook")
    if _LLMC.wrapped_hook_code is None:
        yield False
        return
    global _LAST
    _LAST = HessianBatching()
    register_batched_hook(GPTQ_HESSIANS, BatchedForwardHook(match=_match, run=_run))
    try:
        yield True
    finally:
        unregister_batched_hook(GPTQ_HESSIANS)
        logger.debug("GPTQ Hessians: %d accumulations batched (%d products), %d through the hook",
                     _LAST.batched, _LAST.products, _LAST.by_hook)
