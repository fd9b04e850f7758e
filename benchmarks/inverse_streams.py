"""Are the batched solve's Hessian inverses the same bytes on helper threads and streams as on the caller's?

``batched_solve_exactness.py --deterministic --inverse-threads 4 --host-results`` (round 24) gave 0 of 48
expert qweights equal to GPTQModel's per-module solve (largest relative scale difference 0.19), where one
inverse thread gave 48/48 with and without deterministic algorithms (round 23). This script isolates the
inverses: it prepares ``--hessians`` random Hessians (``X^T X`` of ``--tokens`` random rows, ``--columns``
wide) and computes each one's GPTQModel inverse (``batched._invert_unit``: dead columns,
``act_group_aware`` order, damped lower Cholesky, ``cholesky_inverse``, upper Cholesky) in several ways:

* ``serial``: one after another on the caller's (main) thread and stream (the reference);
* ``side_stream``: one after another on one other stream, ordered after the caller's and waited for;
* ``threads<N>``: ``batched._unit_inverses`` with ``--threads`` host threads, each on its own stream (the
  plugin's setting);
* ``threads_same_stream``: those threads, all on the default stream;
* ``threads_synced``: those threads, one job at a time with the device synchronized around it (no race);
* ``other_thread_serial``: one new thread, one after another on the default stream;

each without deterministic algorithms, with them, with them but
``torch.utils.deterministic.fill_uninitialized_memory = False`` (deterministic mode fills every new
``torch.empty`` with NaN on the current stream; with that off it does not), and with them and cuSOLVER or
MAGMA preferred (``torch.backends.cuda.preferred_linalg_library``). ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` is
set for the whole process (it must be set before CUDA starts). Each way is compared with ``serial`` byte
for byte (whole, and per part: ``hinv``, the order, the status; with the largest relative ``hinv``
difference); without deterministic algorithms each way's first run is also compared with the same steps
in float64 on the CPU (``max_rel_error_vs_float64``): rounding-level differences, or wrong results.

The JSON is written again after each setting (``complete`` false until every ``--settings`` entry has
run), so a run its caller cuts off keeps the settings it finished (round 25's first run was cut off in its
last setting before it wrote anything).

    python benchmarks/inverse_streams.py --output $OUT/inverse_streams_cuda.json
    python benchmarks/inverse_streams.py --settings default,deterministic --repeats 2
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any

from _args import names, whole
from _threads import on_fresh_thread

HERE = Path(__file__).resolve().parent


#: setting -> (deterministic algorithms, their NaN fill of new memory, preferred linalg library or None)
SETTINGS = {"default": (False, True, None), "deterministic": (True, True, None),
            "deterministic_no_fill": (True, False, None), "deterministic_cusolver": (True, True, "cusolver"),
            "deterministic_magma": (True, True, "magma")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hessians", type=int, default=16)
    p.add_argument("--columns", type=whole(1), default=2048)
    p.add_argument("--tokens", type=whole(1), default=512)
    p.add_argument("--threads", type=int, default=4)
    p.add_argument("--repeats", type=whole(1), default=3, help="runs of each way (a race may not show every time)")
    p.add_argument("--settings", type=names(SETTINGS), default=",".join(SETTINGS),
                   help=f"comma-separated settings to run, in order (default: all of {', '.join(SETTINGS)})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", type=Path, default=None, help="JSON path (default: $OUT or benchmarks/results)")
    args = p.parse_args(argv)
    if args.hessians < 2 or args.threads < 2:
        p.error("--hessians and --threads must be at least 2 (the threaded path needs two of each)")
    return args


def _hessians(args: argparse.Namespace) -> list[Any]:
    import torch

    g = torch.Generator().manual_seed(args.seed)
    out = []
    for _ in range(args.hessians):
        x = torch.randn(args.tokens, args.columns, generator=g).cuda()
        out.append((2 / args.tokens) * x.T.matmul(x))
    torch.cuda.synchronize()
    return out


def _ways(qcfg: Any, columns: int, threads: int) -> dict[str, Any]:
    import threading

    import torch

    from defuser_quant.integrations.gptqmodel.batched import _invert_unit, _spread, _unit_inverses

    damp = float(qcfg.damp_percent)
    group = qcfg.group_size

    def invert(h: Any) -> Any:
        return _invert_unit(h, qcfg, columns, group, damp)

    def serial(hs: list) -> list:
        return [invert(h) for h in hs]

    def side_stream(hs: list) -> list:
        origin = torch.cuda.current_stream()
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            stream.wait_stream(origin)
            out = [invert(h) for h in hs]
        origin.wait_stream(stream)
        for inv in out:
            for t in inv.tensors():
                t.record_stream(origin)
        return out

    def threads_same_stream(hs: list) -> list:  # helper threads, every one on the default stream
        def job(h: Any) -> Any:
            with torch.cuda.device(h.device):
                return invert(h)
        return _spread(job, hs, threads)

    def threads_synced(hs: list) -> list:  # each job alone: the device synchronized before and after it
        lock = threading.Lock()

        def job(h: Any) -> Any:
            with lock, torch.cuda.device(h.device):
                torch.cuda.synchronize()
                out = invert(h)
                torch.cuda.synchronize()
                return out
        return _spread(job, hs, threads)

    def other_thread_serial(hs: list) -> list:  # one new thread, default stream, one after another
        return on_fresh_thread(serial, hs)

    return {"serial": serial, "side_stream": side_stream,
            f"threads{threads}": lambda hs: _unit_inverses(hs, invert, threads),
            "threads_same_stream": threads_same_stream, "threads_synced": threads_synced,
            "other_thread_serial": other_thread_serial}


def _error_vs_float64(hessians: list, inverses: list, qcfg: Any) -> float:
    """Largest |hinv - hinv64| / max|hinv64| over the Hessians; hinv64: the same steps (the way's own
    column order, dead columns, damp, Cholesky, inverse, upper Cholesky) in float64 on the CPU."""
    import torch

    worst = 0.0
    for h, inv in zip(hessians, inverses, strict=True):
        H = h.double().cpu()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        if inv.perm is not None:
            perm = inv.perm.cpu()
            H = H[perm][:, perm]
        H.diagonal().add_(float(qcfg.damp_percent) * H.diagonal().mean())
        ref = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
        got = inv.hinv.double().cpu()
        worst = max(worst, float((got - ref).abs().max() / ref.abs().max()))
    return worst


def _bytes_of(inverses: list) -> list[tuple]:
    import torch

    torch.cuda.synchronize()
    return [(inv.hinv.cpu(), None if inv.perm is None else inv.perm.cpu(), inv.info.cpu()) for inv in inverses]


PARTS = ("hinv", "perm", "info")


def _compare(a: list[tuple], b: list[tuple]) -> dict[str, Any]:
    """How many of the inverses are byte-equal (whole, and per part: ``hinv``, the column order, the
    status) and the largest |b - a| / max|a| of ``hinv``."""
    import torch

    def same(x: Any, y: Any) -> bool:
        return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))

    flags = [[same(x, y) for x, y in zip(ra, rb, strict=True)] for ra, rb in zip(a, b, strict=True)]
    diff = max(float((rb[0].double() - ra[0].double()).abs().max() / ra[0].double().abs().max())
               for ra, rb in zip(a, b, strict=True))
    return {"all": sum(all(f) for f in flags), **{part: sum(f[i] for f in flags) for i, part in enumerate(PARTS)},
            "max_rel_hinv_diff": diff}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts (deterministic settings)
    import torch

    if not torch.cuda.is_available():
        print("inverse_streams: needs CUDA (it compares CUDA streams)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(HERE))
    from _report import write_json
    from _source import use_source_checkout

    use_source_checkout()
    import gptqmodel
    from gptqmodel import QuantizeConfig

    qcfg = QuantizeConfig(bits=4, group_size=128)
    hessians = _hessians(args)
    ways = _ways(qcfg, args.columns, args.threads)
    out = args.output or (Path(os.environ["OUT"]) / "inverse_streams_cuda.json" if os.environ.get("OUT")
                          else HERE / "results" / "inverse_streams_cuda.json")
    meta = {
        "command": "python benchmarks/inverse_streams.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "gptqmodel": gptqmodel.__version__,
        "preferred_linalg_library": str(torch.backends.cuda.preferred_linalg_library()),
        "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG"),
        "hessians": args.hessians, "columns": args.columns, "tokens": args.tokens, "threads": args.threads,
        "repeats": args.repeats,
    }
    fill_default = torch.utils.deterministic.fill_uninitialized_memory
    library_default = torch.backends.cuda.preferred_linalg_library()
    results: dict[str, Any] = {}
    for setting in args.settings:
        deterministic, fill, library = SETTINGS[setting]
        torch.use_deterministic_algorithms(deterministic, warn_only=True)
        torch.utils.deterministic.fill_uninitialized_memory = fill
        if library is not None:
            torch.backends.cuda.preferred_linalg_library(library)
        try:
            reference = _bytes_of(ways["serial"](hessians))
            row: dict[str, Any] = {}
            for way, run in ways.items():
                compared, error = [], 0.0
                for _ in range(args.repeats):
                    inverses = run(hessians)
                    compared.append(_compare(reference, _bytes_of(inverses)))
                    if setting == "default" and not error:
                        error = _error_vs_float64(hessians, inverses, qcfg)
                row[way] = {"equal_per_repeat": [c["all"] for c in compared], "of": args.hessians,
                            "parts_equal_per_repeat": {p: [c[p] for c in compared] for p in PARTS},
                            "max_rel_hinv_diff": max(c["max_rel_hinv_diff"] for c in compared)}
                if setting == "default":
                    row[way]["max_rel_error_vs_float64"] = error
            results[setting] = row
        finally:
            torch.use_deterministic_algorithms(False)
            torch.utils.deterministic.fill_uninitialized_memory = fill_default
            torch.backends.cuda.preferred_linalg_library(library_default)
        print(setting, {w: (r["equal_per_repeat"], r.get("max_rel_error_vs_float64")) for w, r in row.items()},
              f"of {args.hessians}")
        # after every setting: a run cut off by a time limit keeps what it finished, marked incomplete
        write_json(out, report(meta, results, args.settings))
    print(f"wrote {out}")
    return 0


def report(meta: dict[str, Any], results: dict[str, Any], asked: list[str]) -> dict[str, Any]:
    """The JSON written after each setting: ``complete`` only once every asked setting has run."""
    return {**meta, "settings_asked": list(asked), "complete": all(s in results for s in asked), "results": results}


if __name__ == "__main__":
    sys.exit(main())
