"""When each part of one GPTQModel ``quantize()`` ran, on which thread (``gptqmodel_gpu.py --timeline``).

GPTQModel's region timer (``quant_region_timer``) only sums seconds per region. Inside
:class:`Timeline` every sample it records also becomes a span (its end is the moment it was recorded,
its start that minus its duration), and so do every subset stage (``run_subset_stage``, on the main
thread), every batched chunk solve of the plugin (``batched._Coordinator._solve``) and every solve of
GPTQModel's own (``GPTQ.quantize``: stock's, and the plugin's per-module ones).
:func:`summarize` then splits each subset stage into its calibration forward, the time some chunk was
being solved, and the rest (GPTQModel's per-module processing with no solve running, the gaps before
the first and after the last solve), and counts how busy GPTQModel's finalize workers were meanwhile;
the main thread's time outside the subset stages (layer loads and moves, finalize waits, the end of
the loop) is one more figure, and each layer's finalizes get their window (first start to last end) and
median durations. Timestamps are ``time.perf_counter()``; nothing is synchronized, so
this times the host, like the run itself.

The main thread's time outside the subset stages is split too: the steps GPTQModel's layer loop runs
there (:data:`MAIN_PHASES`: the layer's ``pre_quantize``, its subset plans, the replay, ``post_quantize``,
queueing the finalizes, ...) become ``"phase"`` spans, and :func:`main_gaps` gives each gap between
subset stages (and before the first, after the last) with the seconds of each phase and region in it
and what no span covers.

The first steps of a solve, on the device worker threads, are ``"solve_step"`` spans
(:data:`SOLVE_STEPS`), in GPTQModel's own solves and in the plugin's chunk solves alike; each subset's
row gives their seconds (``solve_steps``), so a solve that waits before its inverse shows where.
"""

from __future__ import annotations

import bisect
import functools
import importlib
import json
import re
import statistics
import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from defuser_quant.integrations.gptqmodel.compat import patched
from defuser_quant.integrations.gptqmodel.gc_freeze import timed_collections

__all__ = ["MAIN_PHASES", "Span", "Timeline", "finalize_windows", "main_gaps", "summarize", "union_seconds"]

#: The steps of GPTQModel's layer loop (``stage_layer.run_layer_stage``) timed as ``"phase"`` spans:
#: ``(module, owner, attribute)``, the owner a module-level name or a class of that module (``None``:
#: the module itself). Each is patched where ``run_layer_stage`` looks it up.
MAIN_PHASES: tuple[tuple[str, str | None, str], ...] = (
    ("gptqmodel.models.base", "BaseQModel", "pre_quantize"),
    ("gptqmodel.models.base", "BaseQModel", "post_quantize"),
    ("gptqmodel.looper.stage_layer", None, "replace_module_with_hooked_legacy"),
    ("gptqmodel.looper.stage_layer", None, "materialize_model"),
    ("gptqmodel.looper.stage_layer", None, "find_modules"),
    ("gptqmodel.looper.stage_layer", None, "build_layer_subset_plans"),
    ("gptqmodel.looper.stage_layer", None, "_capture_pristine_group_context"),
    ("gptqmodel.looper.stage_layer", None, "_replay_layer_outputs"),
    ("gptqmodel.looper.stage_layer", None, "torch_sync"),
    ("gptqmodel.looper.stage_layer", None, "get_device_new"),
    ("gptqmodel.looper.module_looper", "ModuleLooper", "_emit_layer_complete"),
    # before the loop: the quantized-kernel choice, the processors (their calibration data prepared)
    ("gptqmodel.models.base", None, "select_quant_linear"),
    ("gptqmodel.models.base", "BaseQModel", "prepare_dataset"),
    ("gptqmodel.looper.loop_processor", "LoopProcessor", "__init__"),
    # the loop's start: its constructor, of it the disk-speed probe (a 100 MB write and fsync, once a process)
    ("gptqmodel.looper.module_looper", "ModuleLooper", "__init__"),
    ("gptqmodel.looper.module_looper", None, "io_write_performance"),
    # after the input capture: the base modules (embeddings, norm, head) written to the offload folder
    ("gptqmodel.looper.module_looper", None, "offload_to_disk"),
    # inside pre_quantize (a layer's load): the meta-tensor scan and the checkpoint copy into the layer
    ("gptqmodel.models.base", None, "_module_has_meta_tensors"),
    ("gptqmodel.utils.structure", "LazyTurtle", "materialize_submodule"),
    # inside the copy: the per-tensor copies themselves, then the whole model's weight tying after them
    ("gptqmodel.utils.structure", "LazyTurtle", "_copy_checkpoint_tensors_into_submodule"),
    ("transformers.modeling_utils", "PreTrainedModel", "tie_weights"),
    ("gptqmodel.utils.threadx", "DeviceThreadPool", "submit"),
    # between the input capture and the first layer's subsets (round 57: 0.31 s there on an H100 under no phase):
    # the region table's print, the loop extensions' start, the layer loop's first steps, layer 0's staged upload
    ("gptqmodel.utils.logger", "QuantizationRegionTimer", "flush"),
    ("gptqmodel.looper.extension", "LoopExtensions", "start"),
    ("gptqmodel.looper.stage_layer", None, "find_last_quantized_layer_index"),
    ("gptqmodel.looper.stage_layer", None, "_collect_hook_skip_modules"),
    ("gptqmodel.looper.stage_layer", None, "_log_cuda_memory_diagnostics"),
    ("defuser_quant.integrations.gptqmodel.layer_offload", None, "stage_uploads"),
    ("defuser_quant.integrations.gptqmodel.layer_offload", None, "swap_in"),
    # whole-process pauses GPTQModel may cause: a full garbage collection, the CUDA cache emptied (its janitor)
    ("gc", None, "collect"),
    ("torch.cuda", None, "empty_cache"),
)


