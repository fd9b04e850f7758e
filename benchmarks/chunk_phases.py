"""Where one chunk of the batched GPTQ solve spends its time, alone and next to busy Python threads.

Inside a GPTQModel run (``gptqmodel_gpu.py``) a chunk of ~26 expert projections takes about 100 ms
(round 16), and the chunks, solved one after another, set the pace of the quantize stage. This
builds one chunk's worth of real GPTQModel ``GPTQ`` tasks at Qwen3-30B-A3B shape (bf16 Linears,
Hessians from ``--tokens`` random rows, ``QuantizeConfig(bits=4, group_size=128)`` as the benchmark
quantizes) and times :func:`integrations.gptqmodel.batched.batched_gptq_solve` on it:

* ``alone``: the solve's wall time, synchronized before and after (median of ``--repeats``);
* ``phases``: the same solve with a device synchronize around each phase (the Hessians'
  finalization, the shared-Hessian check, the quantizer parameters, the inverses, the
  block-update extension calls, the lazy block updates' matmuls, the move of the results to the
  host; the rest is the loop's own work and the result assembly), each phase's seconds summed:
  what a phase costs the host and the device together, one after another;
* ``busyN_s``: the solve's wall time while N other threads run pure-Python loops, as GPTQModel's
  device workers and progress threads do during a run: how much of a chunk is waiting for the
  interpreter lock;
* ``per_module``: GPTQModel's own ``GPTQ.quantize`` of the same modules one after another, for scale;
* ``--profile``: a ``torch.profiler`` table of one solve (host ops by their own time, with the
  number of calls) next to the JSON.

Tasks are reused across repeats (the solve only reads them). Each ``--shapes`` entry is
``rows x columns x modules`` (default: a gate/up chunk, 768 x 2048, and a down chunk, 2048 x 768, at
the module counts the default 1 GiB chunk holds). Every Hessian is the module's own unless
``--share 2`` gives pairs of modules one input and GPTQModel's shared-Hessian cache, as an expert's
gate and up projections have in a run (then a chunk inverts one Hessian per pair).

    python benchmarks/chunk_phases.py --output $OUT/chunk_phases_cuda.json --profile
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import platform
import shlex
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _args import counts  # noqa: E402
from _report import write_json  # noqa: E402


def _shapes(text: str) -> list[tuple[int, int, int]]:
    """``"768x2048x24,2048x768x40"`` -> [(768, 2048, 24), (2048, 768, 40)]; refused otherwise."""
    shapes = []
    for part in text.split(","):
        try:
            rows, columns, modules = (int(x) for x in part.lower().split("x"))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected rows x columns x modules, like 768x2048x24; got {part!r}") from None
        if min(rows, columns, modules) < 1 or columns % 128:
            raise argparse.ArgumentTypeError(f"{part!r}: sizes must be >= 1 and columns a multiple of 128")
        shapes.append((rows, columns, modules))
    return shapes


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", type=_shapes, default="768x2048x24,2048x768x40")
    p.add_argument("--tokens", type=int, default=2048, help="calibration rows per module's Hessian")
    p.add_argument("--share", type=int, default=1,
                   help="modules per shared Hessian (2: gate/up pairs with one input and GPTQModel's shared cache)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--busy", type=counts(0), default="1,2,4", help="busy Python thread counts to run beside the solve")
    p.add_argument("--busy-repeats", type=int, default=1,
                   help="solves per busy count (each can take seconds: every torch call waits for the lock)")
    p.add_argument("--inverse-threads", type=int, default=4)
    p.add_argument("--no-per-module", action="store_true", help="skip GPTQModel's own per-module solves")
    p.add_argument("--profile", action="store_true", help="write a torch.profiler table of one solve per shape")
    p.add_argument("--device", default="cuda")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    if min(args.repeats, args.busy_repeats, args.tokens, args.inverse_threads, args.share) < 1:
        p.error("--repeats, --busy-repeats, --tokens, --inverse-threads and --share must be >= 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; use --device cpu")
    return args


def make_tasks(rows: int, columns: int, modules: int, tokens: int, device: str, seed: int = 0,
               share: int = 1) -> list:
    """``modules`` GPTQModel GPTQ tasks of bf16 ``rows x columns`` Linears with their Hessians.

    ``share`` > 1: each run of that many tasks sees the same inputs and holds one GPTQModel
    shared-Hessian cache, as GPTQModel's processor sets up an expert's gate and up projections
    (the batched solve then inverts one Hessian per run; GPTQModel's own solve shares the factor)."""
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ, SharedHessianFactorCache

    qcfg = QuantizeConfig(bits=4, group_size=128)
    g = torch.Generator(device=device).manual_seed(seed)
    tasks = []
    x = cache = None
    for i in range(modules):
        linear = nn.Linear(columns, rows, bias=False, device=device, dtype=torch.bfloat16)
        with torch.no_grad():
            linear.weight.copy_(torch.randn(rows, columns, device=device, generator=g) * 0.02)
        task = GPTQ(linear, copy.deepcopy(qcfg))
        task.quantizer.configure(perchannel=True)
        if i % share == 0:
            x = torch.randn(tokens, columns, device=device, generator=g).to(torch.bfloat16)
            cache = SharedHessianFactorCache(0, f"cohort{i // share}") if share > 1 else None
        if cache is not None:
            task.attach_shared_hessian_cache(cache)
        task.add_batch(x, None)
        task.finalize_hessian()
        tasks.append(task)
    return tasks


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object], device: str) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


