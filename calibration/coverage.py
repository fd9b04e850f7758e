"""Coverage statistics: how many calibration tokens every expert of every layer received.

:class:`CoverageTracker` counts, per ``DefusedExperts`` block and expert, the rows entering the
expert's ``up`` projection, split by provenance (``routed`` by the router, ``forced`` by a
routing mode). It works in any routing mode and without one. :meth:`CoverageTracker.report`
gives a :class:`CoverageReport`: JSON (``schema_version`` 1, see ``docs/calibration.md``), a
rich console summary, a layer x expert heatmap, and the policy for experts still under
``min_tokens``: ``error`` (raise), ``warn`` (log) or ``fallback`` (an all-experts pass over the
calibration data for just those experts). Nothing is ever reported as NaN: an empty layer has
router share 0.0.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from defuser_quant.core.errors import DefuserQuantError

from .capture import ExpertCapture, Provenance, add_rows, defused_blocks
from .routing import DEFAULT_MIN_TOKENS, RoutingSession, routing_mode

__all__ = [
    "COVERAGE_POLICIES",
    "SCHEMA_VERSION",
    "CoverageError",
    "CoverageReport",
    "CoveragePolicy",
    "CoverageTotals",
    "CoverageTracker",
    "ExpertCoverage",
    "ExpertRef",
    "FallbackPlan",
    "LayerCoverage",
    "build_report",
    "run_fallback_pass",
]

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CoveragePolicy = Literal["error", "warn", "fallback"]
COVERAGE_POLICIES: tuple[str, ...] = get_args(CoveragePolicy)
_LAYER_INDEX = re.compile(r"\.(?:layers|h|blocks)\.(\d+)\.")
_LISTED = 20  # experts named in an error or warning message before "and N more"


class CoverageError(DefuserQuantError):
    """Experts stayed under ``min_tokens``; ``.experts`` lists them."""

    def __init__(self, message: str, experts: list[ExpertRef]):
        super().__init__(message)
        self.experts = experts


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ExpertCoverage(_Frozen):
    """One expert of one layer."""

    expert: int = Field(ge=0)
    routed: int = Field(ge=0, description="tokens the router sent to this expert")
    forced: int = Field(ge=0, description="extra tokens pushed through by a routing mode")
    calibrated: int = Field(ge=0, description="routed + forced: rows its Linear layers saw")
    router_share: float = Field(ge=0.0, le=1.0, description="routed / the layer's top-k assignments (0.0 if none)")
    under_threshold: bool = Field(description="calibrated < min_tokens")


class LayerCoverage(_Frozen):
    """One ``DefusedExperts`` block."""

    path: str
    layer_index: int | None
    num_experts: int = Field(ge=0)
    top_k_assignments: int = Field(ge=0, description="sum of routed over the layer's experts")
    experts: list[ExpertCoverage]


class ExpertRef(_Frozen):
    """An expert named in ``under_threshold`` lists and errors."""

    layer: str
    layer_index: int | None
    expert: int
    routed: int
    forced: int
    calibrated: int

    def label(self) -> str:
        return f"{self.layer}[{self.expert}] ({self.calibrated} tokens)"


class CoverageTotals(_Frozen):
    layers: int
    experts: int
    routed_tokens: int
    forced_tokens: int
    calibrated_tokens: int
    under_threshold: int


@dataclass(frozen=True)
class FallbackPlan:
    """Experts that need the all-experts pass: ``{block_path: expert indices}``."""

    experts: dict[str, tuple[int, ...]]

    def __bool__(self) -> bool:
        return bool(self.experts)

    @property
    def num_experts(self) -> int:
        return sum(len(v) for v in self.experts.values())

    def run(
        self, model: nn.Module, batches: Iterable[Any], *, forward: Callable[[nn.Module, Any], Any] | None = None
    ) -> RoutingSession | None:
        """Run :func:`run_fallback_pass` for these experts (no-op when the plan is empty)."""
        if not self:
            return None
        return run_fallback_pass(model, batches, self.experts, forward=forward)


class CoverageReport(_Frozen):
    """Coverage of every layer x expert; see ``docs/calibration.md`` for the JSON schema."""

    schema_version: Literal[1] = SCHEMA_VERSION
    min_tokens: int = Field(ge=0)
    totals: CoverageTotals
    layers: list[LayerCoverage]
    under_threshold: list[ExpertRef]

    @model_validator(mode="after")
    def _consistent(self) -> CoverageReport:
        for layer in self.layers:
            if len(layer.experts) != layer.num_experts:
                raise ValueError(f"{layer.path}: {len(layer.experts)} expert entries for num_experts={layer.num_experts}")
            for e in layer.experts:
                if e.calibrated != e.routed + e.forced or e.under_threshold != (e.calibrated < self.min_tokens):
                    raise ValueError(f"{layer.path}[{e.expert}]: inconsistent counts {e}")
        if len(self.under_threshold) != self.totals.under_threshold:
            raise ValueError("totals.under_threshold does not match the under_threshold list")
        return self

    # ----- queries -----------------------------------------------------------------------
    def worst(self, n: int = 10) -> list[ExpertRef]:
        """The ``n`` experts with the fewest calibrated (then routed) tokens."""
        refs = [_ref(layer, e) for layer in self.layers for e in layer.experts]
        return sorted(refs, key=lambda r: (r.calibrated, r.routed, r.layer, r.expert))[:n]

    def fallback_plan(self) -> FallbackPlan:
        """The experts under threshold, grouped by block."""
        experts: dict[str, list[int]] = {}
        for ref in self.under_threshold:
            experts.setdefault(ref.layer, []).append(ref.expert)
        return FallbackPlan({k: tuple(v) for k, v in experts.items()})

    def apply_policy(self, policy: CoveragePolicy) -> FallbackPlan:
        """Apply the under-threshold policy.

        ``error`` raises :class:`CoverageError` naming the experts; ``warn`` logs a warning
        naming them; ``fallback`` logs them and returns the :class:`FallbackPlan` to run. The
        returned plan is empty for ``error``/``warn`` and when every expert is covered.
        """
        if policy not in COVERAGE_POLICIES:
            raise ValueError(f"unknown coverage policy {policy!r}; choose from {COVERAGE_POLICIES}")
        under = self.under_threshold
        if not under:
            return FallbackPlan({})
        message = (
            f"{len(under)} of {self.totals.experts} experts got fewer than min_tokens={self.min_tokens} "
            f"calibration tokens: {_listing(under)}"
        )
        if policy == "error":
            raise CoverageError(
                message + ". Use routing mode 'budgeted' or 'all', more calibration data, or policy 'fallback'.", under
            )
        if policy == "warn":
            logger.warning("%s; their quantization statistics rest on few tokens", message)
            return FallbackPlan({})
        logger.info("%s; running the all-experts pass for them", message)
        return self.fallback_plan()

    # ----- output ------------------------------------------------------------------------
    def to_json(self, path: str | Path, *, indent: int = 2) -> Path:
        """Write the report as JSON and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.model_dump_json(indent=indent) + "\n", encoding="utf-8")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> CoverageReport:
        """Read and validate a report written by :meth:`to_json`."""
        return cls.model_validate_json(Path(path).read_text(encoding="utf-8"))

    def summary_table(self, worst: int = 10) -> Any:
        """A ``rich.table.Table``: the ``worst`` least-calibrated experts (at least every expert under
        threshold, up to 20), fewest tokens first."""
        from rich.table import Table

        table = Table(
            title=f"Expert coverage (min_tokens={self.min_tokens}): {self.totals.under_threshold} of "
            f"{self.totals.experts} experts under threshold"
        )
        for column in ("layer", "expert", "routed", "forced", "calibrated", "router share", "status"):
            table.add_column(column, justify="left" if column in ("layer", "status") else "right")
        shown = self.worst(max(worst, min(len(self.under_threshold), _LISTED)))
        shares = {(layer.path, e.expert): e.router_share for layer in self.layers for e in layer.experts}
        for ref in shown:
            low = ref.calibrated < self.min_tokens
            table.add_row(
                ref.layer,
                str(ref.expert),
                str(ref.routed),
                str(ref.forced),
                str(ref.calibrated),
                f"{shares[(ref.layer, ref.expert)]:.2%}",
                "[red]UNDER[/red]" if low else "[green]ok[/green]",
            )
        return table

    def console_summary(self, console: Any | None = None, *, worst: int = 10) -> str:
        """Render the summary table; print it on ``console`` (a ``rich.console.Console``) if given.

        Returns the summary as plain text.
        """
        from rich.console import Console

        table = self.summary_table(worst)
        recorder = Console(file=io.StringIO(), record=True, width=120)
        recorder.print(table)
        if self.under_threshold:
            recorder.print(f"under threshold: {_listing(self.under_threshold)}")
        if console is not None:
            console.print(table)
        return recorder.export_text()

    def heatmap(self, path: str | Path, *, dpi: int = 120) -> Path:
        """Save a layer x expert PNG; see :func:`~.coverage_plot.plot_coverage` (needs matplotlib)."""
        from .coverage_plot import plot_coverage

        return plot_coverage(self, path, dpi=dpi)


