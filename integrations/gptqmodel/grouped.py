"""GPTQModel's ``HookedLinear`` in the grouped calibration forward (``calibration.grouped``).

During ``quantize()`` GPTQModel swaps every ``nn.Linear`` of the layer for a ``HookedLinear``,
whose forward is ``F.linear`` plus a call of its ``forward_hook`` attribute (the GPTQ Hessian
accumulation), unless W4A replay rounding or an online Hadamard rotation is configured on it.
:func:`hooked_linear_grouping` lets plain ones take part in the grouped forward, with the hook
called as ``HookedLinear.forward`` calls it; the others keep the per-expert loop. With
``batched_hessians`` (the default) GPTQModel's GPTQ Hessian hooks of a grouped call run together
at its end (:mod:`.hessians`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from defuser_quant.calibration.grouped import LinearAdapter, register_linear_adapter, unregister_linear_adapter

from .hessians import HessianBatching, gptq_hessian_batching, last_batching

__all__ = ["hooked_linear_grouping"]


def _is_plain(module: nn.Module, x: torch.Tensor) -> bool:
    weight = module.weight
    replay = None if getattr(module, "_w4a_replay_disabled", False) else getattr(module, "_w4a_stream_replay_mode", None)
    return (
        weight.device == x.device
        and replay is None
        and not getattr(module, "online_full_had", False)
        and not getattr(module, "online_partial_had", False)
    )


def _inner_hook(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
    hook = getattr(module, "forward_hook", None)
    if hook:
        hook(module, (x,), out)
        if module.forward_hook_last:
            from gptqmodel.nn_modules.hooked_linear import STOP_FORWARD_EXCEPTION

            raise STOP_FORWARD_EXCEPTION.with_traceback(None)


@contextmanager
def hooked_linear_grouping(batched_hessians: bool = True) -> Iterator[HessianBatching | None]:
    """Register ``HookedLinear`` with the grouped forward inside the ``with`` block; yields the
    Hessian batching counts (None: ``batched_hessians`` off, or GPTQModel's hook chain unknown)."""
    from gptqmodel.nn_modules.hooked_linear import HookedLinear

    with ExitStack() as stack:
        kind = stack.enter_context(gptq_hessian_batching()) if batched_hessians else None
        register_linear_adapter(HookedLinear, LinearAdapter(is_plain=_is_plain, inner_hook=_inner_hook, inner_kind=kind))
        try:
            yield None if kind is None else last_batching()
        finally:
            unregister_linear_adapter(HookedLinear)
