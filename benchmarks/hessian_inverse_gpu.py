"""GPTQ's Hessian inverse for a layer's experts: one at a time, on several streams or threads, batched.

``integrations.gptqmodel.batched.batched_gptq_solve`` inverts each shared Hessian with GPTQModel's
own single-matrix calls (damp, ``cholesky_ex``, ``cholesky_inverse``, upper ``cholesky_ex``), so its
results are GPTQModel's bit for bit. This times that chain for the Hessians of ``--layers`` layers
of Qwen3-30B-A3B shape (per expert: one 2048 x 2048 Hessian shared by gate/up, one 768 x 768 for
down), and the same chain

* ``serial``: one matrix after another on one stream (what the solve does);
* ``streams-N``: matrices dealt round-robin over N CUDA streams from one host thread;
* ``threads-N``: matrices dealt round-robin over N host threads, each on its own stream (as
  GPTQModel's device workers solve their modules);
* ``batched``: each size's matrices stacked, one batched call per step (other cuSOLVER/MAGMA
  kernels: the JSON says whether the factors are bit-equal to ``serial``'s, and how far apart).

Hessians are ``x^T x`` of ``--rows`` random rows (fewer rows than columns, as for most experts, so
the damping makes them definite). Each variant runs ``--repeats`` times after one warm-up; the
JSON keeps the median wall seconds (host, synchronized at the end) per variant and compares every
run's matrices with serial's first run (so serial's own row says whether it repeats itself bit for
bit). The single-matrix chain is ``batched.gptq_first_inverse`` itself, so it runs with the package
installed or from a source checkout on ``PYTHONPATH``.

    python benchmarks/hessian_inverse_gpu.py --output $OUT/hessian_inverse_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _args import counts, whole  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=whole(1), default=128)
    p.add_argument("--hidden", type=whole(1), default=2048)
    p.add_argument("--intermediate", type=whole(1), default=768)
    p.add_argument("--layers", type=whole(1), default=2)
    p.add_argument("--rows", type=whole(1), default=512, help="calibration rows per Hessian")
    p.add_argument("--damp", type=float, default=0.05, help="damp_percent")
    p.add_argument("--streams", type=counts(1), default="2,4,8", help="comma-separated stream counts (each >= 1)")
    p.add_argument("--threads", type=counts(1), default="4", help="comma-separated host thread counts (each >= 1)")
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True, warn_only=True) and CUBLAS_WORKSPACE_CONFIG=:4096:8")
    p.add_argument("--repeats", type=whole(1), default=3)
    p.add_argument("--device", default="cuda")
    p.add_argument("--output", type=Path, default=None)
    return p.parse_args(argv)


def hessians(args: argparse.Namespace) -> list[torch.Tensor]:
    g = torch.Generator(device=args.device).manual_seed(0)
    out = []
    for _ in range(args.layers * args.experts):
        for columns in (args.hidden, args.intermediate):
            x = torch.randn(args.rows, columns, device=args.device, generator=g)
            out.append(x.T @ x / args.rows)
    return out


def invert(H: torch.Tensor, damp: float) -> torch.Tensor:
    """GPTQModel's first attempt on a copy of ``H``, the code ``batched_gptq_solve`` runs."""
    from defuser_quant.integrations.gptqmodel.batched import gptq_first_inverse

    return gptq_first_inverse(H.clone(), damp)[0]


def invert_stacked(H: torch.Tensor, damp: float) -> torch.Tensor:
    """The same steps as batched ``torch.linalg`` calls on a stack of Hessians ([n, C, C])."""
    H = H.clone()
    diag = H.diagonal(dim1=-2, dim2=-1)
    diag.add_(damp * torch.mean(diag.clone(), dim=-1, keepdim=True))
    factor, _ = torch.linalg.cholesky_ex(H, check_errors=False)
    torch.cholesky_inverse(factor, out=factor)
    hinv, _ = torch.linalg.cholesky_ex(factor, upper=True, check_errors=False)
    return hinv


def serial(hs: list[torch.Tensor], damp: float) -> list[torch.Tensor]:
    return [invert(h, damp) for h in hs]


