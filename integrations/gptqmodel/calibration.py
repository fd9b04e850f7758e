"""Our routing modes and coverage report inside a GPTQModel ``quantize()`` run.

GPTQModel quantizes layer by layer. For each layer it swaps every ``nn.Linear`` for a
``HookedLinear`` and runs the calibration batches once per subset with that subset's hooks set
(for an MoE layer: all experts' gate/up, then all experts' down), then once more without hooks
to compute the next layer's inputs. Hooks registered on the original ``nn.Linear`` objects
(``calibration.CoverageTracker``) do not survive that swap, so this module counts from the
``DefusedExperts`` forward instead, and only while the quantizer listens:

* a forward runs with routing mode ``routed``/``all``/``budgeted`` (``calibration.routing``)
  only when some expert projection of the block has GPTQModel's hook set; replay forwards
  stay plain routed (no forced tokens wasted);
* each listening pass gets its own routing session, so ``budgeted`` tops experts up to
  ``min_tokens`` for the gate/up pass *and* again for the down pass;
* the rows (routed / forced) passed to each listening projection are counted; the report's
  per-expert numbers are the minimum over its projections, and every projection record also
  carries GPTQModel's own sample count and how it was quantized (GPTQ, its RTN fallback, AWQ,
  or left in float).

GPTQModel's multi-GPU calibration (``auto_forward_data_parallel``, on whenever several GPUs are
visible) runs each layer's forward on replicas, one per GPU, from ``torch.nn.parallel.replicate``
(shallow copies: every module's ``__dict__`` copied, weights re-set as plain attributes) or, when
that fails, ``copy.deepcopy``; the replicas' GPTQ hooks add to one Hessian per module (a partial per
GPU). The router here is shared by all replicas: a replica finds its block's path in an attribute
the copies keep, ``copy.deepcopy`` returns the router itself, each replica gets its own routing
session (a GPU's forwards are serial; the counts of all of them are added under a lock), and the grouped
forward sees a ``torch.nn.parallel.replicate`` replica's weights. ``routed`` and ``all`` count
exactly what one GPU counts; ``budgeted`` tops an expert up to ``min_tokens`` on each GPU's share
of the data, so it forces up to (GPUs x) more tokens than one GPU would, never fewer.

Comparison with GPTQModel's ``MoEConfig``: ``ExpertsRoutingOverride(num_experts_per_tok="all")``
raises the router's top-k during capture (every expert sees every token, as our ``all``);
``ExpertsRoutingBypass`` pushes all tokens through all experts' projections directly. Neither
tops up only the starved experts (our ``budgeted``) or says which tokens were routed and which
forced. Using both at once is refused.
"""

from __future__ import annotations

import logging
import re
import threading
import weakref
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from defuser_quant.calibration import DEFAULT_MIN_TOKENS, CoverageError, CoverageReport, build_report, routing_mode
from defuser_quant.calibration.capture import PROJECTION_ROLES, defused_blocks
from defuser_quant.calibration.grouped import deterministic_mode, routed_output
from defuser_quant.core.defused import DefusedExperts
from defuser_quant.core.errors import DefuserQuantError

from .batched import BatchedSolve, BatchedSolveStats, batched_solves
from .grouped import hooked_linear_grouping
from .hessians import HessianBatching
from .overhead import BookkeepingStats
from .overhead import lean_bookkeeping as _lean_bookkeeping

logger = logging.getLogger(__name__)

Policy = Literal["error", "warn", "fallback"]
POLICIES = ("error", "warn", "fallback")
_LAYER_PATH = re.compile(r"^(?P<root>.*?)\.(?P<index>\d+)\.(?P<rel>.+)$")
#: Instance attribute naming a block's path while the router is installed; replicas copy it.
_PATH_ATTR = "_defuser_quant_router_path"


class UnquantizedExpertsError(DefuserQuantError):
    """Expert projections were left in float although no ``dynamic`` rule excluded them."""


@dataclass(frozen=True)
class ProjectionRecord:
    """What the quantizer of one expert projection saw and did."""

    layer: str
    expert: int
    role: str
    module: str
    routed: int
    forced: int
    quantizer_samples: int | None
    method: str  # "gptq" | "awq" | "rtn-fallback" | "float (excluded)" | "float"
    loss: str | None = None