#: The first steps of a GPTQ solve timed as ``"solve_step"`` spans on the thread that runs them, ``(module,
#: owner, attribute)`` as in :data:`MAIN_PHASES`, each patched where the solves look it up: GPTQModel's
#: Hessian finalization, the wait for its deferred sources' events, the weight's clone, the per-row
#: quantizer parameters (a host sync) and act_group_aware's in-group permutations (CUDA ``topk``), and the
#: plugin's chunk-solve counterparts of the last two (its sync-free parameters, its per-Hessian inverse with
#: the dead columns and permutations). Round 43 found layer 0's first solves waiting 0.2-0.3 s after the clone.
SOLVE_STEPS: tuple[tuple[str, str | None, str], ...] = (
    ("gptqmodel.quantization.gptq", "GPTQ", "finalize_hessian"),
    ("gptqmodel.quantization.gptq", "GPTQ", "_release_deferred_hessian_sources"),
    ("gptqmodel.quantization.gptq", "GPTQ", "clone_module"),
    ("gptqmodel.quantization.quantizer", "Quantizer", "find_params"),
    ("gptqmodel.quantization.gptq", None, "compute_local_perms"),
    ("defuser_quant.integrations.gptqmodel.batched", None, "_find_params"),
    ("defuser_quant.integrations.gptqmodel.batched", None, "_invert_unit"),
)


#: The shortest garbage collection kept as a span (seconds).
GC_SPAN = 0.005


@dataclass
class Span:
    """One timed piece of the run: ``kind`` is a region name, ``"subset"``, ``"chunk_solve"`` or ``"module_solve"``."""

    kind: str
    name: str
    thread: str
    start: float
    end: float


def union_seconds(spans: list[tuple[float, float]], lo: float = float("-inf"), hi: float = float("inf")) -> float:
    """Seconds covered by at least one of ``spans`` (clipped to ``[lo, hi]``)."""
    clipped = [(max(a, lo), min(b, hi)) for a, b in spans if min(b, hi) > max(a, lo)]
    return sum(b - a for a, b in merge_spans(clipped))


