"""``DefuseModifier``: defuse MoE experts, route and count calibration tokens, arm re-fusing.

Lifecycle inside ``oneshot`` (llm-compressor 0.14):

* ``on_initialize`` (before the quantization modifiers listed after it): checks the recipe
  order, makes sure every fused experts block is a ``DefusedExperts`` (blocks llm-compressor's
  pre-recipe linearization already built through our hook are kept; blocks it linearized
  itself are adopted; fused ones are converted; blocks excluded by ``filter`` go back to the
  native fused class), enters ``routing_mode`` and attaches token counters (llm-compressor
  hooks, so they are off during the sequential pipeline's propagation passes). With
  ``grouped`` (default) the experts' calibration and propagation forwards run as grouped GEMMs
  wherever compressed-tensors' wrapped forwards are plain (``grouped.py``); the rest loops.
* ``on_calibration_start`` (its own data-free pipeline, before the quantizers calibrate): checks
  that the experts' schemes can be re-fused when ``refuse`` is set.
* ``on_finalize`` (after every pipeline, before ``oneshot`` saves): leaves the routing mode,
  builds the coverage report, writes it, applies ``coverage_policy``, and when ``refuse`` is
  set wraps ``model.save_pretrained`` so the re-fused checkpoint is written right after the
  compressed-tensors one; with ``frozen_save`` the whole save then runs with the heap frozen.

Under ``torchrun`` (see ``docs/llmcompressor.md``): token counts are summed over the ranks
before the report, rank 0 writes the files, GPTQ's Hessian tables are aligned across ranks
before each compression (``ranks.py``), ranks that calibrated on the same batches are refused,
and ``routing: budgeted`` tops up from every rank's counts before each GPTQ solve (``budget.py``).
"""

from __future__ import annotations

import functools
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import torch
from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.utils.hooks import HooksMixin
from pydantic import Field, PrivateAttr, field_validator
from torch import nn

from defuser_quant.checkpoint.concurrent_save import concurrent_shards
from defuser_quant.checkpoint.frozen_heap import FreezeStats, frozen_heap
from defuser_quant.core import DefusedExperts, DefuserQuantError, FilterRules, convert_model, fuse_model
from defuser_quant.calibration import DEFAULT_MIN_TOKENS, CoverageReport, build_report, routing_mode
from defuser_quant.calibration import distributed
from defuser_quant.calibration.first_use import Rehearsal
from defuser_quant.calibration.grouped import (
    GroupedUse,
    check_routed_indices,
    recording_grouped_use,
    routed_output,
)

from .batched_compress import CompressionBatching, with_batched_compression
from .grouped import compressed_tensors_grouping, experts_hooks_off, wrapped_hook_code
from .hessians import batched_gptq_hessians, last_batching
from .token_counts import ExpertTokenCounts, TokenCounter, batched_token_counts
from .linearize import adopt_linear_experts
from .budget import RankBudget
from .ranks import before_compress, has_hessians
from .rehearse import calibration_steps, cuda_device, solve_steps
from .refuse import RefuseError, check_refusable, refuse_checkpoint

__all__ = ["DefuseModifier", "RecipeOrderError"]

logger = logging.getLogger(__name__)


class RecipeOrderError(DefuserQuantError, ValueError):
    """A modifier that touches Linear layers comes before ``DefuseModifier`` in the recipe."""