@dataclass
class QuantizeResult:
    """Outcome of :func:`quantize_with_defuser`."""

    log: dict[str, list[dict[str, Any]]]
    coverage: CoverageReport
    projections: list[ProjectionRecord] = field(default_factory=list)
    report_path: Path | None = None
    solve: BatchedSolveStats | None = None  # what the batched solve did (``batched_solve=...``), else None
    replica_forwards: int = 0  # experts forwards that ran on per-GPU replicas (GPTQModel's data-parallel forward)
    bookkeeping: BookkeepingStats | None = None  # what ``lean_bookkeeping=True`` did, else None
    hessians: HessianBatching | None = None  # what ``batched_hessians`` did (grouped runs), else None

    def float_projections(self) -> list[ProjectionRecord]:
        return [p for p in self.projections if p.method.startswith("float")]


def _listening(module: nn.Module | None) -> bool:
    return module is not None and getattr(module, "forward_hook", None) is not None


class QuantizerAwareRouting:
    """``forward_override`` for every block: routing modes during quantizer capture passes only."""

    def __init__(self, model: nn.Module, mode: str, min_tokens: int, grouped: bool = False):
        self.model = model
        self.mode = mode
        self.min_tokens = min_tokens
        self.grouped = grouped
        self.blocks = dict(defused_blocks(model))
        self.paths = {id(b): p for p, b in self.blocks.items()}
        self._overrides: dict[tuple, Any] = {}
        self._lock = threading.Lock()
        # Routing sessions of replicas, per replica: each replica runs on its own GPU, serially.
        self._replica_overrides: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.replica_calls = 0  # forwards that ran on a replica of a block (GPTQModel's data-parallel forward)
        # counts[path][expert][role] = [routed, forced]
        self.counts: dict[str, list[dict[str, list[int]]]] = {
            p: [{r: [0, 0] for r in PROJECTION_ROLES} for _ in range(len(b))] for p, b in self.blocks.items()
        }

    def __deepcopy__(self, memo: dict) -> QuantizerAwareRouting:
        # GPTQModel deep-copies a layer per GPU when torch's replicate fails: the copies must report
        # to this router, not to a copy of it (which would also copy the whole model).
        return self

    def _override(self, block: DefusedExperts, path: str, roles: tuple[str, ...], experts: frozenset[int]):
        key = (path, roles, experts)
        with self._lock:  # routing_mode swaps every block's override while it builds one: one at a time
            # A fresh routing session per listening pass (budgets restart for every subset) and per
            # replica (GPTQModel runs the replicas of a layer at the same time, one per GPU).
            cache = self._overrides if block is self.blocks[path] else self._replica_overrides.setdefault(block, {})
            if key not in cache:
                with routing_mode(
                    self.model, self.mode, min_tokens=self.min_tokens, experts={path: experts}, grouped=self.grouped
                ) as session:
                    override = self.blocks[path].forward_override
                cache[key] = (override, session)
            return cache[key]

    def path_of(self, block: DefusedExperts) -> str:
        """The model path of ``block`` or of the block it is a replica of."""
        path = self.paths.get(id(block)) or block.__dict__.get(_PATH_ATTR)
        if path is None or path not in self.blocks:
            raise RuntimeError(
                f"a {type(block).__name__} the router does not know called it (no {_PATH_ATTR} attribute): "
                "a copy made before quantize_with_defuser installed the router"
            )
        return path

    def __call__(self, block: DefusedExperts, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        path = self.path_of(block)
        if block is not self.blocks[path]:
            with self._lock:
                self.replica_calls += 1
            if self.grouped:
                _expose_replica_weights(block)
        listening = [
            (e, role) for e, expert in enumerate(block) for role in PROJECTION_ROLES if _listening(expert.projection(role))
        ]
        if not listening:
            return routed_output(block, hidden_states, top_k_index, top_k_weights, self.grouped)
        roles = tuple(sorted({r for _, r in listening}))
        experts = frozenset(e for e, _ in listening)
        override, session = self._override(block, path, roles, experts)
        counts = session.counts[path]
        before_routed, before_forced = counts.routed.clone(), counts.forced.clone()
        # GPTQModel may stop the layer forward right after the subset's last module (an
        # exception from its hook); hold that back until the forced tokens have run too.
        stoppers = [
            m for e, role in listening if getattr(m := block[e].projection(role), "forward_hook_last", False)
        ]
        for module in stoppers:
            module.forward_hook_last = False
        try:
            output = override(block, hidden_states, top_k_index, top_k_weights)
        finally:
            for module in stoppers:
                module.forward_hook_last = True
        routed = (counts.routed - before_routed).tolist()
        forced = (counts.forced - before_forced).tolist()
        with self._lock:
            for e, role in listening:
                record = self.counts[path][e][role]
                record[0] += routed[e]
                record[1] += forced[e]
        if stoppers:
            from gptqmodel.nn_modules.hooked_linear import STOP_FORWARD_EXCEPTION

            raise STOP_FORWARD_EXCEPTION.with_traceback(None)
        return output

    def coverage(self) -> dict[str, tuple[list[int], list[int]]]:
        """Per block, per expert: (routed, forced) of its least-fed projection."""
        out = {}
        for path, experts in self.counts.items():
            names = self.blocks[path].names
            roles = [r for r in PROJECTION_ROLES if getattr(names, r) is not None]
            routed, forced = [], []
            for per_role in experts:
                least = min((per_role[r] for r in roles), key=lambda rf: (rf[0] + rf[1], rf[0]))
                routed.append(least[0])
                forced.append(least[1])
            out[path] = (routed, forced)
        return out


def _expose_replica_weights(block: DefusedExperts) -> None:
    """``torch.nn.parallel.replicate`` re-sets a replica's parameters as plain attributes and leaves
    its ``_parameters`` empty; the grouped forward reads weights from ``_parameters``. Put the same
    tensors there (the attribute still wins on lookup), so a replica runs grouped like the original."""
    for module in block.modules():
        params = module.__dict__.get("_parameters")
        if params is None:
            continue
        for key in ("weight", "bias"):
            value = module.__dict__.get(key)
            if key not in params and isinstance(value, torch.Tensor):
                params[key] = value


@contextmanager
def quantizer_aware_routing(
    model: nn.Module, mode: str, min_tokens: int, grouped: bool = False
) -> Iterator[QuantizerAwareRouting]:
    """Install :class:`QuantizerAwareRouting` on every block; restore the previous overrides."""
    router = QuantizerAwareRouting(model, mode, min_tokens, grouped)
    previous = [(b, b.forward_override) for b in router.blocks.values()]
    try:
        for path, block in router.blocks.items():
            block.forward_override = router
            block.__dict__[_PATH_ATTR] = path
        yield router
    finally:
        for block, override in previous:
            block.forward_override = override
            block.__dict__.pop(_PATH_ATTR, None)


def _log_rows(log: dict[str, list[dict[str, Any]]]) -> dict[tuple[int, str], tuple[str, dict[str, Any]]]:
    rows = {}
    for process, entries in (log or {}).items():
        for row in entries or []:
            layer, module = row.get("layer"), row.get("module")
            if isinstance(layer, int) and isinstance(module, str):
                rows[(layer, module)] = (process, row)
    return rows


def _method(process: str | None, row: dict[str, Any] | None, module: nn.Module, excluded: bool) -> str:
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    if not isinstance(module, BaseQuantLinear):
        return "float (excluded)" if excluded else "float"
    loss = str((row or {}).get("loss", ""))
    if loss.startswith("fallback("):
        return "rtn-fallback"
    return process or "quantized"


def projection_records(model: nn.Module, router: QuantizerAwareRouting, log: dict, qcfg: Any) -> list[ProjectionRecord]:
    """One record per expert projection: counts, GPTQModel's sample count and the method used."""
    rows = _log_rows(log)
    records = []
    for path, block in router.blocks.items():
        match = _LAYER_PATH.match(path)
        for e, expert in enumerate(block):
            for role in PROJECTION_ROLES:
                name = getattr(expert.names, role)
                if name is None:
                    continue
                full = f"{path}.{e}.{name}"
                key = (int(match.group("index")), f"{match.group('rel')}.{e}.{name}") if match else None
                process, row = rows.get(key, (None, None)) if key else (None, None)
                excluded = bool(getattr(qcfg, "dynamic", None)) and qcfg.dynamic_get(layer_name=full) is False
                samples = (row or {}).get("samples")
                routed, forced = router.counts[path][e][role]
                records.append(
                    ProjectionRecord(
                        layer=path,
                        expert=e,
                        role=role,
                        module=full,
                        routed=routed,
                        forced=forced,
                        quantizer_samples=int(samples) if samples not in (None, "") else None,
                        method=_method(process, row, getattr(expert, name), excluded),
                        loss=None if row is None else str(row.get("loss")),
                    )
                )
    return records


def _excluded_experts(records: list[ProjectionRecord]) -> set[tuple[str, int]]:
    """Experts left in float on purpose (every projection excluded by ``dynamic``): no quantizer to feed."""
    methods: dict[tuple[str, int], set[str]] = {}
    for p in records:
        methods.setdefault((p.layer, p.expert), set()).add(p.method)
    return {key for key, found in methods.items() if found == {"float (excluded)"}}


def _set_rtn_fallback(qcfg: Any, min_tokens: int) -> None:
    from gptqmodel.quantization.config import Fallback, FallbackStrategy

    qcfg.fallback = Fallback(strategy=FallbackStrategy.RTN, threshold=min_tokens)


def _write(result: QuantizeResult, path: str | Path) -> Path:
    import json

    path = Path(result.coverage.to_json(path))
    details = path.with_name(f"{path.stem}.projections.json")
    details.write_text(
        json.dumps(
            {
                "coverage_report": path.name,
                "counts": "rows each projection's quantizer hook saw; quantizer_samples is GPTQModel's own count",
                "projections": [asdict(p) for p in result.projections],
            },
            indent=1,
        )
        + "\n",
        encoding="utf-8",
    )
    return path


def quantize_with_defuser(
    model: Any,
    calibration: Any,
    *,
    routing: str = "routed",
    min_tokens: int = DEFAULT_MIN_TOKENS,
    policy: Policy = "warn",
    coverage_report: str | Path | None = None,
    grouped: bool = False,
    deterministic: bool = False,
    batched_solve: bool | BatchedSolve = False,
    lean_bookkeeping: bool | Iterable[str] = True,
    batched_hessians: bool = True,
    **quantize_kwargs: Any,
) -> QuantizeResult:
    """``model.quantize(calibration, ...)`` with our routing mode and an honest coverage report.

    Args:
        model: a GPTQModel model from ``GPTQModel.load(path, quantize_config)`` with the plugin
            installed (its experts are ``DefusedExperts``).
        calibration: what ``model.quantize`` takes (list of ``{"input_ids", "attention_mask"}``...).
        routing: ``"routed"``, ``"all"`` or ``"budgeted"`` (see ``calibration.routing``); applied
            only while GPTQModel captures expert inputs.
        min_tokens: rows every expert projection's quantizer should see (and the ``budgeted`` floor).
        policy: quantized experts under ``min_tokens`` after the run: ``"error"`` raises
            ``CoverageError`` (after writing the report), ``"warn"`` logs them, ``"fallback"``
            has GPTQModel quantize them with RTN (``Fallback(RTN, threshold=min_tokens)``)
            instead of GPTQ on a starved Hessian. Experts excluded with ``dynamic`` are reported
            (0 rows) but never trip the policy.
        coverage_report: write the coverage JSON here (schema of ``calibration.CoverageReport``)
            and ``<stem>.projections.json`` beside it.
        grouped: run the experts' calibration forwards through grouped GEMMs
            (``calibration.grouped``): each expert's GPTQ hook sees the rows it sees in the
            per-expert loop; outputs (hence ``down_proj`` inputs) differ by GEMM rounding only.
            Layers whose Linears are not plain keep the loop.
        deterministic: deterministic CUDA kernels during ``quantize()`` (``index_add_`` in the
            per-expert loop is not otherwise); see ``calibration.grouped.deterministic_mode``.
        batched_solve: solve the equal-shape modules of each subset (a layer's experts) together
            inside GPTQModel's GPTQ processor (``integrations.gptqmodel.batched``); True or a
            ``BatchedSolve`` with its settings. Modules it does not reproduce go to GPTQModel's
            per-module solve; ``QuantizeResult.solve`` counts both, with reasons.
        lean_bookkeeping: GPTQModel's per-module materialize and disk-offload bookkeeping of the
            expert projections skips its whole-model scans (``integrations.gptqmodel.overhead``):
            same tensors, same checkpoint, less host time; ``QuantizeResult.bookkeeping`` says
            what it did. Parts whose GPTQModel internals differ stay stock, with a warning. True
            turns on ``overhead.default_parts()`` (all but the opt-in ``overhead.OPT_IN``, and
            ``block_finalize`` only where the process has 16 cores, ``overhead.MANY_CORE_PARTS``); a
            collection of part names (``overhead.PARTS``) turns on only those.
        batched_hessians: with ``grouped``, GPTQModel's GPTQ Hessian hooks of each grouped call
            run together (``integrations.gptqmodel.hessians``): the same products and counters,
            far fewer host steps; ``QuantizeResult.hessians`` counts what ran batched.
        **quantize_kwargs: passed to ``model.quantize`` (``batch_size``, ``backend``, ...).

    Raises:
        CoverageError: policy ``"error"`` and some expert stayed under ``min_tokens``.
        UnquantizedExpertsError: an expert projection stayed float without a ``dynamic`` exclusion.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown policy {policy!r}; choose from {POLICIES}")
    if not isinstance(batched_solve, (bool, BatchedSolve)):
        raise TypeError(f"batched_solve must be a bool or a BatchedSolve, got {type(batched_solve).__name__}")
    if not isinstance(batched_hessians, bool):
        raise TypeError(f"batched_hessians must be a bool, got {batched_hessians!r}")
    if isinstance(lean_bookkeeping, str) or not isinstance(lean_bookkeeping, (bool, Iterable)):
        raise TypeError(f"lean_bookkeeping must be a bool or a collection of part names (overhead.PARTS), "
                        f"got {lean_bookkeeping!r}")
    qcfg = model.quantize_config
    if routing != "routed" and getattr(qcfg, "moe", None) is not None:
        raise ValueError(
            f"routing={routing!r} and QuantizeConfig(moe={qcfg.moe!r}) both change MoE calibration routing; "
            "use one (routing='all' ~ ExpertsRoutingOverride('all')/ExpertsRoutingBypass)"
        )
    if getattr(qcfg, "moe", None) is not None:
        logger.warning(
            "GPTQModel MoEConfig routing is active: the coverage counts do not see tokens it forces; "
            "the projection records' quantizer_samples do"
        )
    if policy == "fallback":
        _set_rtn_fallback(qcfg, min_tokens)
    hf_model = model.model
    with ExitStack() as stack:
        router = stack.enter_context(quantizer_aware_routing(hf_model, routing, min_tokens, grouped))
        hessians = stack.enter_context(hooked_linear_grouping(batched_hessians)) if grouped else None
        stack.enter_context(deterministic_mode(deterministic))
        solve = None
        if batched_solve is not False:
            solve = stack.enter_context(batched_solves(batched_solve if isinstance(batched_solve, BatchedSolve) else None))
        bookkeeping = None
        checkpointed = quantize_kwargs.get("checkpoint") is not None
        if lean_bookkeeping is True:
            bookkeeping = stack.enter_context(_lean_bookkeeping(model, checkpointed=checkpointed))
        elif lean_bookkeeping is not False:
            bookkeeping = stack.enter_context(_lean_bookkeeping(model, frozenset(lean_bookkeeping),
                                                                checkpointed=checkpointed))
        log = model.quantize(calibration, **quantize_kwargs)
    if solve is not None:
        logger.info("batched GPTQ solve: %s", solve.as_dict())
    report = build_report(router.coverage(), min_tokens)
    result = QuantizeResult(
        log=log or {}, coverage=report, projections=projection_records(hf_model, router, log, qcfg), solve=solve,
        replica_forwards=router.replica_calls, bookkeeping=bookkeeping, hessians=hessians,
    )
    if coverage_report is not None:
        result.report_path = _write(result, coverage_report)
    logger.info("expert coverage:\n%s", report.console_summary(worst=10))
    floats = [p.module for p in result.float_projections() if p.method == "float"]
    if floats:
        raise UnquantizedExpertsError(
            f"{len(floats)} expert projection(s) were left in float without a dynamic exclusion, e.g. {floats[:3]}"
        )
    excluded = _excluded_experts(result.projections)
    starved = [ref for ref in report.under_threshold if (ref.layer, ref.expert) not in excluded]
    if policy == "fallback":
        rtn = [p for p in result.projections if p.method == "rtn-fallback"]
        if rtn:
            logger.warning("%d expert projection(s) under min_tokens=%d were quantized with RTN", len(rtn), min_tokens)
    elif starved:
        listing = ", ".join(r.label() for r in starved[:20]) + (f" and {len(starved) - 20} more" if len(starved) > 20 else "")
        message = f"{len(starved)} quantized expert(s) saw fewer than min_tokens={min_tokens} calibration rows: {listing}"
        if policy == "error":
            raise CoverageError(message + ". Use routing='budgeted' or 'all', more calibration data, or policy='fallback'.", starved)
        logger.warning("%s; their GPTQ statistics rest on few tokens", message)
    return result


__all__ = [
    "POLICIES",
    "CoverageError",
    "ProjectionRecord",
    "QuantizeResult",
    "QuantizerAwareRouting",
    "UnquantizedExpertsError",
    "projection_records",
    "quantize_with_defuser",
    "quantizer_aware_routing",
]
