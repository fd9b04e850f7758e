"""Per-expert capture: hand every defused expert's ``nn.Linear`` inputs to a consumer callback.

A forward pre-hook on each projection calls
``consumer(layer_path, expert_index, projection_role, inputs, provenance)`` and keeps nothing:
activations live only as long as the consumer holds them. ``provenance`` is ``"routed"`` for
tokens the router sent to the expert, ``"forced"`` for the extra tokens a routing mode
(:mod:`defuser_quant.calibration.routing`) pushes through it, and ``"all"`` for a call that
carries every token of the batch in token order, routed and not (``routing: all``, as stock
llm-compressor's all-experts calibration does); :func:`routed_rows` then says how many of them
the router sent to the expert, and :func:`add_rows` splits a call's rows accordingly. The
routing override sets these in context variables while it runs, and the hooks read them.

Quantizers register their own hooks on the same ``nn.Linear`` modules, so they see forced
tokens too; that is the point of the ``all`` and ``budgeted`` routing modes.
"""

from __future__ import annotations

import contextvars
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Literal, get_args

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from defuser_quant.core.defused import DefusedExperts
from defuser_quant.core.errors import DefuserQuantError

__all__ = [
    "PROJECTION_ROLES",
    "ExpertCapture",
    "ExpertInputConsumer",
    "NoDefusedExpertsError",
    "PendingRows",
    "Provenance",
    "add_rows",
    "capture_expert_inputs",
    "counts_on_device",
    "current_provenance",
    "defused_blocks",
    "provenance",
    "routed_rows",
    "suspended_hooks",
    "whole_batch",
    "whole_batch_routed",
]

logger = logging.getLogger(__name__)

Provenance = Literal["routed", "forced", "all"]
#: ``(layer_path, expert_index, projection_role, inputs, provenance) -> None``
ExpertInputConsumer = Callable[[str, int, str, torch.Tensor, Provenance], None]
#: Projection roles of a defused expert, in call order (``gate`` is absent when ungated).
PROJECTION_ROLES: tuple[str, ...] = ("gate", "up", "down")

_PROVENANCE: contextvars.ContextVar[Provenance] = contextvars.ContextVar("defuser_quant_provenance", default="routed")
_ROUTED_ROWS: contextvars.ContextVar[Sequence[int] | torch.Tensor | None] = contextvars.ContextVar(
    "defuser_quant_routed_rows", default=None)


class NoDefusedExpertsError(DefuserQuantError, ValueError):
    """The model holds no ``DefusedExperts`` block (``convert_model`` was not called)."""


def current_provenance() -> Provenance:
    """Provenance of the tokens now passing through the experts (``"routed"`` by default)."""
    return _PROVENANCE.get()


@contextmanager
def provenance(value: Provenance) -> Iterator[None]:
    """Mark every expert call inside the block as carrying ``value`` tokens (``"all"``: use :func:`whole_batch`)."""
    if value not in get_args(Provenance):
        raise ValueError(f"provenance must be one of {get_args(Provenance)}, got {value!r}")
    if value == "all":
        raise ValueError("provenance 'all' needs each expert's routed rows: use whole_batch(routed_rows)")
    token = _PROVENANCE.set(value)
    try:
        yield
    finally:
        _PROVENANCE.reset(token)


@contextmanager
def whole_batch(routed: Sequence[int] | torch.Tensor) -> Iterator[None]:
    """Mark every expert call inside the block as carrying the whole batch (provenance ``"all"``),
    of which ``routed[e]`` rows were routed to expert ``e`` by the router (host ints, or an int64 tensor
    left on the device by a call without a host sync: :func:`routed_rows` then reads it, a sync per
    call, and counters that can add on the device take it from :func:`whole_batch_routed`)."""
    token, rows = _PROVENANCE.set("all"), _ROUTED_ROWS.set(routed)
    try:
        yield
    finally:
        _ROUTED_ROWS.reset(rows)
        _PROVENANCE.reset(token)


def routed_rows(expert: int) -> int:
    """Inside :func:`whole_batch`: rows of the current call the router sent to ``expert``."""
    routed = _ROUTED_ROWS.get()
    if routed is None:
        raise RuntimeError("routed_rows() is only known inside whole_batch() (provenance 'all')")
    return int(routed[expert])


#: Devices whose row counts are read where they are (host memory); counts on any other device stay there
#: until read, so a call that produced them needs no host sync.
HOST_COUNT_DEVICES = frozenset({"cpu"})


def counts_on_device(counts: object) -> bool:
    """Whether ``counts`` is a tensor left on a device (not host memory): add it there, read it later."""
    return isinstance(counts, torch.Tensor) and counts.device.type not in HOST_COUNT_DEVICES


class PendingRows:
    """Routed and forced rows per expert added on a device without a host sync, until taken (one host read)."""

    def __init__(self) -> None:
        self._by_device: dict[torch.device, torch.Tensor] = {}  # [2, experts] int64 there: routed, forced

    def __bool__(self) -> bool:
        return bool(self._by_device)

    def add(self, routed: torch.Tensor, forced: torch.Tensor) -> None:
        pair = torch.stack([routed, forced]).to(torch.long)
        held = self._by_device.get(pair.device)
        if held is None:
            self._by_device[pair.device] = pair
        else:
            held += pair

    def take(self) -> torch.Tensor | None:
        """Everything added so far as one CPU int64 ``[2, experts]`` tensor (routed, forced), now cleared; None when
        nothing was added."""
        if not self._by_device:
            return None
        pending, self._by_device = self._by_device, {}
        return sum(pair.cpu() for pair in pending.values())


