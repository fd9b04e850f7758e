"""How a subset's chunks of the batched GPTQ solve pipeline on one GPU, as GPTQModel's run solves them.

In a two-layer GPTQModel run (round 58) a layer's gate/up subset is eleven chunks of 24 expert
projections solved one after another (about 46 ms each on an H100) and its down subset four
chunks of 41: 1.5 s of the run's critical path. Each chunk's Hessian inverses are GPTQModel's
own single-matrix cuSOLVER calls (kept so the checkpoint stays stock's bit for bit), started on
the inverse threads while the chunk before is in its column loop (``inverses_ahead``). This times
a sequence of ``--chunks`` chunks at one shape the same way (the coordinator's calls:
``start_inverses(background=True)`` from the solve's ``inverses_started``, each solve on a side
stream), for each ``--inverse-threads`` count and each ``--graphs`` setting (``on``: each inverse
thread replays its CUDA graph of the calls, ``BatchedSolve.inverse_graphs``; ``loop``: each chunk's
column loop is replayed from its graph, ``BatchedSolve.loop_graphs``; ``both``; ``off``: the eager
calls), and beside it the two halves alone:

* ``pipeline_s``: the whole sequence, per chunk;
* ``inverses_only_s``: the same chunks' inverses alone (started as the pipeline starts them, all
  collected), per chunk: the pipeline's floor if the inverses bound it;
* ``loop_only_s``: the chunks' solves with every inverse computed beforehand (``ahead`` ready), per
  chunk: the floor if the column loop bounds it;
* ``graph_stats``: what the graphs did (:mod:`.inverse_graphs`, :mod:`.loop_graph`; recorded, replays, eager,
  refused);
* with ``--profile``: the GPU's kernel time by kernel over one pipeline at the first thread count
  and graph setting, and the share of the pipeline's wall time in which any kernel ran (``gpu_busy_share``).
* with ``--trace``: one more pipeline at the first thread count and graph setting with each chunk's solve
  (on its stream) and each Hessian's inverse (on its thread's stream) marked by CUDA events: their intervals on
  the GPU's clock and how much of each solve the inverses ran beside (``trace``; :func:`overlap`). Round 61
  saw the pipeline take about the sum of its halves even with both halves replayed from graphs: this says
  whether the GPU ran them side by side at all (round 62 on an H100: it did, for 83% of the solves' time, and each
  solve lasted until the next chunk's inverses were done: 38-40 ms against the loop's 24 alone). The trace and the
  profile run right after the first ``--graphs`` setting's cells, on its graphs.
* ``errors``: a setting whose chunks came back with modules left to GPTQModel's own solve (the count and the cause:
  failed factorizations, NaN losses); the other settings still run.

``--solve-priority high`` runs the solves on a high-priority CUDA stream (the inverse threads' streams keep the
default), to see whether the loop then keeps its own pace beside the inverses (round 63 on an H100: a gate/up solve
beside them 35-37 ms instead of 38-40, still not the loop's 24 alone; the down solves no shorter).

``--inplace-update`` runs every loop with ``BatchedSolve.inplace_update`` (one ``addmm_`` per module and block);
``--compare-updates`` times each cell's pipeline and loops both ways, taking turns within each repeat (the order
flipped every repeat), and adds ``pipeline_inplace_s`` / ``loop_only_inplace_s`` to the cells: round 64 timed the two
in separate processes, whose spread (a gate/up chunk's loops 30.6 against 37.2 ms) hid the difference.

    python benchmarks/chunk_pipeline.py --output $OUT/chunk_pipeline_cuda.json --profile
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _args import counts, names  # noqa: E402
from _report import write_json  # noqa: E402
from _source import use_source_checkout  # noqa: E402
from chunk_phases import _shapes, _sync, _timed, make_tasks  # noqa: E402

use_source_checkout()  # a plain checkout on PYTHONPATH (the GPU machine) maps defuser_quant.integrations here
from defuser_quant.integrations.gptqmodel.batched import SOLVE_PRIORITIES  # noqa: E402  (--solve-priority's values)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=_shapes, default="768x2048x24,2048x768x41",
                   help="rows x columns x modules per chunk (default: a gate/up chunk and a down chunk of a run)")
    p.add_argument("--share", type=counts(1), default="2,1",
                   help="modules per shared Hessian, one per shape (2: an expert's gate/up pair)")
    p.add_argument("--chunks", type=int, default=8, help="chunks in the sequence")
    p.add_argument("--tokens", type=int, default=2048, help="calibration rows per module's Hessian")
    p.add_argument("--inverse-threads", type=counts(1), default="4,2,8")
    p.add_argument("--graphs", type=names(tuple(GRAPHS)), default="on,off",
                   help="CUDA graphs per cell: on (the inverses'), loop (the column loops'), both, off; "
                        "each a cell per thread count")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-rows-kernel", action="store_true", help="GPTQModel's extension per Hessian, not the rows kernel")
    p.add_argument("--profile", action="store_true", help="kernel times and the GPU's busy share of one pipeline")
    p.add_argument("--trace", action="store_true",
                   help="the solves' and inverses' intervals on the GPU's clock over one more pipeline, and their overlap")
    p.add_argument("--solve-priority", choices=sorted(SOLVE_PRIORITIES), default="normal",
                   help="the CUDA priority of the stream the solves (their column loops) run on; the inverse threads' "
                        "streams keep the default (round 62's trace: beside the next chunk's inverses the loop took "
                        "38-40 ms against 24 alone)")
    p.add_argument("--inplace-update", action="store_true",
                   help="each module's update after a column block as one in-place addmm (BatchedSolve.inplace_update) "
                        "instead of a matmul and a subtraction")
    p.add_argument("--compare-updates", action="store_true",
                   help="time every cell's pipeline and loops both ways, GPTQModel's matmul and subtraction and the "
                        "in-place addmm, taking turns within each repeat (the order flipped every repeat), so the "
                        "host's drift falls on both: the cells' *_inplace_s fields")
    p.add_argument("--device", default="cuda")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    if min(args.chunks, args.tokens, args.repeats) < 1:
        p.error("--chunks, --tokens and --repeats must be >= 1")
    if len(args.share) != len(args.shapes):
        p.error(f"--share needs one value per shape ({len(args.shapes)}), got {len(args.share)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; use --device cpu")
    if args.compare_updates and args.inplace_update:
        p.error("--compare-updates times both updates; leave out --inplace-update")
    return args


#: ``--graphs`` settings: (inverse graphs, loop graphs)
GRAPHS = {"on": (True, False), "off": (False, False), "loop": (False, True), "both": (True, True)}


_solve_priority = 0  # set by main()
_inplace_update = False  # set by main()


def _solve_stream(device: str) -> torch.cuda.Stream | None:
    return torch.cuda.Stream(device, priority=_solve_priority) if device.startswith("cuda") else None


class ChunkNotBatched(RuntimeError):
    """A chunk came back with modules left to GPTQModel's per-module solve: its timing is not a batched chunk's."""


@contextlib.contextmanager
def _loop_outputs() -> Iterator[list]:
    """Inside the block, the yielded list holds the last batched solve's factorization statuses and loss sums
    (what sends a module to GPTQModel's own solve), as the solve handed them on: kept, not read."""
    from defuser_quant.integrations.gptqmodel import batched

    last: list = []
    original = batched._task_results

    def kept(tasks, order, plan, qcfg, Q, S, Z, loss_sums, infos, *rest, **kwargs):
        last[:] = [infos, loss_sums]
        return original(tasks, order, plan, qcfg, Q, S, Z, loss_sums, infos, *rest, **kwargs)

    batched._task_results = kept
    try:
        yield last
    finally:
        batched._task_results = original


def _why_left(last: list) -> dict | str:
    """The failed factorizations and NaN losses of :func:`_loop_outputs`' last solve."""
    if not last:
        return "no loop ran"
    infos, loss_sums = last
    return {"failed_factorizations": int((torch.stack(infos) != 0).sum()),
            "nan_losses": sum(v != v for v in loss_sums.tolist())}


def _solve_in_turn(chunks: list[list], device: str, solve: Callable[[int, list], list]) -> None:
    """``solve(k, tasks)`` of each chunk in turn, as a worker runs it: on a side stream of its own on CUDA,
    waited for before the next chunk; every module must come back solved by the batched path (else
    :class:`ChunkNotBatched`, saying which chunk and why)."""
    stream = _solve_stream(device)
    with _loop_outputs() as last:
        for k, tasks in enumerate(chunks):
            last.clear()
            if stream is not None:
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):
                    results = solve(k, tasks)
                stream.synchronize()
            else:
                results = solve(k, tasks)
            left = sum(r is None for r in results)
            if left:
                raise ChunkNotBatched(f"chunk {k}: {left} of {len(results)} modules left to GPTQModel's per-module "
                                      f"solve ({_why_left(last)}); the chunk is not a whole batched one")


