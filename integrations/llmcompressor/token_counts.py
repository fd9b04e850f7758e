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

import torch
from torch import nn

from defuser_quant.calibration import add_rows, counts_on_device, current_provenance, whole_batch_routed
from defuser_quant.calibration.capture import PendingRows
from defuser_quant.calibration.grouped import (
    BatchedForwardHook,
    register_batched_hook,
    unregister_batched_hook,
)

from .grouped import hooks_mixin_live, hooks_mixin_parts, wrapped_hook_code

__all__ = ["TOKEN_COUNTS", "ExpertTokenCounts", "TokenCounter", "batched_token_counts"]

TOKEN_COUNTS = "defuser_quant.llmcompressor_token_counts"


class ExpertTokenCounts(dict):
    """One block's ``{"routed": [...], "forced": [...]}`` rows per expert (host ints).

    A whole-batch call without a host sync (``DefuseModifier(sync_free_calibration=True)``) hands each
    expert's routed rows over as a device tensor; the batched counter adds them there
    (:meth:`add_on_device`), and any read of ``"routed"`` or ``"forced"`` first folds them into the
    lists at one host read."""

    def __init__(self, num_experts: int):
        super().__init__(routed=[0] * num_experts, forced=[0] * num_experts)
        self._pending = PendingRows()

    def __getitem__(self, key: str) -> list[int]:
        self.fold()
        return super().__getitem__(key)

    def fold(self) -> None:
        """Add the rows counted on the device to the host lists (one host read; nothing when none)."""
        taken = self._pending.take()
        if taken is None:
            return
        for key, values in zip(("routed", "forced"), taken.tolist()):
            lists = super().__getitem__(key)
            lists[:] = [a + b for a, b in zip(lists, values)]

    def add_on_device(self, experts: list[int], rows: list[int], routed: torch.Tensor) -> None:
        """A whole-batch call's rows: ``rows[i]`` for expert ``experts[i]``, of which ``routed[e]`` (a tensor over
        every expert of the block, on its device) were routed; added without a host sync."""
        num_experts = len(super().__getitem__("routed"))
        device = routed.device
        if experts == list(range(num_experts)) and len(set(rows)) == 1:
            add_routed, add_forced = routed.to(torch.long), rows[0] - routed.to(torch.long)
        else:
            index = torch.tensor(experts, dtype=torch.long).to(device, non_blocking=True)
            sizes = torch.tensor(rows, dtype=torch.long).to(device, non_blocking=True)
            picked = routed.to(torch.long)[index]
            add_routed = torch.zeros(num_experts, dtype=torch.long, device=device).index_add_(0, index, picked)
            add_forced = torch.zeros(num_experts, dtype=torch.long, device=device).index_add_(0, index, sizes - picked)
        self._pending.add(add_routed, add_forced)


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
    # grouped rows are 2-D: size of them
    taken = [(expert, size) for _module, (handle, expert), _rows, _start, size in members if live(handle)]
    routed = whole_batch_routed() if current_provenance() == "all" else None
    if isinstance(counts, ExpertTokenCounts) and counts_on_device(routed):
        if taken:  # the routed rows were left on the device: count there, no host sync
            counts.add_on_device([e for e, _ in taken], [n for _, n in taken], routed)
        return
    for expert, size in taken:
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
