"""Does the batched GPTQ solve give GPTQModel's per-module bytes at Qwen3-30B-A3B shapes, with and without
deterministic kernels?

``gptqmodel_gpu.py --deterministic`` (round 23) found ours' checkpoint equal to stock's in 13 of 776
qweights, although without ``--deterministic`` every run since round 14 gave stock's checkpoint
(776/776): in layer 0 q_proj was equal and k_proj/v_proj were not, their Hessians bit-equal. This
script isolates the solve. It builds GPTQModel ``GPTQ`` tasks of one layer's shapes from random bf16
weights and random calibration rows, solves one copy as GPTQModel does (``GPTQ.quantize`` per module,
sharing one inverse factor per shared-input cohort through its ``SharedHessianFactorCache``) and one
copy as the plugin does (``batched_gptq_solve`` on the modules of equal shape; the rest per module),
and compares qweights (``Q``), scales, zeros, ``g_idx`` and losses module by module:

* ``attention``: q_proj (4096 x 2048), k_proj and v_proj (512 x 2048) adopting q's Hessian (GPTQModel's
  shared-input dedup); q is alone in its shape, so the plugin solves it per module and k/v batched;
* ``experts``: ``--experts`` experts of gate/up (768 x 2048, one shared Hessian each) and down
  (2048 x 768), as a layer's expert subsets arrive.

``--deterministic`` sets ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` before CUDA starts and runs both solves
under ``torch.use_deterministic_algorithms(True, warn_only=True)`` (``calibration.grouped.deterministic_mode``),
as ``gptqmodel_gpu.py --deterministic`` does. ``--on-worker-threads`` runs each side's solves on a fresh
thread of its own, as GPTQModel runs them on its device workers, instead of on the main thread:
round 24 found CUDA inverses computed on the main thread byte-different from the same inverses
computed on the plugin's inverse threads (``inverse_streams.py``).

    python benchmarks/batched_solve_exactness.py --output $OUT/batched_solve_exactness_cuda.json
    python benchmarks/batched_solve_exactness.py --deterministic --output $OUT/batched_solve_exactness_cuda_det.json
    python benchmarks/batched_solve_exactness.py --deterministic --inverse-threads 4 --host-results   # the plugin's settings
    python benchmarks/batched_solve_exactness.py --inverse-threads 4 --host-results --on-worker-threads
    python benchmarks/batched_solve_exactness.py --device cpu --tiny     # a smoke run (tests)
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import shlex
import sys
import threading
from collections import Counter
from pathlib import Path
from typing import Any

from _threads import on_fresh_thread

HERE = Path(__file__).resolve().parent
SHAPES = {"hidden": 2048, "q_rows": 4096, "kv_rows": 512, "intermediate": 768, "experts": 16, "tokens": 512}
TINY = {"hidden": 256, "q_rows": 512, "kv_rows": 128, "intermediate": 128, "experts": 4, "tokens": 192}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from _source import use_source_checkout

    use_source_checkout()
    from defuser_quant.integrations.gptqmodel.batched import STREAMS

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--deterministic", action="store_true", help="deterministic kernels and cuBLAS workspace config")
    p.add_argument("--tiny", action="store_true", help="small shapes for a CPU smoke run: " + str(TINY))
    p.add_argument("--experts", type=int, default=None, help=f"experts (default {SHAPES['experts']})")
    p.add_argument("--inverse-threads", type=int, default=1,
                   help="the batched solve's Hessian-inverse threads, each on its own CUDA stream (the plugin's default: 4)")
    p.add_argument("--host-results", action="store_true",
                   help="the batched solve hands scales, zeros and g_idx back on the CPU (the plugin's default)")
    p.add_argument("--streams", default="auto", choices=STREAMS,
                   help="the batched solve's inverse streams (BatchedSolve.streams): each inverse thread's own, the "
                        "caller's, or auto (the caller's under --deterministic; the plugin's default)")
    p.add_argument("--inplace-update", action="store_true",
                   help="the batched solve's update after each column block as one in-place addmm per module "
                        "(BatchedSolve.inplace_update; opt-in)")
    p.add_argument("--rows-kernel", action="store_true",
                   help="the batched solve's column blocks as one launch of the plugin's rows kernel where "
                        "GPTQModel's block-update extension applies (BatchedSolve.rows_kernel, the plugin's default)")
    p.add_argument("--on-worker-threads", action="store_true",
                   help="each side's solves on a fresh thread of its own (as GPTQModel's device workers run them), "
                        "not on the main thread")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="JSON path (default: $OUT or benchmarks/results)")
    args = p.parse_args(argv)
    shape = dict(TINY if args.tiny else SHAPES)
    if args.experts is not None:
        if args.experts < 2:
            p.error("--experts must be >= 2 (the batched solve needs equal-shape siblings)")
        shape["experts"] = args.experts
    if args.inverse_threads < 1:
        p.error("--inverse-threads must be >= 1")
    args.shape = shape
    return args


def _task(rows: int, cols: int, x: Any, qcfg: Any, g: Any, device: str) -> Any:
    import torch
    from gptqmodel.quantization.gptq import GPTQ
    from torch import nn

    linear = nn.Linear(cols, rows, bias=False).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(rows, cols, generator=g) * 0.02)
    linear = linear.to(device)
    linear.target_device = torch.device(device)
    task = GPTQ(linear, copy.deepcopy(qcfg))
    task.quantizer.configure(perchannel=True)
    task.add_batch(x.to(device), None)
    return task


def build(shape: dict, device: str, seed: int) -> dict[str, list[tuple[str, Any]]]:
    """The tasks of one layer's subsets, Hessians final, cohorts sharing GPTQModel's factor cache."""
    import torch
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.gptq import SharedHessianFactorCache

    qcfg = QuantizeConfig(bits=4, group_size=128)
    g = torch.Generator().manual_seed(seed)
    hidden, inter, tokens = shape["hidden"], shape["intermediate"], shape["tokens"]
    x_attn = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
    attention = [(n, _task(r, hidden, x_attn, qcfg, g, device)) for n, r in
                 (("q_proj", shape["q_rows"]), ("k_proj", shape["kv_rows"]), ("v_proj", shape["kv_rows"]))]
    experts: list[tuple[str, Any]] = []
    for e in range(shape["experts"]):
        x_in = torch.randn(tokens, hidden, generator=g).to(torch.bfloat16)
        x_mid = torch.randn(tokens, inter, generator=g).to(torch.bfloat16)
        experts += [(f"experts.{e}.gate_proj", _task(inter, hidden, x_in, qcfg, g, device)),
                    (f"experts.{e}.up_proj", _task(inter, hidden, x_in, qcfg, g, device)),
                    (f"experts.{e}.down_proj", _task(hidden, inter, x_mid, qcfg, g, device))]
    cohorts = [[t for _, t in attention]] + [[experts[3 * e][1], experts[3 * e + 1][1]] for e in range(shape["experts"])]
    for n, cohort in enumerate(cohorts):
        for task in cohort:
            task.finalize_hessian(target_device=torch.device(device))
        cache = SharedHessianFactorCache(1, f"cohort{n}")
        for follower in cohort[1:]:
            follower.adopt_hessian_from(cohort[0])
        for task in cohort:
            task.attach_shared_hessian_cache(cache)
    for _, task in experts[2::3]:
        task.finalize_hessian(target_device=torch.device(device))
    return {"attention": attention, "experts": experts}


def solve_per_module(tasks: list[tuple[str, Any]]) -> dict[str, tuple]:
    return {name: tuple(task.quantize()) for name, task in tasks}


def solve_as_plugin(tasks: list[tuple[str, Any]], inverse_threads: int = 1, host_results: bool = False,
                    streams: str = "auto", inplace_update: bool = False,
                    rows_kernel: bool = False) -> tuple[dict[str, tuple], dict[str, str]]:
    """Grouped as the plugin's coordinator groups a subset (its settings key, its smallest batch):
    each group batched, the rest per module."""
    from defuser_quant.integrations.gptqmodel.batched import BatchedSolve, _settings_key, batched_gptq_solve

    groups: dict[tuple, list[tuple[str, Any]]] = {}
    for name, task in tasks:
        groups.setdefault(_settings_key(task), []).append((name, task))
    out, path = {}, {}
    for group in groups.values():
        if len(group) < BatchedSolve().min_modules:
            for name, task in group:
                out[name], path[name] = tuple(task.quantize()), "per module"
            continue
        solved = batched_gptq_solve([t for _, t in group], inverse_threads=inverse_threads, host_results=host_results,
                                    streams=streams, inplace_update=inplace_update, rows_kernel=rows_kernel)
        for (name, _), result in zip(group, solved, strict=True):
            if result is None:
                raise RuntimeError(f"{name}: the batched solve handed it back (first Cholesky failed)")
            out[name], path[name] = tuple(result.values), result.path
    return out, path


def compare(expected: dict[str, tuple], got: dict[str, tuple], path: dict[str, str]) -> dict[str, Any]:
    import torch

    rows = []
    for name, e in expected.items():
        r = got[name]
        same = {k: bool(torch.equal(want.cpu(), have.cpu())) for k, want, have in
                zip(("q", "scale", "zero", "g_idx"), e[:4], r[:4], strict=True)}
        same["loss"] = r[5] == e[5]
        want_scale, have_scale = e[1].float().cpu(), r[1].float().cpu()
        diff = float(((have_scale - want_scale).abs() / want_scale.abs()).max())
        rows.append({"module": name, "path": path[name], **same, "max_rel_scale_diff": diff, "equal": all(same.values())})
    unequal = [row for row in rows if not row["equal"]]
    return {"modules": len(rows), "paths": dict(Counter(path.values())), "qweights_equal": sum(row["q"] for row in rows),
            "all_equal": not unequal, "max_rel_scale_diff": max((row["max_rel_scale_diff"] for row in rows), default=0.0),
            "unequal": unequal}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("batched_solve_exactness: --device cuda but CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    from _report import write_json
    from defuser_quant.calibration.grouped import deterministic_mode

    results: dict[str, Any] = {}
    with deterministic_mode(args.deterministic):
        reference = build(args.shape, args.device, args.seed)  # the same tasks twice: one copy per solve
        plugin = build(args.shape, args.device, args.seed)
        ran_on: dict[str, set[str]] = {"reference": set(), "plugin": set()}

        def run(side: str, fn: Any, *a: Any) -> Any:
            def call() -> Any:
                ran_on[side].add("main" if threading.current_thread() is threading.main_thread() else "worker")
                return fn(*a)
            return on_fresh_thread(call, name="exactness-worker") if args.on_worker_threads else call()

        solved = {subset: (run("reference", solve_per_module, reference[subset]),
                           *run("plugin", solve_as_plugin, plugin[subset], args.inverse_threads, args.host_results,
                               args.streams, args.inplace_update, args.rows_kernel))
                  for subset in ("attention", "experts")}
        from defuser_quant.integrations.gptqmodel.batched import solve_streams

        streams_ran = solve_streams(args.streams)  # what "auto" decided, under the same settings
    for subset, (expected, got, path) in solved.items():
        results[subset] = compare(expected, got, path)
        print(f"{subset}: {results[subset]['qweights_equal']}/{results[subset]['modules']} qweights equal, "
              f"all equal: {results[subset]['all_equal']}, largest relative scale difference "
              f"{results[subset]['max_rel_scale_diff']:.3g}")
    import gptqmodel

    data = {
        "command": "python benchmarks/batched_solve_exactness.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "device": args.device, "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else platform.processor(),
        "deterministic": args.deterministic, "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "inverse_threads": args.inverse_threads, "host_results": args.host_results,
        "streams": args.streams, "streams_ran": streams_ran,
        "inplace_update": args.inplace_update, "rows_kernel": args.rows_kernel,
        "on_worker_threads": args.on_worker_threads, "solves_ran_on": {k: sorted(v) for k, v in ran_on.items()},
        "versions": {"torch": torch.__version__, "gptqmodel": gptqmodel.__version__,
                     "block_update_extension": _extension_available()},
        "shape": args.shape, "quantization": "GPTQ W4A16, group 128 (GPTQModel's defaults otherwise)",
        "results": results,
    }
    name = f"batched_solve_exactness_{args.device}{'_det' if args.deterministic else ''}{'_tiny' if args.tiny else ''}.json"
    out = args.output or (Path(os.environ["OUT"]) / name if os.environ.get("OUT") else HERE / "results" / name)
    write_json(out, data)
    print(f"wrote {out}")
    return 0 if all(r["all_equal"] for r in results.values()) else 1


def _extension_available() -> bool:
    from gptqmodel.quantization import gptq_cuda

    return bool(gptq_cuda.block_update_available())


if __name__ == "__main__":
    raise SystemExit(main())
