"""GPTQ under ``torchrun`` with routed experts: the same Hessian bookkeeping on every rank.

llm-compressor 0.14's ``GPTQModifier`` keeps one Hessian per module in a dict filled in the order
the modules' hooks first fire, and under ``torchrun`` reduces them to their owning rank one by one
in that dict order. Stock ``LinearExperts2D`` calls every expert on every batch, so every rank
meets them in one order. Routed experts are called only when the router picks them, so ranks
meet them in different orders, and an expert may meet no token on one rank and some on another:
the reductions would then pair different modules' Hessians (same shape, no error) or hang.
:func:`align_hessians` runs right before GPTQ compresses (:func:`before_compress` wraps the
modifier's ``compress_modules``: under ``oneshot``'s independent pipeline no other modifier sees
GPTQ's epochs): every rank's dicts get the union of the modules any rank calibrated (zeros where
this rank saw none: a sum is unchanged) in model order, found with one all-reduce of a flag per
candidate module. A module no rank calibrated stays absent, as in one process (a zero Hessian
would zero its weights). After compressing modules that run on the CPU the ranks wait for each
other: there llm-compressor does not broadcast solved weights (they sit in shared memory) and
had no barrier, so a rank could propagate activations through weights another rank was still
writing (a race: later layers differed run to run and from one process). On GPUs the owner
broadcasts them and no barrier is added. What this adds per layer under torchrun: one
all-reduce (plus the barrier on the CPU; ``routing: budgeted`` adds its top-up's three).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from defuser_quant.calibration import distributed

__all__ = ["align_hessians", "before_compress", "has_hessians"]

logger = logging.getLogger(__name__)


def _hessian_state(modifier: Any) -> tuple[dict, dict] | None:
    hessians, samples = getattr(modifier, "_hessians", None), getattr(modifier, "_num_samples", None)
    return (hessians, samples) if isinstance(hessians, dict) and isinstance(samples, dict) else None


def has_hessians(modifier: Any) -> bool:
    """True for GPTQ-like modifiers (per-module Hessian tables, solved in ``compress_modules``)."""
    return _hessian_state(modifier) is not None and hasattr(modifier, "compress_modules")


def _module_order(modifier: Any, model: nn.Module, hessians: dict) -> list[nn.Module]:
    """The modules a Hessian may belong to, in model order, the same on every rank."""
    names = getattr(modifier, "_module_names", None)  # GPTQ's targets, in model order
    if isinstance(names, dict) and all(m in names for m in hessians):
        return list(names)
    return [m for _, m in model.named_modules(remove_duplicate=False)]


def align_hessians(modifiers: Iterable[Any], model: nn.Module) -> int:
    """Give every GPTQ-like modifier the same Hessian keys in model order on every rank; returns
    the number of zero Hessians added here. A collective: every rank calls it at the same point;
    one small all-reduce per modifier (a flag per candidate module), whatever the model's size."""
    if not distributed.is_distributed():
        return 0
    from compressed_tensors.offload import get_execution_device
    from llmcompressor.modifiers.gptq.helpers import make_empty_hessian

    added = 0
    for modifier in modifiers:
        state = _hessian_state(modifier)
        if state is None:
            continue
        hessians, samples = state
        order = _module_order(modifier, model, hessians)
        flags = distributed.all_reduce_ints([int(m in hessians) for m in order])
        union = [m for m, flag in zip(order, flags) if flag]
        for module in union:
            if module not in hessians:
                device = get_execution_device(module)
                hessians[module] = make_empty_hessian(module, device=device)
                samples[module] = torch.zeros((), device=device)
                added += 1
        for table in (hessians, samples):
            entries = {module: table[module] for module in union}
            table.clear()
            table.update(entries)
    if added:
        logger.debug("rank %d: %d module(s) calibrated only on other ranks get zero Hessians here", distributed.rank(), added)
    return added


def _on_cpu(modules: Iterable[nn.Module]) -> bool:
    from compressed_tensors.offload import get_execution_device

    return any(get_execution_device(m).type == "cpu" for m in modules)


def before_compress(modifiers: Iterable[Any], model: nn.Module, first: Callable[[], None]) -> Callable[[], None]:
    """Make every GPTQ-like modifier run ``first()`` then :func:`align_hessians` before each
    ``compress_modules``, and a barrier after it; returns the undo."""
    wrapped = []
    for modifier in modifiers:
        original = getattr(modifier, "compress_modules", None)
        if _hessian_state(modifier) is None or original is None:
            continue

        def compress_modules(*args: Any, _modifier: Any = modifier, _original: Callable = original, **kwargs: Any) -> Any:
            first()
            align_hessians([_modifier], model)
            # the same modules on every rank now, so every rank takes the same decision
            cpu = _on_cpu(_hessian_state(_modifier)[0])
            result = _original(*args, **kwargs)
            if cpu:
                # CPU modules live in shared memory and are not broadcast: without this barrier a rank
                # propagates the next layer's inputs while another rank still writes its solved weights.
                # (GPU modules are broadcast by the owner, which orders every rank's later work after it.)
                dist.barrier()
            return result

        object.__setattr__(modifier, "compress_modules", compress_modules)  # pydantic models refuse plain setattr
        wrapped.append(modifier)

    def undo() -> None:
        for modifier in wrapped:
            modifier.__dict__.pop("compress_modules", None)

    return undo