def _ref(layer: LayerCoverage, e: ExpertCoverage) -> ExpertRef:
    return ExpertRef(
        layer=layer.path,
        layer_index=layer.layer_index,
        expert=e.expert,
        routed=e.routed,
        forced=e.forced,
        calibrated=e.calibrated,
    )


def _listing(refs: list[ExpertRef]) -> str:
    names = ", ".join(r.label() for r in refs[:_LISTED])
    return names + (f" and {len(refs) - _LISTED} more" if len(refs) > _LISTED else "")


def _layer_index(path: str) -> int | None:
    match = _LAYER_INDEX.search(f".{path}.")
    return int(match.group(1)) if match else None


def build_report(counts: Mapping[str, tuple[Collection[int], Collection[int]]], min_tokens: int) -> CoverageReport:
    """A report from ``{block_path: (routed per expert, forced per expert)}``."""
    layers = []
    for path, (routed, forced) in counts.items():
        routed, forced = [int(v) for v in routed], [int(v) for v in forced]
        total = sum(routed)
        experts = [
            ExpertCoverage(
                expert=e,
                routed=r,
                forced=f,
                calibrated=r + f,
                router_share=r / total if total else 0.0,
                under_threshold=r + f < min_tokens,
            )
            for e, (r, f) in enumerate(zip(routed, forced, strict=True))
        ]
        layers.append(
            LayerCoverage(
                path=path, layer_index=_layer_index(path), num_experts=len(experts), top_k_assignments=total, experts=experts
            )
        )
    under = [_ref(layer, e) for layer in layers for e in layer.experts if e.under_threshold]
    totals = CoverageTotals(
        layers=len(layers),
        experts=sum(layer.num_experts for layer in layers),
        routed_tokens=sum(e.routed for layer in layers for e in layer.experts),
        forced_tokens=sum(e.forced for layer in layers for e in layer.experts),
        calibrated_tokens=sum(e.calibrated for layer in layers for e in layer.experts),
        under_threshold=len(under),
    )
    return CoverageReport(min_tokens=min_tokens, totals=totals, layers=layers, under_threshold=under)