class _CalibrationPassOnly:
    """Runs the routing mode's override only while llm-compressor's hooks are live.

    The sequential pipeline re-runs each layer with hooks disabled to propagate activations;
    forced tokens there would be wasted work (nothing observes them) and would skew the
    ``budgeted`` counts.

    Under ``torchrun`` the first block also records each batch's routed counts, so ranks that
    calibrated on the same batches are caught (``_check_data_split``), and ``budgeted`` keeps
    candidate rows for the top-up before each compression (``budget.RankBudget``).
    """

    def __init__(
        self, inner: Any, fingerprints: list | None = None, budget: RankBudget | None = None, path: str = "",
        grouped: bool = False, sync_free: bool = False,
    ):
        self.inner = inner
        self.fingerprints = fingerprints
        self.budget = budget
        self.path = path
        self.grouped = grouped
        # propagation calls on which every expert hook is llm-compressor's and switched off skip the host sync
        self.hook_code = wrapped_hook_code(HooksMixin) if sync_free else None

    def __call__(self, block: DefusedExperts, hidden: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if HooksMixin._HOOKS_DISABLED:
            hooks = self.hook_code is None or not experts_hooks_off(block, HooksMixin, self.hook_code)
            return routed_output(block, hidden, index, weights, self.grouped, hooks=hooks)
        if self.fingerprints is not None:  # kept on the device: one transfer when checked, no sync per batch
            self.fingerprints.append(torch.bincount(index.reshape(-1), minlength=block.num_experts))
        if self.budget is not None:
            self.budget.record(self.path, block, hidden, index)
        return self.inner(block, hidden, index, weights)


def _blocks(model: nn.Module) -> list[tuple[str, DefusedExperts]]:
    return [(path, m) for path, m in model.named_modules() if isinstance(m, DefusedExperts)]


def _defuse(model: nn.Module, rules: FilterRules) -> list[str]:
    """Every allowed experts block of ``model`` as ``DefusedExperts``; returns their paths."""
    adopt_linear_experts(model)
    for path, _ in _blocks(model):
        if not rules.allows(path):
            parent = model.get_submodule(path.rpartition(".")[0])
            fuse_model(parent)  # the parent holds just this block
            logger.info("%s excluded by filter: kept fused (not quantized)", path)
    report = convert_model(model, filter=rules)
    if report:
        logger.info("defused %d block(s) (%d experts)", len(report.converted), report.num_experts)
    return [path for path, _ in _blocks(model)]


def _calibrate_all_flag() -> bool:
    from llmcompressor.modeling.moe.context import get_calibrate_all_experts_flag

    return get_calibrate_all_experts_flag()


class DefuseModifier(Modifier):
    """Defuse fused MoE experts for llm-compressor and make sure every expert is calibrated.

    List it first in the recipe (before GPTQModifier, AWQModifier, QuantizationModifier...).

    Args:
        routing: ``routed`` (top-k only), ``all`` (every expert also sees every other token;
            outputs unchanged), ``budgeted`` (extra tokens only for experts under
            ``min_tokens``). Default: follow ``oneshot(moe_calibrate_all_experts=...)``
            (True by default, i.e. ``all``).
        min_tokens: the per-expert token floor of ``budgeted`` and of the coverage report.
        coverage_report: path of the JSON coverage report written at finalize.
        coverage_policy: ``warn`` (log experts under ``min_tokens``) or ``error`` (fail before
            the checkpoint is saved). ``fallback`` does not exist here: quantizers consume the
            tokens during the pass; use ``routing: budgeted`` instead.
        filter: defuse rules (``+:regex`` include, ``-:regex`` exclude) over block paths;
            excluded blocks stay fused and unquantized.
        refuse: ``false``, ``dequantized`` or ``fp8_fused``: also write a re-fused checkpoint
            when the model is saved (see ``refuse_checkpoint``).
        refuse_output_dir: where; default ``<save dir>-dequantized`` / ``<save dir>-fp8-fused``.
        grouped: run each block's experts through grouped GEMMs while every expert Linear's
            hooks see the rows the per-expert loop would give (Hessians equal the loop's);
            blocks whose wrapped forwards are not plain (activation quantization enabled, an
            unknown wrapper) take the loop, and :attr:`grouped_use` says how often and why.
        share_hessians: with ``grouped`` and ``routing: all``, the GPTQ Hessians of a block's gate
            and up projections (equal there: the same rows in the same order) take each call's
            product once, in one accumulator, and are written from it before GPTQ solves them;
            the same Hessians bit for bit (``hessians.py``). ``False``: one add per Hessian.
        save_threads: threads that write the saved checkpoint's safetensors shards at once
            (``defuser_quant.checkpoint.concurrent_save``); without a ``max_shard_size`` the
            checkpoint is split into about one shard per thread. Default: the CPUs, at most 8;
            ``1``: Transformers' own one-by-one write.
        batched_compress: at save, pack each group of alike quantized Linears (the experts of a role: one
            shape and scheme) with one quantize and one int32 packing over their stacked rows instead of one
            module at a time (``batched_compress.py``); the same words bit for bit, checked against
            compressed-tensors' own ``compress`` on every chunk's first module. Other modules, and every
            module under ``torchrun``, are packed by compressed-tensors as before. :attr:`compression_batching`
            says what was packed here. On one H100 the packing took 0.19-0.22 s against 0.54-0.90 s, the same
            checkpoint (docs/performance.md, round 47); on a CPU the loop packs (stacked it was slower there).
        rehearse: on a CUDA model, launch the calibration's and the GPTQ solve's kernels once on small
            tensors of their own, on a background thread, while llm-compressor sets up (CUDA loads
            each kernel at its first launch and the launching thread waits; ``rehearse.py``).
            Nothing computed changes; :attr:`rehearsal` says what ran. Opt-in: one H100 call
            (round 45) showed no end-to-end gain beyond the host's spread.
        sync_free_propagation: with ``grouped``, the propagation passes' grouped forwards (llm-compressor's
            hooks all switched off) skip their one host sync per block call: the rows per expert stay on
            the device, the same GEMMs run (the same outputs bit for bit), and an expert index outside
            the block, which the per-expert loop refuses at once, is raised at finalize instead (the run
            fails before the save). Opt-in: on one H100 it was no faster (docs/performance.md, round 46).
        sync_free_calibration: with ``grouped`` and ``routing: all``, the calibration passes' whole-batch calls
            leave each expert's routed rows on the device (counted there for the coverage report, read once at
            finalize) instead of reading them at one host sync per block call, so the host can queue the next
            batch's work while the GPU runs this one's; the same outputs, Hessians and counts. An expert index
            outside the block is raised at finalize, as with ``sync_free_propagation``. Opt-in: on one H100 it took
            its path and was no faster (docs/performance.md, round 47).
        frozen_save: run the save ``oneshot`` makes after :meth:`on_finalize` (``model.save_pretrained``, the
            re-fused copy included) with the objects alive at its start left out of the interpreter's full garbage
            collections (``defuser_quant.checkpoint.frozen_heap``), and handed back at its end, also on an error;
            :attr:`frozen_save_stats` says what ran. On a CPU the one full collection of a one-layer ``oneshot`` at
            the expert shape came in the save, stock's too (0.22-0.29 s); on one H100 each two-layer run had one
            of 0.24-0.32 s, and it came at the start (``initialize`` / ``offload_setup``), not in the save, so the
            frozen save spared nothing there (docs/performance.md, rounds 53-54). Opt-in.
    """

    routing: Literal["routed", "all", "budgeted"] | None = None
    min_tokens: int = Field(default=DEFAULT_MIN_TOKENS, ge=0)
    coverage_report: str | None = None
    coverage_policy: Literal["warn", "error"] = "warn"
    filter: list[str] | None = None
    refuse: Literal[False, "dequantized", "fp8_fused"] = False
    refuse_output_dir: str | None = None
    grouped: bool = True
    share_hessians: bool = True
    save_threads: int | None = Field(default=None, ge=1)
    batched_compress: bool = True
    rehearse: bool = False
    sync_free_propagation: bool = False
    sync_free_calibration: bool = False
    frozen_save: bool = False

    _stack: ExitStack | None = PrivateAttr(default=None)
    _counts: dict[str, ExpertTokenCounts] = PrivateAttr(default_factory=dict)
    _coverage: CoverageReport | None = PrivateAttr(default=None)
    _fingerprints: list | None = PrivateAttr(default=None)
    _undo_rank_sync: Any = PrivateAttr(default=None)
    _budget: RankBudget | None = PrivateAttr(default=None)
    _grouped_use: GroupedUse | None = PrivateAttr(default=None)
    _rehearsal: Rehearsal | None = PrivateAttr(default=None)
    _compression: CompressionBatching | None = PrivateAttr(default=None)
    _frozen: FreezeStats | None = PrivateAttr(default=None)
    _rehearse_solves: bool = PrivateAttr(default=False)  # a GPTQ-like modifier in the recipe (seen at initialize)

    @field_validator("filter", mode="before")
    @classmethod
    def _one_rule_or_many(cls, value: Any) -> Any:
        rules = [value] if isinstance(value, str) else value
        if rules is not None:
            FilterRules.parse(rules)  # FilterRuleError is a ValueError: pydantic reports it
        return rules

    @field_validator("coverage_policy", mode="before")
    @classmethod
    def _no_fallback(cls, value: Any) -> Any:
        if value == "fallback":
            raise ValueError(
                "coverage_policy 'fallback' is not available inside llm-compressor: the quantizers consume the "
                "calibration tokens during the pass, so a later all-experts pass comes too late. Use routing: budgeted "
                "(tops up experts under min_tokens during the pass) or routing: all"
            )
        return value

    @field_validator("refuse", mode="before")
    @classmethod
    def _refuse_mode(cls, value: Any) -> Any:
        if value is True:
            raise ValueError("refuse: true is ambiguous; say refuse: dequantized or refuse: fp8_fused")
        return False if value in (None, "false", "none") else value

    @property
    def coverage(self) -> CoverageReport | None:
        """The coverage report built at finalize (None before)."""
        return self._coverage

    @property
    def rehearsal(self) -> dict[str, Any] | None:
        """The kernel rehearsal's steps (seconds each), those with nothing to rehearse, failures, or why none
        ran (None: ``rehearse=False``)."""
        return None if self._rehearsal is None else self._rehearsal.stats.as_dict()

    @property
    def compression_batching(self) -> dict[str, Any] | None:
        """What the save's batched packing did (None: ``batched_compress=False``, or not saved yet)."""
        return None if self._compression is None else self._compression.as_dict()

    @property
    def frozen_save_stats(self) -> dict[str, Any] | None:
        """What the frozen save did: whether it froze, the full collections during it (None: ``frozen_save=False``,
        or not saved yet)."""
        return None if self._frozen is None else self._frozen.as_dict()

    @property
    def grouped_use(self) -> GroupedUse | None:
        """Block calls that ran grouped and the per-expert-loop fallbacks by reason (None unless ``grouped``)."""
        return self._grouped_use

    # ----- lifecycle ---------------------------------------------------------------------
    def on_initialize(self, state: State, **kwargs: Any) -> bool:
        self._check_recipe_order()
        mode = self.routing or ("all" if _calibrate_all_flag() else "routed")
        if self.sync_free_calibration and (mode != "all" or not self.grouped):
            raise DefuserQuantError(
                f"DefuseModifier: sync_free_calibration needs routing 'all' and grouped: true (it removes the host sync "
                f"of the whole-batch grouped calls); this run has routing {mode!r}, grouped {self.grouped}. Drop "
                "sync_free_calibration, or use routing: all"
            )
        model = state.model
        paths = _defuse(model, FilterRules.parse(self.filter))
        if not paths:
            logger.warning("DefuseModifier: %s has no fused MoE experts block; nothing to do", type(model).__name__)
            return True
        ranked_budget = mode == "budgeted" and distributed.is_distributed()
        if ranked_budget and not any(has_hessians(m) for m in self._recipe_modifiers()):
            raise DefuserQuantError(
                "DefuseModifier: routing 'budgeted' under torchrun tops up experts right before GPTQ solves each layer, "
                "so it needs GPTQModifier in the recipe. Use routing: all, or run in one process"
            )
        self._stack = ExitStack()
        try:
            if self.grouped:
                self._stack.enter_context(compressed_tensors_grouping())
                self._stack.enter_context(batched_gptq_hessians(share=self.share_hessians))
                self._stack.enter_context(batched_token_counts())
                self._grouped_use = self._stack.enter_context(recording_grouped_use())
            # under torchrun budgeted routes normally and tops up from every rank's counts (budget.py)
            routing = "routed" if ranked_budget else mode
            # all: each expert's hooks see every token of a batch in one call, as stock llm-compressor's
            # all-experts calibration does (same Hessians; one gate/up product for all experts)
            self._stack.enter_context(routing_mode(
                model, routing, min_tokens=self.min_tokens, grouped=self.grouped, whole_batch=routing == "all",
                sync_free=self.sync_free_calibration,
            ))
            self._attach_counters(model)
            self._budget = RankBudget(_blocks(model), self.min_tokens, self._counts) if ranked_budget else None
            self._fingerprints = [] if distributed.is_distributed() else None
            for index, (path, block) in enumerate(_blocks(model)):
                record = self._fingerprints if index == 0 else None
                block.forward_override = _CalibrationPassOnly(block.forward_override, record, self._budget, path, self.grouped,
                                                              self.grouped and self.sync_free_propagation)
            if distributed.is_distributed():
                self._undo_rank_sync = before_compress(self._recipe_modifiers(), model, self._before_compress)
            if self.rehearse:
                self._start_rehearsal(model)
        except BaseException:
            self._teardown()
            raise
        logger.info("DefuseModifier: %d block(s), routing %r, min_tokens %d", len(paths), mode, self.min_tokens)
        return True

    def on_calibration_start(self, state: State, event: Event, **kwargs: Any) -> None:
        if self.refuse:
            self._check_refusable(state.model)
        rehearsal = self._rehearsal
        if rehearsal is not None and rehearsal.stats.skipped is None and self._rehearse_solves:
            rehearsal.start_from(lambda: solve_steps(state.model, rehearsal.device), "solve set-up")

    def on_finalize(self, state: State, **kwargs: Any) -> bool:
        self._check_data_split()
        self._teardown()
        if self.sync_free_propagation or self.sync_free_calibration:
            check_routed_indices()  # raises before oneshot saves anything
        self._log_grouped_use()
        if self._counts:
            self._finish_coverage()
        self._arm_save(state.model)
        if self.refuse:
            self._check_refusable(state.model)
            self._arm_refuse(state.model)
        if self.frozen_save:
            self._arm_frozen_save(state.model)
        return True

    # ----- helpers -----------------------------------------------------------------------
    @staticmethod
    def _recipe_modifiers() -> list:
        from llmcompressor.core import active_session

        return list(getattr(active_session().lifecycle.recipe, "modifiers", None) or [])

    def _check_recipe_order(self) -> None:
        modifiers = self._recipe_modifiers()
        position = next((i for i, m in enumerate(modifiers) if m is self), None)
        if position is None:
            return
        before = [
            type(m).__name__
            for m in modifiers[:position]
            if not isinstance(m, DefuseModifier) and type(m).__module__.startswith("llmcompressor.modifiers.")
        ]
        if before:
            raise RecipeOrderError(
                f"DefuseModifier comes after {', '.join(before)} in the recipe: those modifiers were set up on the fused "
                "experts, so the experts would not be calibrated and quantized as defused nn.Linear modules. List "
                "DefuseModifier first: in YAML as the first entry under the stage's *_modifiers key, in Python as "
                "recipe=[DefuseModifier(...), " + before[0] + "(...)]."
            )

    def _before_compress(self) -> None:
        """Under torchrun, right before GPTQ solves a layer: data check, then the budgeted top-up."""
        self._check_data_split()
        if self._budget is not None:
            self._budget.top_up()

    def _check_data_split(self) -> None:
        """Under torchrun, once the first block has seen data: refuse ranks that saw the same batches."""
        if self._fingerprints:
            fingerprints, self._fingerprints = self._fingerprints, None
            rows = torch.stack(fingerprints).cpu().tolist()
            distributed.check_distinct_shares([tuple(row) for row in rows])

    def _log_grouped_use(self) -> None:
        use = self._grouped_use
        if use is None or not (use.grouped or use.fallbacks):
            return
        if use.fallbacks:
            reasons = "; ".join(f"{reason} ({n}x)" for reason, n in sorted(use.fallbacks.items(), key=lambda kv: -kv[1]))
            logger.info("grouped calibration forward: %d block call(s) grouped, %d per-expert loop: %s", use.grouped,
                        use.loop, reasons)
        else:
            logger.info("grouped calibration forward: all %d block call(s) grouped", use.grouped)
        batching = last_batching()
        if batching.shared_groups:
            logger.info("GPTQ Hessians: %d group(s) of equal gate/up Hessians shared one accumulator each "
                        "(%d adds to an accumulator in place of a Hessian)", batching.shared_groups, batching.shared_adds)

    def _attach_counters(self, model: nn.Module) -> None:
        self._counts = {}
        for path, block in _blocks(model):
            counts = ExpertTokenCounts(len(block))
            self._counts[path] = counts
            for index, expert in enumerate(block):
                self.register_hook(expert.projection("up"), TokenCounter(counts, index), "forward_pre")

    def _start_rehearsal(self, model: nn.Module) -> None:
        device = cuda_device(model)
        self._rehearsal = Rehearsal(device or "cpu")
        if device is None:
            self._rehearsal.stats.skipped = "no model tensor on a CUDA device"
            return
        # at calibration start each modifier runs in a recipe of its own (recipe_scope.py): look now
        self._rehearse_solves = any(has_hessians(m) for m in self._recipe_modifiers())
        blocks = [block for _, block in _blocks(model)]
        self._rehearsal.start_from(lambda: calibration_steps(model, blocks, device), "calibration set-up")

    def _teardown(self) -> None:
        try:
            if self._rehearsal is not None:  # a Ctrl-C while waiting still undoes the rest below
                stats = self._rehearsal.join()
                logger.debug("kernel rehearsal: %s", stats.as_dict())
        finally:
            self.remove_hooks()
            if self._undo_rank_sync is not None:
                undo, self._undo_rank_sync = self._undo_rank_sync, None
                undo()
            if self._stack is not None:
                stack, self._stack = self._stack, None
                stack.close()

    def _finish_coverage(self) -> None:
        for counts in self._counts.values():
            counts.fold()  # rows counted on the device by sync-free calls: one host read per block
        # under torchrun each rank counted its own share of the data: sum before deciding anything
        counts = distributed.all_reduce_counts({p: (c["routed"], c["forced"]) for p, c in self._counts.items()})
        report = build_report(counts, self.min_tokens)
        self._coverage = report
        if self.coverage_report and distributed.is_main_process():
            report.to_json(self.coverage_report)
            logger.info("coverage report written to %s", self.coverage_report)
        logger.info("expert coverage:\n%s", report.console_summary())
        if report.totals.routed_tokens == 0:
            logger.info("no calibration forward ran (data-free recipe): expert coverage not enforced")
        else:
            report.apply_policy(self.coverage_policy)

    def _check_refusable(self, model: nn.Module) -> None:
        schemes = {
            name: m.quantization_scheme for name, m in model.named_modules() if getattr(m, "quantization_scheme", None)
        }
        shapes, unquantized = {}, []
        for path, block in _blocks(model):
            for index, expert in enumerate(block):
                for role in ("gate", "up", "down"):
                    linear = expert.projection(role)
                    if linear is None:
                        continue
                    name = f"{path}.{index}.{getattr(block.names, role)}"
                    if name not in schemes:
                        unquantized.append(name)
                    if role != "down":
                        shapes[name] = (linear.out_features, linear.in_features)
        if self.refuse == "fp8_fused" and unquantized:
            raise RefuseError(
                f"refuse: fp8_fused needs every expert projection quantized; {len(unquantized)} are not "
                f"(e.g. {unquantized[0]}): check the quantization modifier's targets/ignore"
            )
        check_refusable(self.refuse, schemes, expert_shapes=shapes)

    def _arm_save(self, model: nn.Module) -> None:
        """Wrap llm-compressor's compressed save: alike modules packed in batches, shards written by a pool of threads."""
        save = getattr(model, "save_pretrained", None)
        if not getattr(save, "_overridden", False):  # no compressed-tensors save wrapper (not inside oneshot)
            return
        if self.batched_compress:
            self._compression = CompressionBatching()
            save = with_batched_compression(save, self._compression)
        model.save_pretrained = concurrent_shards(save, self.save_threads)

    def _arm_frozen_save(self, model: nn.Module) -> None:
        """Wrap ``model.save_pretrained`` (outermost: the re-fused copy included) to run inside a frozen heap."""
        inner = getattr(model, "save_pretrained", None)
        if inner is None:
            return
        modifier = self

        @functools.wraps(inner)
        def save_frozen(*args: Any, **kwargs: Any) -> Any:
            modifier._frozen = FreezeStats()
            with frozen_heap(modifier._frozen):
                return inner(*args, **kwargs)

        model.save_pretrained = save_frozen

    def _arm_refuse(self, model: nn.Module) -> None:
        """Wrap ``model.save_pretrained``: after the compressed-tensors save, write the re-fused copy."""
        mode, output_dir = self.refuse, self.refuse_output_dir
        inner = model.save_pretrained
        # oneshot saves the tokenizer after the model: take those files from where the model came from
        origin = [getattr(getattr(model, "config", None), "_name_or_path", None) or ""]

        @functools.wraps(inner)
        def save_then_refuse(save_directory: str | Path, *args: Any, **kwargs: Any) -> Any:
            result = inner(save_directory, *args, **kwargs)  # under torchrun: rank 0 writes, all ranks wait
            if distributed.is_main_process():
                target = output_dir or f"{str(save_directory).rstrip('/')}-{mode.replace('_', '-')}"
                refuse_checkpoint(save_directory, target, mode, side_files_from=[p for p in origin if p])
            return result

        model.save_pretrained = save_then_refuse
        logger.info("refuse: %s armed: written when the model is saved", mode)