def on_streams(hs: list[torch.Tensor], damp: float, n: int) -> list[torch.Tensor]:
    main = torch.cuda.current_stream()
    streams = [torch.cuda.Stream() for _ in range(n)]
    for s in streams:
        s.wait_stream(main)
    out: list[torch.Tensor] = []
    for i, h in enumerate(hs):
        with torch.cuda.stream(streams[i % n]):
            out.append(invert(h, damp))
    for s in streams:
        main.wait_stream(s)
    for i, t in enumerate(out):
        t.record_stream(streams[i % n])
    return out


def on_threads(hs: list[torch.Tensor], damp: float, n: int) -> list[torch.Tensor]:
    out: list[torch.Tensor | None] = [None] * len(hs)
    main = torch.cuda.current_stream()

    def work(t: int) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(main)
        with torch.cuda.stream(stream):
            for i in range(t, len(hs), n):
                out[i] = invert(hs[i], damp)
        stream.synchronize()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if any(o is None for o in out):
        raise RuntimeError("a solver thread failed")
    return out  # type: ignore[return-value]


def batched(hs: list[torch.Tensor], damp: float) -> list[torch.Tensor]:
    by_size: dict[int, list[int]] = {}
    for i, h in enumerate(hs):
        by_size.setdefault(h.shape[0], []).append(i)
    out: list[torch.Tensor | None] = [None] * len(hs)
    for idx in by_size.values():
        inv = invert_stacked(torch.stack([hs[i] for i in idx]), damp)
        for j, i in enumerate(idx):
            out[i] = inv[j]
    return out  # type: ignore[return-value]


def timed(fn, repeats: int) -> tuple[float, list[list[torch.Tensor]]]:
    """Median wall seconds of ``repeats`` runs (after a warm-up) and every run's results."""
    fn()  # warm-up: cuSOLVER/MAGMA handles and workspaces
    torch.cuda.synchronize()
    times, results = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        results.append(fn())
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), results


def compare(ref: list[torch.Tensor], runs: list[list[torch.Tensor]]) -> dict:
    """Against ``ref`` (serial's first run): matrices bit-equal in the worst run, the largest
    relative difference, and how many runs were bit-equal throughout."""
    equal = [sum(torch.equal(a, b) for a, b in zip(ref, got, strict=True)) for got in runs]
    rel = max(float((a - b).abs().max() / a.abs().max()) for got in runs for a, b in zip(ref, got, strict=True))
    whole = sum(e == len(ref) for e in equal)
    return {"bit_equal": f"{min(equal)}/{len(ref)}", "max_rel_diff": rel, "runs_bit_equal": f"{whole}/{len(runs)}"}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(HERE))
    from _source import use_source_checkout

    use_source_checkout()
    if args.deterministic:  # before CUDA starts: cuBLAS reads the variable once
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    if not torch.cuda.is_available():
        raise SystemExit("hessian_inverse_gpu.py needs CUDA")
    hs = hessians(args)
    rows = []
    seconds, runs = timed(lambda: serial(hs, args.damp), args.repeats)
    ref = runs[0]
    rows.append({"variant": "serial", "seconds": seconds, "vs_serial": 1.0, **compare(ref, runs)})
    for n in args.streams:
        s, got = timed(lambda n=n: on_streams(hs, args.damp, n), args.repeats)
        rows.append({"variant": f"streams-{n}", "seconds": s, "vs_serial": seconds / s, **compare(ref, got)})
    for n in args.threads:
        s, got = timed(lambda n=n: on_threads(hs, args.damp, n), args.repeats)
        rows.append({"variant": f"threads-{n}", "seconds": s, "vs_serial": seconds / s, **compare(ref, got)})
    s, got = timed(lambda: batched(hs, args.damp), args.repeats)
    rows.append({"variant": "batched", "seconds": s, "vs_serial": seconds / s, **compare(ref, got)})
    result = {
        "command": "python " + " ".join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])]),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "matrices": {"count": len(hs), "sizes": sorted({h.shape[0] for h in hs})},
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "platform": platform.platform(),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
        "rows": rows,
    }
    print("| variant | seconds | vs serial | bit-equal to serial's first run (worst run) | runs all bit-equal | max rel diff |\n"
          "|---|---:|---:|---|---|---:|")
    for r in rows:
        print(f"| {r['variant']} | {r['seconds']:.3f} | {r['vs_serial']:.2f}x | {r['bit_equal']} | {r['runs_bit_equal']} "
              f"| {r['max_rel_diff']:.1e} |")
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
