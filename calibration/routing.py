"""Routing modes for defused experts during calibration.

``routing_mode(model, mode)`` sets ``forward_override`` on every ``DefusedExperts`` block and
restores the previous value on exit (also on exceptions):

* ``routed``: normal top-k routing.
* ``all``: every token also goes through every expert it was not routed to (``forced``
  tokens), so each expert's ``nn.Linear`` inputs see every token.
* ``budgeted``: routed, plus forced tokens only for experts whose calibrated count (routed +
  forced so far in this context) is below ``min_tokens``, and only as many as they lack.

In every mode the block output is ``block.routed_forward(...)`` itself, so it is bit-identical
to normal routing by construction. Forced tokens run afterwards, per expert, over the tokens
*not* routed to it, under ``torch.no_grad()`` with provenance ``"forced"``; their outputs are
discarded. (Running each expert once on all tokens and gathering the routed rows is not exact:
a GEMM's per-row result depends on the row count, e.g. fp32 on CPU.)

``whole_batch=True`` (``all`` only) gives each expert's hooks one call over the whole batch in
token order instead (provenance ``"all"``), which is what stock llm-compressor's all-experts
calibration hands them: the routed output is then computed with the experts' hooks off and
every expert runs on every token afterwards, outputs discarded. The gate and up projections of
all experts then see the same rows, so a batched hook (GPTQ's Hessians) needs their product once.

``grouped=True`` runs both the routed and the forced tokens through grouped GEMMs
(:mod:`defuser_quant.calibration.grouped`): every expert projection's hooks still see the same
rows, the outputs differ from the loop's by GEMM rounding only, and blocks that cannot run
grouped (wrapped or hooked-in-other-ways Linears, irregular families) use the loop.
``deterministic=True`` runs the context under :func:`~defuser_quant.calibration.grouped.deterministic_mode`.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, get_args

import torch
from torch import nn

from defuser_quant.core.defused import DefusedExperts

from . import capture
from .capture import defused_blocks, provenance, suspended_hooks, whole_batch
from .grouped import (
    call_plan,
    deterministic_mode,
    grouped_expert_calls,
    grouped_routed_forward_with_counts,
    grouped_whole_batch_calls,
    settle_batched_hooks,
)

__all__ = [
    "DEFAULT_MIN_TOKENS",
    "ROUTING_MODES",
    "BlockCounts",
    "RoutingMode",
    "RoutingSession",
    "routing_mode",
    "whole_batch_forward",
]

logger = logging.getLogger(__name__)

RoutingMode = Literal["routed", "all", "budgeted"]
ROUTING_MODES: tuple[str, ...] = get_args(RoutingMode)
#: Default per-expert token floor of the ``budgeted`` mode and of coverage reports.
DEFAULT_MIN_TOKENS = 128


class _Folded:
    """One of :class:`BlockCounts`' CPU count tensors: the counts still on a device are folded in before it is read
    or replaced."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.attribute = "_" + name

    def __get__(self, counts: BlockCounts | None, owner: type | None = None) -> torch.Tensor:
        if counts is None:
            return self  # type: ignore[return-value]
        counts._fold()
        return getattr(counts, self.attribute)

    def __set__(self, counts: BlockCounts, value: torch.Tensor) -> None:
        counts._fold()
        setattr(counts, self.attribute, value)


class BlockCounts:
    """Tokens one block's experts received inside a routing context (CPU int64, one per expert).

    Counts from calls without a host sync (``sync_free``) are added on their device
    (:meth:`add`) and folded into the CPU tensors, at one host read, the next time
    ``routed`` or ``forced`` is read."""

    routed = _Folded()
    forced = _Folded()

    def __init__(self, routed: torch.Tensor, forced: torch.Tensor):
        self._routed, self._forced = routed, forced
        self._pending = capture.PendingRows()

    @classmethod
    def zeros(cls, num_experts: int) -> BlockCounts:
        return cls(torch.zeros(num_experts, dtype=torch.long), torch.zeros(num_experts, dtype=torch.long))

    def _fold(self) -> None:
        taken = self._pending.take()
        if taken is not None:
            self._routed, self._forced = self._routed + taken[0], self._forced + taken[1]

    @property
    def calibrated(self) -> torch.Tensor:
        return self.routed + self.forced

    def add(self, routed: torch.Tensor, forced: torch.Tensor) -> None:
        """Add one call's rows per expert: on the CPU at once, on another device without a host sync."""
        if not capture.counts_on_device(routed):
            self.routed += routed
            self.forced += forced
        else:
            self._pending.add(routed, forced)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, BlockCounts):
            return NotImplemented
        return torch.equal(self.routed, other.routed) and torch.equal(self.forced, other.forced)

    def __repr__(self) -> str:
        return f"BlockCounts(routed={self.routed!r}, forced={self.forced!r})"


