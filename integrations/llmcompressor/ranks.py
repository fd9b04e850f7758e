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
this rank saw none: a sum is unchanged) in model order. A module no rank calibrated stays
absent, as in one process (a zero Hessian would zero its weights). After compressing, the ranks
wait for each other: on the CPU llm-compressor does not broadcast solved weights (they sit in
shared memory) and had no barrier, so a rank could propagate activations through weights another
rank was still writing (a race: later layers differed run to run and from one process).
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


def align_hessians(modifiers: Iterable[Any], model: nn.Module) -> int:
    """Give every GPTQ-like modifier the same Hessian keys in model order on every rank; returns
    the number of zero Hessians added here. A collective: every rank calls it at the same point."""
    if not distributed.is_distributed():
        return 0
    from compressed_tensors.offload import get_execution_device
    from llmcompressor.modifiers.gptq.helpers import make_empty_hessian

    names = {module: name for name, module in model.named_modules(remove_duplicate=False)}
    order = {name: index for index, name in enumerate(names.values())}
    added = 0
    for modifier in modifiers:
        state = _hessian_state(modifier)
        if state is None:
            continue
        hessians, samples = state
        mine = sorted(names[m] for m in hessians)
        everyone: list = [None] * dist.get_world_size()
        dist.all_gather_object(everyone, mine)
        union = sorted(set().union(*map(set, everyone)), key=order.__getitem__)
        for name in union:
            module = model.get_submodule(name)
            if module not in hessians:
                device = get_execution_device(module)
                hessians[module] = make_empty_hessian(module, device=device)
                samples[module] = torch.zeros((), device=device)
                added += 1
        for table in (hessians, samples):
            entries = {model.get_submodule(name): None for name in union}
            for module in entries:
                entries[module] = table[module]
            table.clear()
            table.update(entries)
    if added:
        logger.debug("rank %d: %d module(s) calibrated only on other ranks get zero Hessians here", distributed.rank(), added)
    return added


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
            result = _original(*args, **kwargs)
            # CPU modules live in shared memory and are not broadcast: without this barrier a rank
            # propagates the next layer's inputs while another rank still writes its solved weights
            dist.barrier()
            return result

        object.__setattr__(modifier, "compress_modules", compress_modules)  # pydantic models refuse plain setattr
        wrapped.append(modifier)

    def undo() -> None:
        for modifier in wrapped:
            modifier.__dict__.pop("compress_modules", None)

    return undo
