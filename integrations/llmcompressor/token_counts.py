"""DefuseModifier's per-expert token counters, run for all the experts of a grouped call at once.

``DefuseModifier`` counts each expert's calibration rows with a forward pre-hook on its up
projection (:class:`TokenCounter`), registered through ``HooksMixin.register_hook`` so
llm-compressor switches it off for the propagation pass. Called per expert, that is a Python call
chain per expert and batch. :func:`batched_token_counts` registers the counter with the grouped
forward as a batchable pre-hook (``calibration.grouped.BatchedForwardHook(pre=True)``): per grouped
call every counter of a block adds its rows in one pass, with the same provenance split (the call
runs inside the same routing context) and the same on/off rule as llm-compressor's wrapper.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

from defuser_quant.calibration import add_rows
from defuser_quant.calibration.grouped import (
    BatchedForwardHook,
    register_batched_hook,
    unregister_batched_hook,
)

from .grouped import hooks_mixin_live, hooks_mixin_parts, wrapped_hook_code

__all__ = ["TOKEN_COUNTS", "TokenCounter", "batched_token_counts"]

TOKEN_COUNTS = "defuser_quant.llmcompressor_token_counts"


class TokenCounter:
    """Forward pre-hook on one expert's up projection: counts its input rows by provenance."""

    def __init__(self, counts: dict[str, list[int]], expert: int):
        self.counts = counts
        self.expert = expert

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if args:
            x = args[0]
            add_rows(self.counts, self.expert, x.numel() // x.shape[-1] if x.dim() else 0)


class _Wrapped:
    code = None
    mixin = None


def _match(hook: Callable) -> tuple[object, object] | None:
    """``(the block's counts, (handle cell, expert))`` for a :class:`TokenCounter` in llm-compressor's hook wrapper."""
    parts = hooks_mixin_parts(hook, _Wrapped.code)
    if parts is None or type(parts[0]) is not TokenCounter:
        return None
    counter, handle = parts
    return counter.counts, (handle, counter.expert)


def _run(counts: dict[str, list[int]], members: list) -> None:
    """What each member's wrapped counter would do for its rows (2-D rows: ``size`` of them)."""
    live = hooks_mixin_live(_Wrapped.mixin)
    if live is None:
        return
    for _module, (handle, expert), _rows, _start, size in members:  # grouped rows are 2-D: size of them
        if not live(handle):
            continue
        add_rows(counts, expert, size)


@contextmanager
def batched_token_counts() -> Iterator[bool]:
    """Register :class:`TokenCounter` as a batchable pre-hook inside the ``with`` block; yields
    whether llm-compressor's hook wrapper was recognised (False: the counters are called one by one)."""
    from llmcompressor.modifiers.utils.hooks import HooksMixin

    _Wrapped.code = wrapped_hook_code(HooksMixin)
    _Wrapped.mixin = HooksMixin
    if _Wrapped.code is None:
        yield False
        return
    register_batched_hook(TOKEN_COUNTS, BatchedForwardHook(match=_match, run=_run, pre=True))
    try:
        yield True
    finally:
        unregister_batched_hook(TOKEN_COUNTS)