@contextlib.contextmanager
def phase_clock(device: str) -> Iterator[dict[str, list[float]]]:
    """Wrap the solve's phases with a synchronize on each side; yields phase -> [seconds, calls]."""
    from gptqmodel.quantization import gptq_cuda
    from gptqmodel.quantization.gptq import GPTQ

    from defuser_quant.integrations.gptqmodel import batched, packing

    seen: dict[str, list[float]] = {}
    depth = threading.local()

    def wrap(owner: object, attr: str, phase: str) -> tuple[object, str, object]:
        original = getattr(owner, attr)

        def timed(*a, **kw):
            if getattr(depth, "n", 0):  # a phase called inside another on this thread: the outer one counts
                return original(*a, **kw)
            depth.n = 1
            try:
                _sync(device)
                t = time.perf_counter()
                out = original(*a, **kw)
                _sync(device)
            finally:
                depth.n = 0
            entry = seen.setdefault(phase, [0.0, 0])
            entry[0] += time.perf_counter() - t
            entry[1] += 1
            return out

        setattr(owner, attr, timed)
        return owner, attr, original

    patches = [
        wrap(GPTQ, "finalize_hessian", "finalize_hessian"),
        wrap(batched, "_units", "shared_hessian_check"),
        wrap(batched, "_find_params", "quantizer_params"),
        wrap(batched, "_unit_inverses", "inverses"),
        wrap(gptq_cuda, "gptq_block_update", "block_update_extension"),
        wrap(torch.Tensor, "matmul", "lazy_block_matmuls"),
        wrap(packing, "host_copies", "results_to_host"),
    ]
    try:
        yield seen
    finally:
        for owner, attr, original in reversed(patches):
            setattr(owner, attr, original)