def _default_forward(model: nn.Module, batch: Any) -> Any:
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    if isinstance(batch, Mapping):
        return model(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
    return model(batch.to(device) if isinstance(batch, torch.Tensor) else batch)


def run_fallback_pass(
    model: nn.Module,
    batches: Iterable[Any],
    experts: Mapping[str, Collection[int]],
    *,
    forward: Callable[[nn.Module, Any], Any] | None = None,
) -> RoutingSession:
    """The all-experts pass for just ``experts`` (``{block_path: indices}``) over ``batches``.

    Each named expert gets every token the router did not send to it, as ``forced`` tokens, so
    together with the routed tokens of the first pass its Linear layers have seen every token
    once. The routed computation runs with the experts' hooks switched off (nothing is counted
    twice). Batches are dicts of model inputs (or tensors of input ids) unless ``forward(model,
    batch)`` says otherwise. Hooks on other modules (attention, dense MLPs) do see the batches
    again.
    """
    forward = forward or _default_forward
    n = 0
    with torch.no_grad(), routing_mode(model, "all", experts=experts, observe_routed=False) as session:
        for batch in batches:
            forward(model, batch)
            n += 1
    forced = sum(int(c.forced.sum()) for c in session.counts.values())
    num = sum(len(v) for v in experts.values())
    logger.info("fallback pass: %d batch(es), %d forced tokens into %d expert(s)", n, forced, num)
    return session


class CoverageTracker:
    """Counts routed and forced tokens per expert (hooks on the ``up`` projections).

    Use as a context manager around calibration forwards, or ``attach()``/``remove()``.
    ``reset()`` zeroes the counts.
    """

    def __init__(self, model: nn.Module, *, min_tokens: int = DEFAULT_MIN_TOKENS):
        if min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {min_tokens}")
        self.model = model
        self.min_tokens = min_tokens
        self._sizes = {path: len(block) for path, block in defused_blocks(model)}
        self._capture = ExpertCapture(model, self._count, roles=("up",))
        self._counts: dict[str, dict[str, list[int]]] = {}
        self.reset()

    def reset(self) -> None:
        self._counts = {p: {"routed": [0] * n, "forced": [0] * n} for p, n in self._sizes.items()}

    def _count(self, path: str, expert: int, role: str, inputs: torch.Tensor, prov: Provenance) -> None:
        add_rows(self._counts[path], expert, inputs.numel() // inputs.shape[-1] if inputs.dim() else 0, prov)

    def attach(self) -> CoverageTracker:
        self._capture.attach()
        return self

    def remove(self) -> None:
        self._capture.remove()

    def __enter__(self) -> CoverageTracker:
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def counts(self) -> dict[str, tuple[list[int], list[int]]]:
        """``{block_path: (routed per expert, forced per expert)}`` so far."""
        return {p: (list(c["routed"]), list(c["forced"])) for p, c in self._counts.items()}

    def report(self) -> CoverageReport:
        return build_report(self.counts(), self.min_tokens)

    def enforce(
        self,
        policy: CoveragePolicy,
        batches: Iterable[Any] | None = None,
        *,
        forward: Callable[[nn.Module, Any], Any] | None = None,
    ) -> CoverageReport:
        """Apply ``policy`` to the current report and return the final report.

        ``fallback`` needs the calibration ``batches``: it runs the all-experts pass for the
        experts under threshold (counted by this tracker) and raises :class:`CoverageError` if
        some are still under ``min_tokens`` afterwards (the data holds too few tokens).
        """
        report = self.report()
        plan = report.apply_policy(policy)
        if not plan:
            return report
        if batches is None:
            raise ValueError("the 'fallback' coverage policy needs the calibration batches: enforce('fallback', batches)")
        attached = self._capture.attached
        self.attach()
        try:
            plan.run(self.model, batches, forward=forward)
        finally:
            if not attached:
                self.remove()
        report = self.report()
        if report.under_threshold:
            raise CoverageError(
                f"{len(report.under_threshold)} expert(s) stay under min_tokens={self.min_tokens} even after the "
                f"all-experts pass (the calibration data has too few tokens): {_listing(report.under_threshold)}",
                report.under_threshold,
            )
        return report