def run_pipeline(chunks: list[list], threads: int, rows_kernel: bool, device: str, graphs: bool = False,
                 loop_graphs: bool = False, wrap: Callable[[Callable], Callable] | None = None) -> None:
    """Solve ``chunks`` one after another as the coordinator does: each chunk's inverses started
    (in the background) once the chunk before has its own under way. ``wrap``: applied to each chunk's
    ``solve(k, tasks)`` (a tracer's marks around it)."""
    from defuser_quant.integrations.gptqmodel.batched import batched_gptq_solve, start_inverses

    aheads: list = [None] * len(chunks)

    def solve(k: int, tasks: list) -> list:
        def started() -> None:
            if k + 1 < len(chunks) and aheads[k + 1] is None:
                aheads[k + 1] = start_inverses(chunks[k + 1], threads, "own", background=True, graphs=graphs)

        return batched_gptq_solve(tasks, inverse_threads=threads, host_results=True, streams="own", ahead=aheads[k],
                                  inverses_started=started, rows_kernel=rows_kernel, inverse_graphs=graphs,
                                  loop_graphs=loop_graphs, inplace_update=_inplace_update)

    _solve_in_turn(chunks, device, wrap(solve) if wrap is not None else solve)


class _Ready:
    """An ``InversesAhead`` collected once, handed out as already done (for the loop-only timing)."""

    def __init__(self, ahead) -> None:
        self.units = ahead.units
        self._inverses = ahead.collect()

    def collect(self) -> list:
        return self._inverses