@contextlib.contextmanager
def busy_threads(n: int) -> Iterator[None]:
    """``n`` threads running a pure-Python loop (they hold the interpreter lock when they can)."""
    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            for i in range(200):
                x += i

    threads = [threading.Thread(target=spin, daemon=True) for _ in range(n)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        stop.set()
        for t in threads:
            t.join()


def measure_shape(args: argparse.Namespace, rows: int, columns: int, modules: int) -> dict:
    from defuser_quant.integrations.gptqmodel.batched import batched_gptq_solve

    tasks = make_tasks(rows, columns, modules, args.tokens, args.device, share=args.share)

    def solve() -> list:
        results = batched_gptq_solve(tasks, inverse_threads=args.inverse_threads, host_results=True)
        if any(r is None for r in results):
            raise RuntimeError("a module was left to GPTQModel's per-module solve; the chunk is not a whole batched one")
        return results

    print(f"{rows}x{columns} x{modules}: tasks built; warm-up solve", flush=True)
    warm = solve()  # warm-up: kernels loaded, the extension built, allocator pools grown
    row: dict = {"rows": rows, "columns": columns, "modules": modules, "tokens": args.tokens, "share": args.share,
                 "path": warm[0].path}
    alone = [_timed(solve, args.device) for _ in range(args.repeats)]
    row["alone_s"] = round(statistics.median(alone), 5)
    row["alone_runs_s"] = [round(x, 5) for x in alone]
    with phase_clock(args.device) as seen:
        row["phased_s"] = round(_timed(solve, args.device), 5)
    phases = {k: {"seconds": round(v[0], 5), "calls": v[1]} for k, v in sorted(seen.items(), key=lambda kv: -kv[1][0])}
    phases["rest (column loop's own work, result assembly)"] = {
        "seconds": round(row["phased_s"] - sum(v[0] for v in seen.values()), 5), "calls": 1}
    row["phases"] = phases
    print(f"  alone {row['alone_s'] * 1e3:.1f} ms, phased {row['phased_s'] * 1e3:.1f} ms", flush=True)
    for n in args.busy:
        print(f"  beside {n} busy thread(s) ...", flush=True)
        with busy_threads(n):
            runs = [_timed(solve, args.device) for _ in range(args.busy_repeats)]
        row[f"busy{n}_s"] = round(statistics.median(runs), 5)
    if not args.no_per_module:
        fresh = make_tasks(rows, columns, modules, args.tokens, args.device, share=args.share)
        fresh[0].quantize()  # its warm-up (and the extension's build on a fresh machine)
        row["per_module_s"] = round(_timed(lambda: [t.quantize() for t in fresh[1:]], args.device) / (modules - 1) * modules, 5) \
            if modules > 1 else None
    if args.profile and args.output is not None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device.startswith("cuda") else [])
        with profile(activities=activities) as prof:
            solve()
            _sync(args.device)
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30)
        path = args.output.with_name(f"{args.output.stem}_profile_{rows}x{columns}x{modules}.txt")
        path.write_text(f"# {shlex.join([sys.executable, *sys.argv])}\n{table}\n")
        row["profile_table"] = path.name
    return row


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
    from _source import use_source_checkout

    use_source_checkout()
    rows: list[dict] = []
    out = {
        "meta": {"command": shlex.join([sys.executable, *sys.argv]), "python": platform.python_version(),
                 "torch": torch.__version__, "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
                 "inverse_threads": args.inverse_threads, "repeats": args.repeats, "busy_repeats": args.busy_repeats,
                 "switch_interval_s": sys.getswitchinterval()},
        "rows": rows,
        "complete": False,
    }
    for rows_, columns, modules in args.shapes:
        row = measure_shape(args, rows_, columns, modules)
        rows.append(row)
        if args.output is not None:  # after each shape: a run cut off keeps what it measured
            write_json(args.output, out)
        busy = ", ".join(f"busy {n}: {row[f'busy{n}_s'] * 1e3:.1f} ms" for n in args.busy)
        print(f"{rows_}x{columns} x{modules}: alone {row['alone_s'] * 1e3:.1f} ms, phased {row['phased_s'] * 1e3:.1f} ms, "
              f"{busy}; per module (GPTQModel) {row.get('per_module_s') or 0:.3f} s", flush=True)
        for name, p in row["phases"].items():
            print(f"    {name:45s} {p['seconds'] * 1e3:8.1f} ms  ({p['calls']} calls)", flush=True)
    out["complete"] = True
    if args.output is not None:
        write_json(args.output, out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
