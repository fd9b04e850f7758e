"""llm-compressor's GPTQ Hessian hooks, run for all the experts of a role at once in the grouped forward.

``GPTQModifier`` registers ``calibrate_module`` as a forward hook on every Linear it quantizes
(through ``HooksMixin.register_hook``, which wraps it so ``HooksMixin.disable_hooks`` can switch it
off). Per call and expert that hook converts the rows to float32, scales them by sqrt(2), adds
``inp.matmul(inp.t())`` to the module's Hessian and one to its sample count: about eight small
kernels and a Python call chain per expert, which on a GPU bound the calibration forward.

:func:`batched_gptq_hessians` registers the hook with the grouped forward
(``calibration.grouped.register_batched_hook``): per grouped call each role's input is converted
and scaled once, each expert's product is computed once (the same operands, strides and summation
order as the hook's matmul; on a GPU, where every expert saw as many rows, from one ``bmm`` on the
shapes where that gives the same bits, ``calibration.gram.gram_products``) and added to every Hessian
whose module saw those rows (gate and up share their input: one product for both), and the sample
counts are bumped in one multi-tensor add. The Hessians are those of the hook, bit for bit where the
matmul kernel is the same. A hook that is switched off is skipped, as it would return at once; a
module the hook has not seen yet (first call: it allocates the Hessian), a Hessian on another device,
or not a plain ``nn.Linear`` gets the hook itself; a subclass's own ``calibrate_module``, or a changed
llm-compressor (another hook wrapper), is never batched.

**Shared accumulation** (``share=True``, the default). With ``routing: all`` every gate and up
projection of a block sees the same rows in the same order on every call, so their Hessians are
equal bit for bit, and each call adds one product to all of them (256 Hessians of 2048 x 2048
floats per Qwen3-30B-A3B block: about 13 GB of memory traffic a call on a GPU). Once a span's
Hessians (four or more) are checked equal, the product goes to one accumulator, a copy of them,
and the Hessians are written once from it when they are next needed (:func:`settle_shared_hessians`):
as GPTQ's ``compress_modules`` starts (patched on its class inside the block: under ``oneshot``'s
independent pipeline no other modifier sees GPTQ's epoch events), before a per-expert loop, before
a module's own hook, and at the block's end. A subclass with its own ``compress_modules`` never
shares. The accumulator receives the same adds in the same order as each Hessian would, so the
settled Hessians are the per-module ones bit for bit. A Hessian written by anything else meanwhile
(its version counter moved) cannot be restored exactly: that raises :class:`SharedHessianError`
(once the others are written) instead of solving it wrong.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from defuser_quant.calibration.gram import PRODUCT_BUDGET, QueuedAdds, gram_products
from defuser_quant.calibration.grouped import (
    BatchedForwardHook,
    register_batched_hook,
    unregister_batched_hook,
)
from defuser_quant.core.errors import DefuserQuantError

from .grouped import hooks_mixin_live, hooks_mixin_parts, wrapped_hook_code

__all__ = ["GPTQ_HESSIANS", "SHARE_MIN_TARGETS", "HessianBatching", "SharedHessianError", "batched_gptq_hessians",
           "last_batching", "settle_shared_hessians"]

logger = logging.getLogger(__name__)

GPTQ_HESSIANS = "llmcompressor.gptq_calibrate_module"


#: Hessians fed by one product in a call (a span's targets) from which they may share an accumulator.
SHARE_MIN_TARGETS = 4


class SharedHessianError(DefuserQuantError, RuntimeError):
    """A Hessian with a pending shared accumulation was written by something else: its exact value is lost."""


@dataclass
class HessianBatching:
    """What ran inside one :func:`batched_gptq_hessians` block: accumulations done batched, the
    products they needed (roles that share their rows share one), and accumulations left to the
    hook itself (first call of a module, Hessian elsewhere, not a plain Linear). Shared
    accumulation: groups of Hessians that got one accumulator, adds that went to it in place of a
    Hessian, settles (each group written once), and groups refused (their Hessians differed)."""

    batched: int = 0
    products: int = 0
    by_hook: int = 0
    shared_groups: int = 0
    shared_adds: int = 0
    settles: int = 0
    share_refused: int = 0


@dataclass
class _SharedGram:
    """Hessians that are equal and take the same adds, held as one accumulator until settled."""

    acc: torch.Tensor
    targets: list[torch.Tensor]
    versions: list[int]  # each target's version counter when the accumulator was made from it


@dataclass
class _Sharing:
    """The pending shared accumulations of a :func:`batched_gptq_hessians` block."""

    enabled: bool = True
    groups: dict[tuple[int, ...], _SharedGram] = field(default_factory=dict)  # ids of the targets -> group
    members: dict[int, tuple[int, ...]] = field(default_factory=dict)  # id of a target -> its group's key
    refused: set[tuple[int, ...]] = field(default_factory=set)

    def destination(self, targets: list[torch.Tensor], may_share: bool) -> list[torch.Tensor]:
        """Where a product for ``targets`` goes: the group's accumulator, or the targets themselves
        (``may_share``: a new group may be made; its owner's solve settles it first)."""
        key = tuple(map(id, targets))
        group = self.groups.get(key)
        if group is not None:
            if _moved(group):
                self.settle({key})  # writes the others, then raises
            _LAST.shared_adds += len(targets)
            return [group.acc]
        if self.members:
            self.settle_ids(key)  # a target leaves its group
        if not (self.enabled and may_share) or len(targets) < SHARE_MIN_TARGETS or key in self.refused:
            return targets
        if not _all_equal(targets):
            self.refused.add(key)
            _LAST.share_refused += 1
            return targets
        group = _SharedGram(targets[0].clone(), list(targets), [t._version for t in targets])
        self.groups[key] = group
        self.members.update(dict.fromkeys(key, key))
        _LAST.shared_groups += 1
        _LAST.shared_adds += len(targets)
        return [group.acc]

    def settle(self, keys: set[tuple[int, ...]] | None = None) -> None:
        """Write the accumulators of ``keys`` (default: every group) to their Hessians; a group one of
        whose Hessians was written meanwhile raises once the others are written."""
        lost = []
        if keys is None:
            self.refused.clear()  # ids are reused once a solved layer's Hessians are freed
        for key in list(self.groups) if keys is None else keys:
            group = self.groups.pop(key)
            for i in key:
                self.members.pop(i, None)
            moved = _moved(group)
            kept = [t for t in group.targets if id(t) not in moved]
            if kept:
                torch._foreach_copy_(kept, [group.acc] * len(kept))
            _LAST.settles += 1
            lost += moved
        if lost:
            raise SharedHessianError(_LOST)

    def settle_ids(self, ids: Iterable[int]) -> None:
        """Settle the groups that hold any of the Hessians with these ids."""
        keys = {self.members[i] for i in ids if i in self.members}
        if keys:
            self.settle(keys)


_LOST = ("a GPTQ Hessian of an expert gate/up projection was written outside the grouped calibration forward "
         "while its block's shared accumulation was pending (routing 'all'), so its exact value is lost; run with "
         "DefuseModifier(share_hessians=False), or keep other code from calling the experts' GPTQ hooks")


def _moved(group: _SharedGram) -> set[int]:
    """Ids of the group's Hessians written by something else since the accumulator was made."""
    now = [t._version for t in group.targets]
    if now == group.versions:
        return set()
    return {id(t) for t, v, was in zip(group.targets, now, group.versions) if v != was}


def _all_equal(tensors: list[torch.Tensor]) -> bool:
    """Whether every tensor equals the first bit for bit (same dtype, shape, device), with one host sync."""
    first = tensors[0]
    if any(t.dtype != first.dtype or t.shape != first.shape or t.device != first.device for t in tensors):
        return False
    return not bool(torch.stack([torch.ne(t, first).any() for t in tensors[1:]]).any())


_LAST = HessianBatching()
_SHARING: _Sharing | None = None


def last_batching() -> HessianBatching:
    """The counts of the latest (or current) :func:`batched_gptq_hessians` block."""
    return _LAST


class _LLMC:
    """llm-compressor names, resolved when the batched hook is registered."""

    GPTQModifier = None
    HooksMixin = None
    precision = torch.float32
    wrapped_hook_code = None
    settling_compress = None  # GPTQModifier.compress_modules while a block is active: settles first


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
    sharing = _SHARING
    # a class that overrides compress_modules would solve before the shared Hessians are written
    may_share = getattr(type(modifier), "compress_modules", None) is _LLMC.settling_compress
    inputs: dict[int, tuple[torch.Tensor, dict[tuple[int, int], list[torch.Tensor]]]] = {}
    bumped = []
    for module, handle, rows, start, size in members:
        if not live(handle):
            continue  # the wrapped hook returns at once
        hessian = hessians.get(module) if module in counts else None
        if hessian is None or type(module) is not nn.Linear or hessian.device != rows.device or rows.dim() != 2:
            if hessian is not None and sharing is not None:
                sharing.settle_ids([id(hessian)])  # the hook adds to it itself
            modifier.calibrate_module(module, (rows[start:start + size],), None)  # the hook's own path (allocates on first use)
            _LAST.by_hook += 1
            continue
        inputs.setdefault(id(rows), (rows, {}))[1].setdefault((start, size), []).append(hessian)
        bumped.append(counts[module])
    adds = QueuedAdds(PRODUCT_BUDGET)
    for rows, spans in inputs.values():
        scaled = math.sqrt(2) * rows.to(dtype=_LLMC.precision)  # the hook's conversion, elementwise: once per input
        # each Hessian is in one span of one input: the destinations first settle nothing a queued add feeds
        destinations = [targets if sharing is None else sharing.destination(targets, may_share)
                        for targets in spans.values()]
        # the hook's inp.matmul(inp.t()): inp is its [features, rows] view of the [rows, features] input
        for product, targets in zip(gram_products(scaled, list(spans), PRODUCT_BUDGET), destinations):
            adds.add(targets, product)
            _LAST.products += 1
        adds.flush()
        del scaled
    if bumped:
        torch._foreach_add_(bumped, 1)  # a 2-D input is one sample to the hook (unsqueezed to a batch of one)
        _LAST.batched += len(bumped)


def settle_shared_hessians() -> None:
    """Write every pending shared accumulation to its Hessians (see the module docstring); nothing
    outside a :func:`batched_gptq_hessians` block or with none pending."""
    if _SHARING is not None and _SHARING.groups:
        _SHARING.settle()


@contextmanager
def batched_gptq_hessians(share: bool = True) -> Iterator[bool]:
    """Register GPTQ's Hessian hook as batchable inside the ``with`` block; yields whether it could be
    recognised (False: llm-compressor's hook wrapper changed, the hooks are called one by one).
    ``share``: equal Hessians fed the same products share one accumulator until settled (module
    docstring); every pending one is settled when the block ends."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.gptq.helpers import GPTQ_PRECISION
    from llmcompressor.modifiers.utils.hooks import HooksMixin

    _LLMC.GPTQModifier, _LLMC.HooksMixin, _LLMC.precision = GPTQModifier, HooksMixin, GPTQ_PRECISION
    _LLMC.wrapped_hook_code = wrapped_hook_code(HooksMixin)
    if _LLMC.wrapped_hook_code is None:
        yield False
        return
    global _LAST, _SHARING
    if _SHARING is not None:
        raise RuntimeError("batched_gptq_hessians() is already active (one calibration at a time)")
    _LAST = HessianBatching()
    # GPTQ solves in compress_modules, reached from its own epoch events (under oneshot's independent
    # pipeline no other modifier sees them): the shared Hessians are written as it starts
    compress = GPTQModifier.__dict__.get("compress_modules")
    if compress is None:  # not GPTQModifier's own method here: nothing to settle before, so nothing shared
        share = False
        compress = GPTQModifier.compress_modules

    @functools.wraps(compress)
    def compress_modules(self: Any, *args: Any, **kwargs: Any) -> Any:
        settle_shared_hessians()
        return compress(self, *args, **kwargs)

    _SHARING = _Sharing(enabled=share)
    if share:
        GPTQModifier.compress_modules = _LLMC.settling_compress = compress_modules
    register_batched_hook(GPTQ_HESSIANS, BatchedForwardHook(match=_match, run=_run, settle=settle_shared_hessians))
    try:
        yield True
    finally:
        try:
            settle_shared_hessians()
        finally:
            unregister_batched_hook(GPTQ_HESSIANS)
            if GPTQModifier.__dict__.get("compress_modules") is compress_modules:
                GPTQModifier.compress_modules = compress
            _LLMC.settling_compress = None
            _SHARING = None
        logger.debug("GPTQ Hessians: %d accumulations batched (%d products), %d through the hook; shared: %d group(s), "
                     "%d adds to an accumulator, %d settle(s), %d refused", _LAST.batched, _LAST.products,
                     _LAST.by_hook, _LAST.shared_groups, _LAST.shared_adds, _LAST.settles, _LAST.share_refused)