def inverses_only(chunks: list[list], threads: int, graphs: bool = False) -> None:
    from defuser_quant.integrations.gptqmodel.batched import start_inverses

    started = [start_inverses(tasks, threads, "own", background=True, graphs=graphs) for tasks in chunks]
    for ahead in started:
        ahead.collect()


def _median(fn: Callable[[], object], device: str, repeats: int) -> float:
    return statistics.median(_timed(fn, device) for _ in range(repeats))


def _medians_by_update(updates: tuple[bool, ...], repeats: int, timed: Callable[[], float]) -> dict[bool, float]:
    """The median of ``timed()`` (seconds) under each in-place update setting of ``updates``, the settings
    taking turns within each repeat and their order flipped every repeat, so a drift of the host's pace
    falls on each alike. The module's setting is put back afterwards."""
    global _inplace_update
    times: dict[bool, list[float]] = {update: [] for update in updates}
    kept = _inplace_update
    try:
        for repeat in range(repeats):
            for update in updates if repeat % 2 == 0 else updates[::-1]:
                _inplace_update = update
                times[update].append(timed())
    finally:
        _inplace_update = kept
    return {update: statistics.median(values) for update, values in times.items()}


def busy_share(prof, wall_us: float) -> float | None:
    """The share of ``wall_us`` in which at least one GPU kernel or copy ran (their intervals' union)."""
    spans = [(e.time_range.start, e.time_range.end) for e in prof.events()
             if getattr(e.device_type, "name", "") == "CUDA" and e.time_range.end > e.time_range.start]
    if not spans or wall_us <= 0:
        return None
    return round(sum(end - start for start, end in _union(spans)) / wall_us, 3)


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The non-empty ``spans`` merged where they overlap, in order."""
    merged: list[tuple[float, float]] = []
    for start, end in sorted(s for s in spans if s[1] > s[0]):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


def _covered(span: tuple[float, float], union: list[tuple[float, float]]) -> float:
    return sum(max(0.0, min(span[1], e) - max(span[0], s)) for s, e in union)


def overlap(solves: list[tuple[float, float]], inverses: list[tuple[float, float]]) -> dict:
    """How the chunks' solves and the inverses shared the clock (milliseconds): the solves' and the inverses'
    summed busy time, the span of both, and the share of the solves' time during which some inverse ran."""
    solve_union, inverse_union = _union(solves), _union(inverses)
    both = _union(solves + inverses)
    solve_ms = sum(e - s for s, e in solve_union)
    beside = sum(_covered(span, inverse_union) for span in solve_union)
    return {"span_ms": round(both[-1][1] - both[0][0], 3) if both else 0.0,
            "busy_ms": round(sum(e - s for s, e in both), 3),
            "solves_ms": round(solve_ms, 3), "inverses_ms": round(sum(e - s for s, e in inverse_union), 3),
            "inverses_beside_solves_share": round(beside / solve_ms, 3) if solve_ms else None}


