"""Where GPTQModel's ``quantize()`` spends its time outside the arithmetic: a profile at the
module count of two Qwen3-30B-A3B layers (2 x 128 experts, top-8: 776 quantized modules) with
tiny matrices (hidden 128, moe_intermediate 64 by default), so the per-module Python machinery
dominates and a CPU run takes well under a minute of quantize time.

Every thread is profiled (GPTQModel solves and packs on worker threads): ``cProfile`` per thread,
merged. Writes ``OUT/profile.txt`` (top functions by own and cumulative time, over all threads) and
``OUT/overhead.json`` (quantize seconds and the plugin's stage clock, ``record_gptq_kernels(stages=True)``,
host stages included: GPTQModel's per-module materialize, disk offload and log rows). On the CPU
the stage clock synchronises nothing.

    python benchmarks/gptqmodel_overhead.py --out /tmp/prof                      # ours grouped + batched
    python benchmarks/gptqmodel_overhead.py --out /tmp/prof --variant stock      # GPTQModel + Defuser

Comparing lean-bookkeeping parts in one session (``--lean-parts``: the parts of
``overhead.lean_bookkeeping`` to use; ``--result`` writes the report with its command line,
``--before``/``--also`` embed earlier reports of the same session):

    python benchmarks/gptqmodel_overhead.py --out /tmp/b1 --no-profile --lean-parts materialize,offload,progress
    python benchmarks/gptqmodel_overhead.py --out /tmp/a1 --no-profile \
        --before /tmp/b1/overhead.json --result benchmarks/results/NAME.json
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import shlex
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from _args import check_shape, whole
    from gptqmodel_gpu import MIN_ROW_TOKENS  # build_source skips calibration rows shorter than this

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--variant", default="ours-grouped-batched", choices=["stock", "ours-grouped", "ours-grouped-batched"])
    p.add_argument("--layers", type=whole(1), default=2)
    p.add_argument("--experts", type=whole(1), default=128)
    p.add_argument("--hidden", type=whole(1), default=128)
    p.add_argument("--intermediate", type=whole(1), default=64)
    p.add_argument("--top-k", type=whole(1), default=8)
    p.add_argument("--samples", type=whole(1), default=32)
    p.add_argument("--seq-len", type=whole(MIN_ROW_TOKENS), default=64,
                   help=f"tokens per calibration row (at most; rows under {MIN_ROW_TOKENS} tokens are skipped)")
    p.add_argument("--batch-size", type=whole(1), default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no-profile", action="store_true", help="time only (no cProfile)")
    p.add_argument("--top", type=whole(1), default=60)
    p.add_argument("--hook-hessians", action="store_true",
                   help="ours with batched_hessians=False (GPTQModel's Hessian hook per expert and call)")
    p.add_argument("--stock-bookkeeping", action="store_true",
                   help="ours without lean_bookkeeping (GPTQModel's own per-module materialize/offload scans)")
    p.add_argument("--lean-parts", default=None,
                   help="comma-separated lean_bookkeeping parts to use (default: all; see overhead.PARTS)")
    p.add_argument("--result", type=Path, default=None, help="also write the report, with its command line, here")
    p.add_argument("--before", type=Path, nargs="+", default=[],
                   help="reports (overhead.json) of earlier runs of this session to embed as before_same_session")
    p.add_argument("--also", type=Path, nargs="+", default=[],
                   help="reports of repeats of this same configuration to embed as repeats_same_session")
    p.add_argument("--note", default=None, help="free text stored in the report")
    args = p.parse_args(argv)
    check_shape(p, args)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "benchmarks/gptqmodel_overhead.py", *(argv if argv is not None else sys.argv[1:])])
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    args.out.mkdir(parents=True, exist_ok=True)

    from _source import use_source_checkout
    from gptqmodel_gpu import build_source

    use_source_checkout()
    work = Path(tempfile.mkdtemp(prefix="gptqmodel_overhead_"))
    shape = argparse.Namespace(vocab=1024, hidden=args.hidden, intermediate=args.intermediate, layers=args.layers,
                               heads=4, kv_heads=2, head_dim=32, experts=args.experts, top_k=args.top_k,
                               samples=args.samples, seq_len=args.seq_len, device=args.device)
    calibration = build_source(shape, work / "src")

    # cProfile in every thread started from here on (GPTQModel's device and CPU pools)
    profiles: list[cProfile.Profile] = []
    lock = threading.Lock()
    run = threading.Thread.run

    def profiled_run(self):
        prof = cProfile.Profile()
        with lock:
            profiles.append(prof)
        prof.enable()
        try:
            return run(self)
        finally:
            prof.disable()

    if not args.no_profile:
        threading.Thread.run = profiled_run

    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    from defuser_quant.integrations.gptqmodel.kernels import record_gptq_kernels

    if args.variant != "stock":
        from defuser_quant.integrations.gptqmodel import install, quantize_with_defuser

        install()
        if args.lean_parts is not None:
            _use_lean_parts(frozenset(part for part in args.lean_parts.split(",") if part))
    model = GPTQModel.load(str(work / "src"), QuantizeConfig(bits=4, group_size=128), device=args.device)
    main_prof = cProfile.Profile()
    profiles.append(main_prof)
    t0 = time.perf_counter()
    if not args.no_profile:
        main_prof.enable()
    with record_gptq_kernels(stages=True, model=model.model) as kernels:
        if args.variant == "stock":
            model.quantize(calibration, batch_size=args.batch_size, backend=BACKEND.AUTO)
            solve = bookkeeping = hessians = None
        else:
            result = quantize_with_defuser(model, calibration, batch_size=args.batch_size, backend=BACKEND.AUTO,
                                           grouped=True, batched_solve=args.variant.endswith("-batched"),
                                           lean_bookkeeping=not args.stock_bookkeeping,
                                           batched_hessians=not args.hook_hessians)
            solve = result.solve.as_dict() if result.solve is not None else None
            hessians = result.hessians.as_dict() if result.hessians is not None else None
            bookkeeping = result.bookkeeping.as_dict() if result.bookkeeping is not None else None
    main_prof.disable()
    quantize_s = time.perf_counter() - t0
    threading.Thread.run = run

    report = {"command": command, "variant": args.variant,
              "lean_bookkeeping": args.variant != "stock" and not args.stock_bookkeeping,
              "lean_parts": sorted(args.lean_parts.split(",")) if args.lean_parts is not None else "all",
              "quantize_s": round(quantize_s, 2), "solve": solve, "bookkeeping": bookkeeping, "hessians": hessians,
              "gptq_solves": kernels.as_dict()["gptq_solves"],
              **{k: kernels.as_dict()[k] for k in ("stage_wall_seconds", "stage_seconds", "busy_wall_seconds", "stage_calls")}, "shape": vars(shape), "threads_profiled": len(profiles)}
    if not args.no_profile:
        stats = None
        for prof in profiles:
            try:
                stats = pstats.Stats(prof) if stats is None else stats.add(prof)
            except TypeError:  # a thread that never ran Python under the profiler
                continue
        text = io.StringIO()
        stats.stream = text
        for order in ("tottime", "cumulative"):
            stats.sort_stats(order).print_stats(args.top)
        (args.out / "profile.txt").write_text(text.getvalue())
        stats.dump_stats(str(args.out / "profile.pstats"))
    (args.out / "overhead.json").write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))
    if args.result is not None:
        report["modules"] = report["stage_calls"].get("finalize", 0)
        if args.note:
            report["note"] = args.note
        if args.before:
            report["before_same_session"] = [_summary(path) for path in args.before]
        if args.also:
            report["repeats_same_session"] = [_summary(path) for path in args.also]
        args.result.parent.mkdir(parents=True, exist_ok=True)
        args.result.write_text(json.dumps(report, indent=1) + "\n")
    return 0


def _use_lean_parts(parts: frozenset[str]) -> None:
    """quantize_with_defuser's lean bookkeeping restricted to ``parts`` (for before/after runs)."""
    import functools

    from defuser_quant.integrations.gptqmodel import calibration, overhead

    unknown = parts - overhead.PARTS
    if unknown:
        raise SystemExit(f"--lean-parts: unknown {sorted(unknown)}; known: {sorted(overhead.PARTS)}")
    calibration._lean_bookkeeping = functools.partial(overhead.lean_bookkeeping, parts=parts)


def _summary(path: Path) -> dict:
    """The timing part of an earlier report (its command, quantize seconds, stages, bookkeeping, Hessian batching)."""
    run = json.loads(path.read_text())
    keys = ("command", "lean_parts", "quantize_s", "stage_wall_seconds", "busy_wall_seconds", "stage_calls", "bookkeeping", "hessians")
    return {k: run[k] for k in keys if k in run}


if __name__ == "__main__":
    sys.exit(main())