def whole_batch_routed() -> Sequence[int] | torch.Tensor | None:
    """Inside :func:`whole_batch`: every expert's routed rows as given there (None outside)."""
    return _ROUTED_ROWS.get()


def add_rows(counts: Mapping[str, list[int]], expert: int, rows: int, prov: Provenance | None = None) -> None:
    """Add one expert call's ``rows`` to ``counts["routed"]``/``counts["forced"]`` by provenance
    (default: the current one); a whole-batch call (``"all"``) adds its routed rows to ``routed``
    and the rest to ``forced``."""
    prov = _PROVENANCE.get() if prov is None else prov
    if prov == "all":
        routed = routed_rows(expert)
        counts["routed"][expert] += routed
        counts["forced"][expert] += rows - routed
    else:
        counts[prov][expert] += rows


def defused_blocks(model: nn.Module) -> list[tuple[str, DefusedExperts]]:
    """Every ``DefusedExperts`` block of ``model`` with its module path, in module order.

    Raises:
        NoDefusedExpertsError: when there is none.
    """
    blocks = [(path, module) for path, module in model.named_modules() if isinstance(module, DefusedExperts)]
    if not blocks:
        raise NoDefusedExpertsError(
            f"{type(model).__name__} has no DefusedExperts block: call defuser_quant.convert_model(model) "
            "first (calibration routing and capture work on defused per-expert nn.Linear modules)"
        )
    return blocks


class _InputHook:
    """Forward pre-hook of one projection: forwards its input to the consumer."""

    __slots__ = ("consumer", "path", "expert", "role")

    def __init__(self, consumer: ExpertInputConsumer, path: str, expert: int, role: str):
        self.consumer = consumer
        self.path = path
        self.expert = expert
        self.role = role

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if args:
            self.consumer(self.path, self.expert, self.role, args[0].detach(), _PROVENANCE.get())


class ExpertCapture:
    """Hooks on every defused expert projection feeding ``consumer``; a context manager.

    Args:
        model: a model converted with ``defuser_quant.convert_model``.
        consumer: called as ``consumer(layer_path, expert_index, role, inputs, provenance)``
            with ``inputs`` the 2-D ``[tokens, in_features]`` input of that projection.
        roles: projection roles to hook (subset of ``("gate", "up", "down")``).
        layers: optional predicate on the block path; only matching blocks are hooked.
    """

    def __init__(
        self,
        model: nn.Module,
        consumer: ExpertInputConsumer,
        *,
        roles: Iterable[str] = PROJECTION_ROLES,
        layers: Callable[[str], bool] | None = None,
    ):
        self.roles = tuple(roles)
        unknown = set(self.roles) - set(PROJECTION_ROLES)
        if unknown:
            raise ValueError(f"unknown projection role(s) {sorted(unknown)}; choose from {PROJECTION_ROLES}")
        self.model = model
        self.consumer = consumer
        self.layers = layers
        self.handles: list[RemovableHandle] = []

    @property
    def attached(self) -> bool:
        return bool(self.handles)

    def attach(self) -> ExpertCapture:
        """Register the hooks (idempotent)."""
        if self.handles:
            return self
        for path, block in defused_blocks(self.model):
            if self.layers is not None and not self.layers(path):
                continue
            for index, expert in enumerate(block):
                for role in self.roles:
                    linear = expert.projection(role)
                    if linear is not None:
                        hook = _InputHook(self.consumer, path, index, role)
                        self.handles.append(linear.register_forward_pre_hook(hook))
        logger.debug("attached %d expert input hooks", len(self.handles))
        return self

    def remove(self) -> None:
        """Remove every hook this capture registered."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __enter__(self) -> ExpertCapture:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()


def capture_expert_inputs(
    model: nn.Module,
    consumer: ExpertInputConsumer,
    *,
    roles: Iterable[str] = PROJECTION_ROLES,
    layers: Callable[[str], bool] | None = None,
) -> ExpertCapture:
    """Attach an :class:`ExpertCapture`; use it as a context manager or call ``.remove()``."""
    return ExpertCapture(model, consumer, roles=roles, layers=layers).attach()


@contextmanager
def suspended_hooks(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Run the block with the forward (pre-)hooks of ``modules`` switched off, then restore them.

    ``forward`` itself is untouched, so forward-patching offload wrappers (accelerate) still run.
    """
    saved = []
    for module in modules:
        # through __dict__ (nn.Module.__setattr__ costs microseconds per call, and a whole-batch
        # ``all`` call suspends every expert's hooks), and only where there is a hook to suspend
        state = module.__dict__
        pre, post = state["_forward_pre_hooks"], state["_forward_hooks"]
        if pre or post:
            saved.append((state, pre, post))
            state["_forward_pre_hooks"] = type(pre)()
            state["_forward_hooks"] = type(post)()
    try:
        yield
    finally:
        for state, pre, post in saved:
            state["_forward_pre_hooks"] = pre
            state["_forward_hooks"] = post