@dataclass
class RoutingSession:
    """State of one ``routing_mode`` context: settings and per-block token counts."""

    mode: RoutingMode
    min_tokens: int
    experts: dict[str, frozenset[int]] | None = None
    observe_routed: bool = True
    counts: dict[str, BlockCounts] = field(default_factory=dict)
    grouped: bool = False
    whole_batch: bool = False
    sync_free: bool = False

    def forced_selection(self, path: str, top_k_index: torch.Tensor, routed: torch.Tensor) -> dict[int, torch.Tensor]:
        """Token indices to force through each expert for this batch (empty for ``routed``)."""
        if self.mode == "routed":
            return {}
        num_experts = routed.numel()
        targets = range(num_experts) if self.experts is None else sorted(self.experts.get(path, ()))
        if self.mode == "budgeted":
            have = (self.counts[path].calibrated + routed).tolist()
            targets = [e for e in targets if have[e] < self.min_tokens]
        if not targets:
            return {}
        complement = _complement(top_k_index, num_experts)
        selection = {}
        for e in targets:
            candidates = complement[e]
            if self.mode == "budgeted":
                candidates = _spread(candidates, self.min_tokens - have[e])
            if candidates.numel():
                selection[e] = candidates
        return selection


def _complement(top_k_index: torch.Tensor, num_experts: int) -> list[torch.Tensor]:
    """For every expert, the (sorted) token indices not routed to it."""
    tokens = top_k_index.shape[0]
    # One spare column absorbs indices >= num_experts: identity/zero experts (longcat_flash)
    # and expert-parallel sentinels are not real experts and are never forced.
    index = top_k_index.reshape(tokens, -1).long().clamp(max=num_experts)
    hit = torch.zeros(tokens, num_experts + 1, dtype=torch.bool, device=top_k_index.device)
    hit.scatter_(1, index, True)
    missed = ~hit[:, :num_experts].T
    pairs = missed.nonzero()
    sizes = missed.sum(dim=1).tolist()
    return list(torch.split(pairs[:, 1], sizes))


def _spread(candidates: torch.Tensor, n: int) -> torch.Tensor:
    """``n`` candidates evenly spread over the batch (all of them when there are fewer)."""
    if n >= candidates.numel():
        return candidates
    picks = torch.arange(n, device=candidates.device) * candidates.numel() // n
    return candidates[picks]