class _Marks:
    """Points on the device's clock: CUDA events recorded on the current stream (none inside a graph
    recording), else the host's ``perf_counter`` (the CPU runs everything in order)."""

    def __init__(self, device: str) -> None:
        self.cuda = device.startswith("cuda")
        self.solves: list[tuple] = []
        self.inverses: list[tuple] = []
        self.first = self.mark()

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        if torch.cuda.is_current_stream_capturing():
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def around(self, fn: Callable, into: list[tuple]) -> Callable:
        """``fn`` with a mark before and after each call, the pair appended to ``into``."""
        def run(*args, **kwargs):
            start = self.mark()
            out = fn(*args, **kwargs)
            into.append((start, self.mark()))
            return out
        return run

    def ms(self, mark) -> float:
        return self.first.elapsed_time(mark) if self.cuda else (mark - self.first) * 1e3

    def spans(self, marks: list[tuple]) -> list[tuple[float, float]]:
        return [(round(self.ms(a), 3), round(self.ms(b), 3)) for a, b in marks if a is not None and b is not None]


@contextlib.contextmanager
def _marked_inverses(marks: _Marks) -> Iterator[None]:
    """Every inverse the solves start, eager or replayed, marked on its thread's stream."""
    from defuser_quant.integrations.gptqmodel import batched, inverse_graphs

    eager, graphed = batched._invert_unit, inverse_graphs.graphed
    batched._invert_unit = marks.around(eager, marks.inverses)
    inverse_graphs.graphed = lambda invert, key, copy: marks.around(graphed(invert, key, copy), marks.inverses)
    try:
        yield
    finally:
        batched._invert_unit, inverse_graphs.graphed = eager, graphed


def trace_pipeline(chunks: list[list], threads: int, rows_kernel: bool, device: str, graphs: bool = False,
                   loop_graphs: bool = False) -> dict:
    """One pipeline (:func:`run_pipeline`) with its solves and inverses marked: their intervals and :func:`overlap`."""
    marks = _Marks(device)
    with _marked_inverses(marks):
        run_pipeline(chunks, threads, rows_kernel, device, graphs, loop_graphs,
                     wrap=lambda solve: marks.around(solve, marks.solves))
    _sync(device)
    solves, inverses = marks.spans(marks.solves), marks.spans(marks.inverses)
    return {"solve_spans_ms": solves, "inverse_spans_ms": inverses, **overlap(solves, inverses)}


def kernel_table(prof, limit: int = 15) -> list[dict]:
    rows = [(e.key, e.self_device_time_total, e.count) for e in prof.key_averages() if e.self_device_time_total > 0]
    rows.sort(key=lambda r: -r[1])
    return [{"kernel": k[:120], "ms": round(t / 1e3, 2), "calls": c} for k, t, c in rows[:limit]]


