"""One GPTQModel quantize run of a saved model in a fresh process (for tests that need their own
``CUDA_VISIBLE_DEVICES``): ``python tests/gptqmodel_run.py SRC CALIBRATION.json OUT_DIR [options]``.

Writes ``OUT_DIR/checkpoint`` (``model.save``) and ``OUT_DIR/result.json``: projection records,
coverage totals, the batched-solve and batched-Hessian stats, the GPTQ solve paths, how many experts forwards ran
on per-GPU replicas, the peak memory of every visible GPU and the quantize time.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "benchmarks"))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("src")
    p.add_argument("calibration")
    p.add_argument("out")
    p.add_argument("--routing", default="routed")
    p.add_argument("--grouped", action="store_true")
    p.add_argument("--batched", action="store_true")
    p.add_argument("--inverse-threads", type=int, default=None, help="with --batched: BatchedSolve(inverse_threads=N)")
    p.add_argument("--host-results", action=argparse.BooleanOptionalAction, default=None,
                   help="with --batched: BatchedSolve(host_results=...)")
    p.add_argument("--chunk-bytes", type=int, default=None, help="with --batched: BatchedSolve(chunk_bytes=N)")
    p.add_argument("--solve-ahead", type=int, default=None, help="with --batched: BatchedSolve(solve_ahead=N)")
    p.add_argument("--pack", action="store_true", help="with --batched: BatchedSolve(pack=True)")
    p.add_argument("--streams", default=None, help="with --batched: BatchedSolve(streams=...)")
    p.add_argument("--hook-hessians", action="store_true", help="with --grouped: batched_hessians=False")
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--deterministic", action="store_true", help="deterministic CUDA kernels (quantize_with_defuser)")
    args = p.parse_args()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import torch
    from _source import use_source_checkout

    use_source_checkout()
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig

    from defuser_quant.integrations.gptqmodel import install, quantize_with_defuser
    from defuser_quant.integrations.gptqmodel.kernels import record_gptq_kernels

    install()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    calibration = json.loads(Path(args.calibration).read_text())
    devices = torch.cuda.device_count() if args.device == "cuda" else 0
    if devices:
        torch.cuda.init()  # the allocator's stats raise "Invalid device argument" before CUDA is initialised
    for index in range(devices):
        torch.cuda.reset_peak_memory_stats(index)
    placement = {"device": "cpu"} if args.device == "cpu" else {}
    solve = args.batched
    given = {"inverse_threads": args.inverse_threads, "host_results": args.host_results, "chunk_bytes": args.chunk_bytes,
             "solve_ahead": args.solve_ahead, "pack": args.pack or None, "streams": args.streams}
    if args.batched and any(value is not None for value in given.values()):
        from defuser_quant.integrations.gptqmodel.batched import BatchedSolve

        solve = BatchedSolve(**{name: value for name, value in given.items() if value is not None})
    model = GPTQModel.load(args.src, QuantizeConfig(bits=4, group_size=128), **placement)
    t0 = time.perf_counter()
    with record_gptq_kernels() as kernels:
        # Triton packing kernels on CUDA, as benchmarks/gptqmodel_gpu.py (AUTO may pick Machete on Hopper,
        # which downloads CUTLASS and JIT-builds).
        backend = BACKEND("gptq_triton") if args.device == "cuda" else BACKEND.AUTO
        result = quantize_with_defuser(model, calibration, routing=args.routing, batch_size=args.batch_size,
                                       grouped=args.grouped, batched_solve=solve, backend=backend,
                                       deterministic=args.deterministic, batched_hessians=not args.hook_hessians)
    seconds = time.perf_counter() - t0
    model.save(str(out / "checkpoint"))
    (out / "result.json").write_text(json.dumps({
        "projections": [asdict(r) for r in result.projections],
        "coverage_totals": result.coverage.totals.model_dump(),
        "solve": result.solve.as_dict() if result.solve is not None else None,
        "hessians": result.hessians.as_dict() if result.hessians is not None else None,
        "solves": kernels.as_dict()["gptq_solves"],
        "fallback": kernels.fallback_reason(),
        "replica_forwards": result.replica_forwards,
        "peak_gpu_bytes_per_device": [torch.cuda.max_memory_allocated(i) for i in range(devices)],
        "gpus_visible": devices,
        "quantize_s": seconds,
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