class _RoutingForward:
    """The ``forward_override`` installed on one block."""

    def __init__(self, session: RoutingSession, path: str):
        self.session = session
        self.path = path

    def __call__(
        self, block: DefusedExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        session = self.session
        if session.whole_batch:
            return self._whole_batch(block, hidden_states, top_k_index, top_k_weights)
        forward = _grouped_or_loop if session.grouped else _loop
        routed = selection = None
        if session.grouped and session.mode != "routed":
            # Pick the forced tokens (host syncs) before the routed GEMMs are queued: the syncs then
            # find the GPU's queue nearly empty, and routed and forced GEMMs queue back to back.
            routed = _routed_counts(top_k_index, block.num_experts)
            selection = session.forced_selection(self.path, top_k_index, routed)
        if session.observe_routed:
            with provenance("routed"):
                output, counted = forward(block, hidden_states, top_k_index, top_k_weights)
        else:
            with suspended_hooks(_expert_modules(block)):
                output, counted = forward(block, hidden_states, top_k_index, top_k_weights)
        if routed is None:  # the grouped forward counted them already, at its one host sync
            routed = counted if counted is not None else _routed_counts(top_k_index, block.num_experts)
        if selection is None:
            selection = session.forced_selection(self.path, top_k_index, routed)
        counts = session.counts[self.path]
        counts.routed += routed
        if selection:
            with torch.no_grad(), provenance("forced"):
                if not (session.grouped and grouped_expert_calls(block, hidden_states, selection)):
                    settle_batched_hooks()
                    for e, token_idx in selection.items():
                        block[e](hidden_states[token_idx])
                for e, token_idx in selection.items():
                    counts.forced[e] += token_idx.numel()
        return output

    def _whole_batch(
        self, block: DefusedExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        session = self.session
        output, routed = whole_batch_forward(block, hidden_states, top_k_index, top_k_weights, session.grouped,
                                             sync_free=session.sync_free)
        session.counts[self.path].add(routed, hidden_states.shape[0] - routed)
        return output


def whole_batch_forward(
    block: DefusedExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    grouped: bool = False, *, sync_free: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(routed output, routed rows per expert)``, with every expert's hooks seeing the whole batch once.

    The routed output (bit-identical to ``block.routed_forward``) is computed with the experts'
    hooks off; then every expert runs on every token, in token order, under ``torch.no_grad()``
    and provenance ``"all"``, outputs discarded: the calls stock llm-compressor's all-experts
    calibration makes. ``grouped``: both through grouped GEMMs where the block can.

    ``sync_free`` (with ``grouped``): where the routed output runs hook-free from the device's offsets, the
    rows per expert stay on the device (an int64 tensor there, also handed to :func:`whole_batch`) and the
    call has no host sync; an expert index outside the block then sets the flag
    :func:`~defuser_quant.calibration.grouped.check_routed_indices` raises on, instead of being refused at once.
    """
    plan = call_plan(block, hidden_states) if grouped else None  # checked once for both
    # the hooks are off for the routed output: grouped, no hook is consulted (nothing to suspend), and the
    # counts are read after the GEMMs are queued (or left on the device)
    result = None if plan is None or not top_k_index.numel() else grouped_routed_forward_with_counts(
        block, hidden_states, top_k_index, top_k_weights, plan, hooks=False, sync_counts=not sync_free,
        device_counts=sync_free)
    if result is not None:
        output, counted = result[0], _as_counts(result[1])
    else:
        with suspended_hooks(_expert_modules(block)):
            if plan is None:
                output, counted = _loop(block, hidden_states, top_k_index, top_k_weights)
            else:
                output, counted = _grouped_or_loop(block, hidden_states, top_k_index, top_k_weights, plan)
    # the grouped forward counted the routed rows at its one host sync; else count them here
    routed = counted if counted is not None else _routed_counts(top_k_index, block.num_experts)
    if hidden_states.shape[0]:
        with torch.no_grad(), whole_batch(routed if capture.counts_on_device(routed) else routed.tolist()):
            if plan is None or not grouped_whole_batch_calls(block, hidden_states, plan=plan):
                settle_batched_hooks()
                for expert in block:
                    expert(hidden_states)
    return output, routed


def _expert_modules(block: DefusedExperts) -> Iterator[nn.Module]:
    """Every module of every expert of ``block`` (what ``suspended_hooks`` switches off): each expert
    and its submodules, read through ``_modules`` (``Module.modules()`` builds a name per module)."""
    for expert in block:
        stack = [expert]
        while stack:
            module = stack.pop()
            yield module
            stack.extend(child for child in module.__dict__["_modules"].values() if child is not None)


def _routed_counts(top_k_index: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Rows routed to each expert (CPU int64); indices >= ``num_experts`` (weightless experts) are not counted."""
    return torch.bincount(top_k_index.reshape(-1), minlength=num_experts)[:num_experts].cpu()


def _loop(
    block: DefusedExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The block's output, and its routed rows per expert when known without a host sync (never here)."""
    settle_batched_hooks()
    return block.routed_forward(hidden_states, top_k_index, top_k_weights), None


def _grouped_or_loop(
    block: DefusedExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
    plan: object | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Like :func:`_loop`, through the grouped forward where the block can (``plan``: from ``call_plan``)."""
    result = grouped_routed_forward_with_counts(block, hidden_states, top_k_index, top_k_weights, plan)
    if result is None:
        return _loop(block, hidden_states, top_k_index, top_k_weights)
    return result[0], _as_counts(result[1])


def _as_counts(counts: list[int] | torch.Tensor) -> torch.Tensor:
    """Rows per expert as an int64 tensor: host ints on the CPU, a device tensor as it is."""
    return counts if isinstance(counts, torch.Tensor) else torch.tensor(counts, dtype=torch.long)


def _check_experts(
    experts: Mapping[str, Collection[int]], blocks: list[tuple[str, DefusedExperts]]
) -> dict[str, frozenset[int]]:
    sizes = {path: len(block) for path, block in blocks}
    checked = {}
    for path, indices in experts.items():
        if path not in sizes:
            raise ValueError(f"experts= names {path!r}, which is no DefusedExperts block of the model")
        bad = [e for e in indices if not 0 <= int(e) < sizes[path]]
        if bad:
            raise ValueError(f"experts= for {path!r}: indices {bad} out of range for {sizes[path]} experts")
        checked[path] = frozenset(int(e) for e in indices)
    return checked


@contextmanager
def routing_mode(
    model: nn.Module,
    mode: RoutingMode = "routed",
    *,
    min_tokens: int = DEFAULT_MIN_TOKENS,
    experts: Mapping[str, Collection[int]] | None = None,
    observe_routed: bool = True,
    grouped: bool = False,
    deterministic: bool = False,
    whole_batch: bool = False,
    sync_free: bool = False,
) -> Iterator[RoutingSession]:
    """Route every defused block of ``model`` with ``mode`` inside the ``with`` block.

    Args:
        model: a model converted with ``defuser_quant.convert_model``.
        mode: ``"routed"``, ``"all"`` or ``"budgeted"`` (see the module docstring).
        min_tokens: the per-expert floor of ``budgeted``.
        experts: ``{block_path: expert indices}``; when given, only these experts get forced
            tokens (blocks not named get none).
        observe_routed: when False, the routed computation runs with the experts' forward hooks
            switched off, so quantizer hooks see only the forced tokens. Used by fallback passes
            over data whose routed tokens the hooks have already seen.
        grouped: run experts through grouped GEMMs where every projection is a plain Linear
            (hooks see the same rows; outputs within GEMM rounding of the loop); else the loop.
        deterministic: CUDA kernels deterministic inside the context (``index_add_`` included).
        whole_batch: with ``mode="all"``, each expert's hooks see the batch in one call, every
            token in token order (provenance ``"all"``), as stock llm-compressor's all-experts
            calibration gives them; the routed output is computed with the experts' hooks off.
            Without it they see a routed call, then a forced call. Needs ``experts=None`` and
            ``observe_routed=True``.
        sync_free: with ``whole_batch`` and ``grouped``, a call whose routed output can run hook-free leaves
            its rows per expert on the device: no host sync per call (the counts are read when the session's
            counts are), and an expert index outside a block is raised by
            :func:`~defuser_quant.calibration.grouped.check_routed_indices` (call it before using the
            results) instead of at once.

    Yields:
        The :class:`RoutingSession`, whose ``counts`` hold per-block routed/forced token counts.

    Raises:
        NoDefusedExpertsError: the model has no ``DefusedExperts`` (call ``convert_model`` first).
    """
    if mode not in ROUTING_MODES:
        raise ValueError(f"unknown routing mode {mode!r}; choose from {ROUTING_MODES}")
    if min_tokens < 0:
        raise ValueError(f"min_tokens must be >= 0, got {min_tokens}")
    if whole_batch and (mode != "all" or experts is not None or not observe_routed):
        raise ValueError(
            f"whole_batch=True needs mode='all', experts=None and observe_routed=True (got mode={mode!r}, "
            f"experts={'given' if experts is not None else None}, observe_routed={observe_routed})"
        )
    if sync_free and not (whole_batch and grouped):
        raise ValueError("sync_free=True needs whole_batch=True and grouped=True (only whole-batch grouped calls "
                         "skip their host sync)")
    blocks = defused_blocks(model)
    session = RoutingSession(
        mode=mode,
        min_tokens=min_tokens,
        experts=None if experts is None else _check_experts(experts, blocks),
        observe_routed=observe_routed,
        counts={path: BlockCounts.zeros(len(block)) for path, block in blocks},
        grouped=grouped,
        whole_batch=whole_batch,
        sync_free=sync_free,
    )
    previous = [(block, block.forward_override) for _, block in blocks]
    try:
        for path, block in blocks:
            block.forward_override = _RoutingForward(session, path)
        logger.debug("routing mode %r on %d block(s)%s", mode, len(blocks), " (grouped)" if grouped else "")
        with deterministic_mode(deterministic):
            yield session
    finally:
        for block, override in previous:
            block.forward_override = override