def measure_shape(args: argparse.Namespace, rows: int, columns: int, modules: int, share: int, row: dict,
                  save: Callable[[], None]) -> dict:
    """One shape's cells for each ``--graphs`` setting, filled into ``row`` (``save()`` after each setting).
    The trace and the profile run right after the first setting's cells, on its graphs. A setting whose
    chunks came back with modules left to GPTQModel's own solve is kept in ``row['errors']``; the others
    still run."""
    from defuser_quant.integrations.gptqmodel import inverse_graphs, loop_graph

    chunks = [make_tasks(rows, columns, modules, args.tokens, args.device, seed=k, share=share)
              for k in range(args.chunks)]
    rows_kernel = not args.no_rows_kernel
    print(f"{rows}x{columns} x{modules} (share {share}), {args.chunks} chunks: warm-up", flush=True)
    row.update({"rows": rows, "columns": columns, "modules": modules, "share": share, "chunks": args.chunks,
                "rows_kernel": rows_kernel, "cells": []})
    for index, setting in enumerate(args.graphs):
        try:
            _measure_setting(args, setting, chunks, rows_kernel, row)
        except ChunkNotBatched as exc:  # kept in the row; the other settings still run
            print(f"  graphs {setting}: {exc}", flush=True)
            row.setdefault("errors", {})[setting] = str(exc)
        row.setdefault("graph_stats", {})[setting] = {"inverses": inverse_graphs.stats().as_dict(),
                                                      "loops": loop_graph.stats().as_dict()}
        if index == 0:
            _trace_and_profile(args, setting, chunks, rows_kernel, row)
        save()
    return row


def _trace_and_profile(args: argparse.Namespace, setting: str, chunks: list[list], rows_kernel: bool,
                       row: dict) -> None:
    threads = args.inverse_threads[0]
    if args.trace:
        try:
            trace = trace_pipeline(chunks, threads, rows_kernel, args.device, *GRAPHS[setting])
        except ChunkNotBatched as exc:
            row["trace"] = {"inverse_threads": threads, "graphs": setting, "error": str(exc)}
            print(f"  trace ({threads} threads, graphs {setting}): {exc}", flush=True)
        else:
            row["trace"] = {"inverse_threads": threads, "graphs": setting, **trace}
            print(f"  traced ({threads} threads, graphs {setting}): {trace['span_ms']:.1f} ms, solves "
                  f"{trace['solves_ms']:.1f}, inverses {trace['inverses_ms']:.1f}, inverses beside the solves "
                  f"{trace['inverses_beside_solves_share']}", flush=True)
    if args.profile and args.device.startswith("cuda"):
        try:
            row["profile"] = profile_pipeline(chunks, threads, rows_kernel, args.device, setting)
        except ChunkNotBatched as exc:
            row["profile"] = {"inverse_threads": threads, "graphs": setting, "error": str(exc)}
            print(f"  profile ({threads} threads, graphs {setting}): {exc}", flush=True)