def merge_spans(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """``spans`` as disjoint ``(start, end)`` intervals in order, covering the same time."""
    merged: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if merged and a <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        elif b > a:
            merged.append((a, b))
    return merged


def covered_seconds(merged: list[tuple[float, float]], lo: float, hi: float) -> float:
    """Time within ``[lo, hi]`` covered by ``merged`` (from :func:`merge_spans`)."""
    first = bisect.bisect_left(merged, (lo,)) - 1
    return sum(_overlap(a, b, lo, hi) for a, b in merged[max(first, 0):bisect.bisect_right(merged, (hi,))])


def _overlap(a: float, b: float, lo: float, hi: float) -> float:
    return max(0.0, min(b, hi) - max(a, lo))


def _targets(table: tuple[tuple[str, str | None, str], ...], name: str) -> list[tuple[Any, str]]:
    """Each ``(module, owner, attribute)`` of ``table`` as ``(object to patch, label)``: the owner a module-level
    name of the module, or the module itself; one that is not there is refused in one line naming ``name``."""
    out = []
    for module_name, owner_name, attribute in table:
        owner = importlib.import_module(module_name)
        label = attribute if owner_name is None else f"{owner_name}.{attribute}"
        if owner_name is not None:
            owner = getattr(owner, owner_name, None)
        if not callable(getattr(owner, attribute, None)):
            raise RuntimeError(f"--timeline: there is no {module_name}.{label} to time; update _timeline.{name} for "
                               "this GPTQModel release")
        out.append((owner, label))
    return out


class Timeline:
    """Records spans while the block runs (patches restored on exit, also on an exception).

    ``Timeline.spans`` holds them in the order they ended; ``start``/``end`` are the block's own.
    """

    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.start = self.end = 0.0
        self._lock = threading.Lock()
        self._patches = ExitStack()

    def _add(self, kind: str, name: str, start: float, end: float) -> None:
        self.add_span(kind, name, threading.current_thread().name, start, end)

    def add_span(self, kind: str, name: str, thread: str, start: float, end: float) -> None:
        """One span measured elsewhere (``perf_counter`` seconds), e.g. the GIL probe's stalls."""
        with self._lock:
            self.spans.append(Span(kind, name, thread, start, end))

    def _patch(self, owner: Any, attribute: str, make: Callable[[Callable], Callable]) -> None:
        self._patches.enter_context(patched(owner, attribute, make(getattr(owner, attribute))))

    def __enter__(self) -> Timeline:
        from gptqmodel.looper import stage_layer  # run_subset_stage's caller looks it up here
        from gptqmodel.quantization.gptq import GPTQ
        from gptqmodel.utils.logger import QuantizationRegionTimer

        timeline = self

        def region(original: Callable) -> Callable:
            @functools.wraps(original)
            def record(self, region, duration, *args, **kwargs):
                now = time.perf_counter()
                try:
                    seconds = max(0.0, float(duration))
                except (TypeError, ValueError):
                    seconds = None
                if seconds is not None:
                    timeline._add(str(region), str(kwargs.get("source") or ""), now - seconds, now)
                return original(self, region, duration, *args, **kwargs)
            return record

        def timed(kind: str, label: Callable[..., str]) -> Callable[[Callable], Callable]:
            def make(original: Callable) -> Callable:
                @functools.wraps(original)
                def run(*args, **kwargs):
                    t0 = time.perf_counter()
                    try:
                        return original(*args, **kwargs)
                    finally:
                        timeline._add(kind, label(*args, **kwargs), t0, time.perf_counter())
                return run
            return make

        def subset_label(*_args, **kwargs) -> str:
            plan = kwargs.get("plan")
            return f"layer {kwargs.get('layer_index')} subset {getattr(plan, 'subset_index', '?')}: " \
                   f"{len(getattr(plan, 'modules', None) or ())} modules"

        def phase(name: str) -> Callable[[Callable], Callable]:
            return timed("phase", lambda *_args, **_kwargs: name)

        def chunk_label(_coordinator, chunk, *_args, **_kwargs) -> str:
            return f"{len(chunk.tasks)} modules"

        def module_label(task, *_args, **_kwargs) -> str:
            return str(getattr(task, "name", "") or "")

        try:
            self._patch(QuantizationRegionTimer, "record", region)
            self._patch(GPTQ, "quantize", timed("module_solve", module_label))
            self._patch(stage_layer, "run_subset_stage", timed("subset", subset_label))
            try:
                batched = importlib.import_module("defuser_quant.integrations.gptqmodel.batched")
            except ImportError:
                batched = None
            if batched is not None:
                self._patch(batched._Coordinator, "_solve", timed("chunk_solve", chunk_label))
            for owner, label in _targets(MAIN_PHASES, "MAIN_PHASES"):
                self._patch(owner, label.rpartition(".")[2], phase(label))
            for owner, label in _targets(SOLVE_STEPS, "SOLVE_STEPS"):
                self._patch(owner, label.rpartition(".")[2], timed("solve_step", lambda *_args, _name=label, **_kwargs: _name))
        except BaseException:
            self._patches.close()
            raise
        self._patches.enter_context(timed_collections(self._collected))
        self.start = time.perf_counter()
        return self

    def time_until_called(self, obj: Any, attribute: str, name: str) -> None:
        """A ``phase`` span ``name`` on this thread from now until ``obj.attribute`` is first called (the plugin's
        set-up before GPTQModel's ``quantize``, say); the attribute is restored at that call, or when the block ends."""
        had, previous = attribute in vars(obj), vars(obj).get(attribute)
        original, begin, thread = getattr(obj, attribute), time.perf_counter(), threading.current_thread().name

        def restore() -> None:
            if had:
                vars(obj)[attribute] = previous
            else:
                vars(obj).pop(attribute, None)

        def call(*args: Any, **kwargs: Any) -> Any:
            restore()
            self.add_span("phase", name, thread, begin, time.perf_counter())
            return original(*args, **kwargs)

        vars(obj)[attribute] = call
        self._patches.callback(restore)

    def _collected(self, generation: int, start: float, end: float) -> None:
        """The interpreter's own garbage collections (``"gc"`` spans, ``gen<N>``) of ``GC_SPAN`` seconds or more:
        a full collection holds the interpreter lock for as long as it scans every tracked object."""
        if end - start >= GC_SPAN:
            self._add("gc", f"gen{generation}", start, end)

    def __exit__(self, *exc: object) -> None:
        self.end = time.perf_counter()
        self._patches.close()

    def write(self, path: Path) -> None:
        """Every span, one JSON line each, times in seconds from the block's start."""
        with path.open("w") as f:
            for s in sorted(self.spans, key=lambda s: s.start):
                f.write(json.dumps({**asdict(s), "start": round(s.start - self.start, 5),
                                    "end": round(s.end - self.start, 5)}) + "\n")

    def summary(self) -> dict:
        return summarize(self.spans, self.start, self.end)


def summarize(spans: list[Span], start: float, end: float) -> dict:
    """Per subset stage and for the whole block: where the main thread's time went (see the module doc).

    Per subset: ``seconds`` (its wall time), ``forward`` (its ``pre_quant_forward``), ``solving`` (time
    some chunk solve ran), ``before_first_solve`` (from the forward's end to the first solve's start),
    ``between_solves`` (no chunk solve running, after the first and before the last), ``after_last_solve``
    (to the stage's end), ``other`` (the rest: where no chunk was solved at all, GPTQModel's own solves and
    processing), ``module_solving`` (time some solve of GPTQModel's own ran: all of stock's solves),
    ``process_calls`` and ``finalize_busy`` (finalize-worker seconds inside the stage). ``finalize``: each
    layer's finalize window (:func:`finalize_windows`); ``main_gaps``: the main thread outside the subset
    stages, gap by gap (:func:`main_gaps`).
    """
    subsets = sorted((s for s in spans if s.kind == "subset"), key=lambda s: s.start)
    solves = sorted((s for s in spans if s.kind == "chunk_solve"), key=lambda s: s.start)
    own = [s for s in spans if s.kind == "module_solve"]
    forwards = [s for s in spans if s.kind == "pre_quant_forward"]
    process = [s for s in spans if s.kind == "process_quant"]
    finalize = [s for s in spans if s.kind == "submodule_finalize"]
    steps = [s for s in spans if s.kind == "solve_step"]
    rows = []
    for sub in subsets:
        lo, hi = sub.start, sub.end
        fwd = union_seconds([(f.start, f.end) for f in forwards], lo, hi)
        fwd_end = max((min(f.end, hi) for f in forwards if _overlap(f.start, f.end, lo, hi) > 0), default=lo)
        inside = [s for s in solves if _overlap(s.start, s.end, lo, hi) > 0]
        solving = union_seconds([(s.start, s.end) for s in inside], lo, hi)
        row = {"name": sub.name, "seconds": round(hi - lo, 3), "forward": round(fwd, 3), "solving": round(solving, 3),
               "chunks": len(inside),
               "module_solving": round(union_seconds([(s.start, s.end) for s in own], lo, hi), 3),
               "process_calls": sum(1 for p in process if lo <= p.end <= hi),
               "finalize_busy": round(sum(_overlap(f.start, f.end, lo, hi) for f in finalize), 3),
               "solve_steps": _step_seconds(steps, lo, hi)}
        if inside:
            first, last = min(s.start for s in inside), max(s.end for s in inside)
            row["before_first_solve"] = round(max(0.0, first - fwd_end), 3)
            row["between_solves"] = round((last - first) - union_seconds([(s.start, s.end) for s in inside], first, last), 3)
            row["after_last_solve"] = round(max(0.0, hi - last), 3)
        row["other"] = round(hi - lo - fwd - solving, 3)
        rows.append(row)
    in_subsets = union_seconds([(s.start, s.end) for s in subsets], start, end)
    last_subset_end = max((s.end for s in subsets), default=start)
    first_subset_start = min((s.start for s in subsets), default=end)
    totals = {
        "wall": round(end - start, 3),
        "subsets": round(in_subsets, 3),
        "forward": round(sum(r["forward"] for r in rows), 3),
        "solving": round(union_seconds([(s.start, s.end) for s in solves], start, end), 3),
        "module_solving": round(union_seconds([(s.start, s.end) for s in own], start, end), 3),
        "subset_other": round(sum(r["other"] for r in rows), 3),
        "before_first_subset": round(max(0.0, first_subset_start - start), 3),
        "between_subsets": round(max(0.0, last_subset_end - first_subset_start) - in_subsets, 3),
        "after_last_subset": round(max(0.0, end - last_subset_end), 3),
        "finalize_busy": round(sum(_overlap(f.start, f.end, start, end) for f in finalize), 3),
        "spans": len(spans),
        "gc": round(union_seconds([(s.start, s.end) for s in spans if s.kind == "gc"], start, end), 3),
        "gc_full": sum(1 for s in spans if s.kind == "gc" and s.name == "gen2"),
        "gil_stalls": sum(1 for s in spans if s.kind == "gil_stall"),
        "gil_stalled": round(union_seconds([(s.start, s.end) for s in spans if s.kind == "gil_stall"], start, end), 3),
        "solve_steps": _step_seconds(steps, start, end),
    }
    for key in ("before_first_solve", "between_solves", "after_last_solve"):
        totals[key] = round(sum(r.get(key, 0.0) for r in rows), 3)
    return {"totals": totals, "subsets": rows, "finalize": finalize_windows(spans, start),
            "main_gaps": main_gaps(spans, start, end)}


def _step_seconds(steps: list[Span], lo: float, hi: float) -> dict[str, float]:
    """Per solve step (by name): the seconds in ``[lo, hi]`` some thread spent in it (threads running it
    at once counted once), and the longest single call (``<name>:max``)."""
    out: dict[str, float] = {}
    for name in sorted({s.name for s in steps}):
        mine = [s for s in steps if s.name == name and _overlap(s.start, s.end, lo, hi) > 0]
        if mine:
            out[name] = round(union_seconds([(s.start, s.end) for s in mine], lo, hi), 3)
            out[f"{name}:max"] = round(max(s.end - s.start for s in mine), 3)
    return out


def main_gaps(spans: list[Span], start: float, end: float, min_seconds: float = 0.001) -> list[dict]:
    """The main thread's time outside the subset stages, gap by gap (those of ``min_seconds`` or more).

    The main thread is the one that ran the subset stages. Each gap (before the first stage, between two,
    after the last) gives ``after``/``before`` (the stages around it; ``None`` at the ends), ``seconds``,
    ``parts``: seconds per phase (a ``"phase"`` span, by its name) and per region sample (by its kind) of
    the main thread in the gap, nested ones each counted on their own, largest first, and ``uncovered``:
    the gap's seconds in no such span. ``gil_stalled``: the gap's seconds in which the GIL probe (any
    thread) waited long for the interpreter lock (``"gil_stall"`` spans), when the run recorded them.
    """
    subsets = sorted((s for s in spans if s.kind == "subset"), key=lambda s: s.start)
    main = subsets[0].thread if subsets else "MainThread"
    own = [s for s in spans if s.thread == main and s.kind not in ("subset", "chunk_solve", "gil_stall")]
    stalls = [(s.start, s.end) for s in spans if s.kind == "gil_stall"]
    gap_starts = [start, *(s.end for s in subsets)]  # gap i runs from the end of stage i - 1 to the start of stage i
    gap_ends = [*(s.start for s in subsets), end]
    gaps = []
    for i, (lo, hi) in enumerate(zip(gap_starts, gap_ends)):
        if hi - lo < min_seconds:
            continue
        inside = [s for s in own if _overlap(s.start, s.end, lo, hi) > 0]
        by_part: dict[str, list[tuple[float, float]]] = {}
        for s in inside:
            by_part.setdefault(s.name if s.kind == "phase" else s.kind, []).append((s.start, s.end))
        parts = {name: round(union_seconds(pieces, lo, hi), 3) for name, pieces in by_part.items()}
        gaps.append({
            "after": subsets[i - 1].name if i > 0 else None,
            "before": subsets[i].name if i < len(subsets) else None,
            "seconds": round(hi - lo, 3),
            "parts": dict(sorted(parts.items(), key=lambda kv: -kv[1])),
            "uncovered": round(hi - lo - union_seconds([(s.start, s.end) for s in inside], lo, hi), 3),
            **({"gil_stalled": round(union_seconds(stalls, lo, hi), 3)} if stalls else {}),
        })
    return gaps


_LAYER = re.compile(r"\blayers\.(\d+)\.")


#: block_finalize's region names (``integrations.gptqmodel.block_finalize.WAIT_REGION`` / ``RELEASE_REGION``): a group
#: worker waiting for a member's tensors, and a member's state pops and weight removal after its buffers.
BLOCK_FINALIZE_WAIT, BLOCK_FINALIZE_RELEASE = "block_finalize_wait", "block_finalize_release"


def finalize_windows(spans: list[Span], start: float) -> list[dict]:
    """Per decoder layer (from each span's module name): its ``submodule_finalize`` calls, from the first
    one's start to the last one's end (seconds from ``start``), their median seconds and the median of
    their ``submodule_finalize_pack`` part, and how many CPU workers ran them; where ``block_finalize`` ran, also the
    median of its members' release step (``median_release_ms``) and its group workers' summed wait for the members'
    tensors (``wait_s``)."""
    by_layer: dict[int, dict[str, list[Span]]] = {}
    for s in spans:
        if s.kind in ("submodule_finalize", "submodule_finalize_pack", BLOCK_FINALIZE_WAIT, BLOCK_FINALIZE_RELEASE):
            match = _LAYER.search(s.name)
            if match is not None:
                by_layer.setdefault(int(match.group(1)), {}).setdefault(s.kind, []).append(s)
    out = []
    for layer, kinds in sorted(by_layer.items()):
        calls = kinds.get("submodule_finalize", [])
        if not calls:
            continue
        packs = kinds.get("submodule_finalize_pack", [])
        row = {
            "layer": layer, "modules": len(calls),
            "first_start": round(min(c.start for c in calls) - start, 3),
            "last_end": round(max(c.end for c in calls) - start, 3),
            "median_ms": round(statistics.median(c.end - c.start for c in calls) * 1e3, 2),
            "median_pack_ms": round(statistics.median(c.end - c.start for c in packs) * 1e3, 2) if packs else None,
            "workers": len({c.thread for c in calls}),
        }
        releases, waits = kinds.get(BLOCK_FINALIZE_RELEASE, []), kinds.get(BLOCK_FINALIZE_WAIT, [])
        if releases or waits:
            row["median_release_ms"] = (round(statistics.median(r.end - r.start for r in releases) * 1e3, 2)
                                        if releases else None)
            row["wait_s"] = round(sum(w.end - w.start for w in waits), 3)
        out.append(row)
    return out