def _measure_setting(args: argparse.Namespace, setting: str, chunks: list[list], rows_kernel: bool, row: dict) -> None:
    """One ``--graphs`` setting's cells (one per thread count) appended to ``row['cells']``, after a warm-up."""
    from defuser_quant.integrations.gptqmodel import inverse_graphs, loop_graph
    from defuser_quant.integrations.gptqmodel.batched import start_inverses

    n = args.chunks
    graphs, loops_graphed = GRAPHS[setting]
    inverse_graphs.release()
    loop_graph.release()
    run_pipeline(chunks[:2], max(args.inverse_threads), rows_kernel, args.device, graphs, loops_graphed)  # warm-up
    updates = (False, True) if args.compare_updates else (_inplace_update,)
    for threads in args.inverse_threads:
        def pipeline() -> float:
            return _timed(lambda: run_pipeline(chunks, threads, rows_kernel, args.device, graphs, loops_graphed),
                          args.device)

        def loops() -> float:  # the loop alone: the inverses are computed before its clock starts
            ready = [_Ready(start_inverses(tasks, threads, "own", background=True, graphs=graphs)) for tasks in chunks]
            return _timed(lambda: _loops(chunks, ready, threads, rows_kernel, args.device, loops_graphed), args.device)

        pipelines = _medians_by_update(updates, args.repeats, pipeline)
        cell = {"pipeline_s": pipelines[updates[0]],
                "inverses_only_s": _median(lambda: inverses_only(chunks, threads, graphs), args.device, args.repeats)}
        loop_times = _medians_by_update(updates, args.repeats, loops)
        cell["loop_only_s"] = loop_times[updates[0]]
        if args.compare_updates:
            cell.update(pipeline_inplace_s=pipelines[True], loop_only_inplace_s=loop_times[True])
        cell = {"graphs": setting, "inverse_threads": threads, **{k: round(v / n, 5) for k, v in cell.items()}}
        row["cells"].append(cell)
        print(f"  graphs {setting}, {threads} inverse thread(s): pipeline {cell['pipeline_s'] * 1e3:.1f} ms a chunk, "
              f"inverses alone {cell['inverses_only_s'] * 1e3:.1f}, column loops alone "
              f"{cell['loop_only_s'] * 1e3:.1f}", flush=True)
        if args.compare_updates:
            print(f"    in-place update: pipeline {cell['pipeline_inplace_s'] * 1e3:.1f} ms a chunk, column loops "
                  f"alone {cell['loop_only_inplace_s'] * 1e3:.1f}", flush=True)


def profile_pipeline(chunks: list[list], threads: int, rows_kernel: bool, device: str, setting: str) -> dict:
    """The GPU's kernel time by kernel over one pipeline, and the share of its wall time in which any kernel ran."""
    from torch.profiler import ProfilerActivity, profile

    graphs, loops_graphed = GRAPHS[setting]
    run_pipeline(chunks, threads, rows_kernel, device, graphs, loops_graphed)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        _sync(device)
        t = time.perf_counter()
        run_pipeline(chunks, threads, rows_kernel, device, graphs, loops_graphed)
        _sync(device)
        wall = time.perf_counter() - t
    out = {"inverse_threads": threads, "graphs": setting, "wall_s": round(wall, 4),
           "gpu_busy_share": busy_share(prof, wall * 1e6), "kernels": kernel_table(prof)}
    print(f"  profiled ({threads} threads, graphs {setting}): {wall * 1e3:.1f} ms, GPU busy {out['gpu_busy_share']}",
          flush=True)
    for k in out["kernels"]:
        print(f"    {k['ms']:9.2f} ms {k['calls']:6d}  {k['kernel'][:90]}", flush=True)
    return out


def _loops(chunks: list[list], ready: list, threads: int, rows_kernel: bool, device: str,
           loop_graphs: bool = False) -> None:
    """The chunks' column loops alone: each chunk's inverses handed over already computed (``ready``)."""
    from defuser_quant.integrations.gptqmodel.batched import batched_gptq_solve

    _solve_in_turn(chunks, device, lambda k, tasks: batched_gptq_solve(
        tasks, inverse_threads=threads, host_results=True, streams="own", ahead=ready[k], rows_kernel=rows_kernel,
        loop_graphs=loop_graphs, inplace_update=_inplace_update))


def main(argv: list[str] | None = None) -> int:
    global _solve_priority, _inplace_update
    args = parse_args(argv)
    _solve_priority = SOLVE_PRIORITIES[args.solve_priority]
    _inplace_update = args.inplace_update
    rows: list[dict] = []
    out = {
        "meta": {"command": shlex.join([sys.executable, *sys.argv]), "python": platform.python_version(),
                 "torch": torch.__version__,
                 "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
                 "solve_priority": args.solve_priority, "inplace_update": args.inplace_update,
                 "compare_updates": args.compare_updates},
        "rows": rows,
        "complete": False,
    }

    def save() -> None:
        if args.output is not None:
            write_json(args.output, out)

    for (r, c, m), share in zip(args.shapes, args.share):
        rows.append({})
        measure_shape(args, r, c, m, share, rows[-1], save)
    out["complete"] = True
    save()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
