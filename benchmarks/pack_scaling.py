"""How GPTQModel's CPU pack extension scales: with its own ``threads`` argument, and with callers; and this
project's row-wise pack kernel (``--packers rows``, ``integrations/gptqmodel/pack_kernel.py``) beside it.

GPTQModel 7.6 packs every finished module on a CPU finalize worker (``PackableQuantLinear.pack_block``
-> ``pack_block_ext.pack_block_cpu(weight, scales, zeros, g_idx, bits, 32, block_in, threads)``, with
``block_in=8192`` and ``threads=1``, or ``GPTQMODEL_PACK_THREADS``). On the H200 host the last
layer's packs bound the run's tail (``docs/performance.md``, round 37). This times, at the expert
projections' real shapes (768 x 2048 gate/up, 2048 x 768 down), one module's pack:

* ``threads``: each of ``--threads`` passed to the extension with ``block_in`` cut so that there
  are that many blocks (the extension splits its work over blocks with ``at::parallel_for``);
* ``callers``: ``--callers`` Python threads packing at once (what more finalize workers would do;
  the extension runs without the interpreter lock).

* ``--packers``: ``extension`` (GPTQModel's), ``rows`` (the kernel, one thread a call: ``threads`` 1 only).

Every packing is checked to give the words of ``threads=1``, ``block_in=8192`` (GPTQModel's call).
The weights are dequantized GPTQ weights (``(q - zero) * scale`` in bf16, the extension's real input).
Reported per combination: milliseconds per module (wall time / modules packed), median of
``--repeats``.

    python benchmarks/pack_scaling.py --output benchmarks/results/pack_scaling_cpu_round38.json
    python benchmarks/pack_scaling.py --callers 1,2,4,8,16 --output $OUT/pack_scaling.json   # a many-core host
    python benchmarks/pack_scaling.py --packers extension,rows --threads 1 --callers 1,14   # the kernel beside it
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

from _args import counts, names, whole
from _report import write_json
from _source import use_source_checkout

use_source_checkout()  # --packers rows imports the subpackages: a plain checkout finds them only through this

PACKERS = ("extension", "rows")
SHAPES = ((768, 2048), (2048, 768))  # (out, in): an expert's gate/up, its down, at Qwen3-30B-A3B size


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=counts(1), default=[1, 2], help="the extension's threads argument, comma-separated")
    p.add_argument("--callers", type=counts(1), default=[1, 2], help="Python threads packing at once, comma-separated")
    p.add_argument("--packers", type=names(PACKERS), default=["extension"],
                   help=f"comma-separated, from {', '.join(PACKERS)}")
    p.add_argument("--modules", type=whole(1), default=16, help="modules each caller packs per timing")
    p.add_argument("--repeats", type=whole(1), default=3)
    p.add_argument("--scale-down", type=whole(1), default=1,
                   help="divide both dimensions of the shapes by this (multiples of 128 kept; for quick runs)")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    if not args.threads or not args.callers:
        p.error("--threads and --callers each need at least one count")
    return args


def _shapes(scale_down: int) -> list[tuple[int, int]]:
    shapes = []
    for out, inp in SHAPES:
        out, inp = (max(128, (n // scale_down) // 128 * 128) for n in (out, inp))
        shapes.append((out, inp))
    return shapes


def _module(out: int, inp: int, group: int = 128):
    """A dequantized GPTQ weight [out, in] in bf16 and its transposed scales/zeros [groups, out], g_idx [in]."""
    import torch

    gen = torch.Generator().manual_seed(out * 7 + inp)
    groups = inp // group
    scales = torch.rand(groups, out, generator=gen) * 0.01 + 1e-3
    zeros = torch.randint(0, 16, (groups, out), generator=gen, dtype=torch.int32)
    q = torch.randint(0, 16, (out, inp), generator=gen)
    g_idx = (torch.arange(inp) // group).to(torch.int32)
    weight = ((q - zeros.t().repeat_interleave(group, 1)) * scales.t().repeat_interleave(group, 1)).to(torch.bfloat16)
    return weight, scales, zeros, g_idx


def _time(pack, args_, callers: int, modules: int) -> float:
    """Wall milliseconds per module with ``callers`` threads each packing ``modules`` modules."""
    def work() -> None:
        for _ in range(modules):
            pack(*args_)

    threads = [threading.Thread(target=work) for _ in range(callers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return (time.perf_counter() - t0) / (callers * modules) * 1000


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    import torch
    from gptqmodel.nn_modules.qlinear.pack_block_ext import pack_block_cpu

    rows_kernel = None
    if "rows" in args.packers:
        from defuser_quant.integrations.gptqmodel import pack_kernel

        rows_kernel = pack_kernel.load()
        if rows_kernel is None:
            raise SystemExit("pack_scaling: the pack kernel could not be built here (see the warning above); "
                             "run without --packers rows")
    rows = []
    for out, inp in _shapes(args.scale_down):
        weight, scales, zeros, g_idx = _module(out, inp)
        reference = pack_block_cpu(weight, scales, zeros, g_idx, 4, 32, 8192, 1)
        blocks = inp // 32
        for packer in args.packers:
            for threads in args.threads if packer == "extension" else [1]:
                if packer == "extension":
                    block_in = 32 * math.ceil(blocks / threads)
                    pack, call = pack_block_cpu, (weight, scales, zeros, g_idx, 4, 32, block_in, threads)
                else:
                    block_in, pack, call = None, rows_kernel, (weight, scales, zeros, g_idx, 4)
                words = pack(*call)
                same = torch.equal(words[0], reference[0]) and torch.equal(words[1], reference[1])
                for callers in args.callers:
                    times = [_time(pack, call, callers, args.modules) for _ in range(args.repeats)]
                    rows.append({"packer": packer, "out": out, "in": inp, "threads": threads, "block_in": block_in,
                                 "callers": callers, "ms_per_module": round(statistics.median(times), 3),
                                 "ms_per_module_all": [round(t, 3) for t in times], "same_words": same})
    import gptqmodel

    return {
        "meta": {"command": " ".join(["python benchmarks/pack_scaling.py", *argv]), "python": platform.python_version(),
                 "torch": torch.__version__, "gptqmodel": gptqmodel.__version__, "machine": platform.machine(),
                 "cpus": os.cpu_count(), "aten_threads": torch.get_num_threads(),
                 "aten_parallel": torch.__config__.parallel_info().splitlines()[-1].strip()},
        "rows": rows,
        "all_same_words": all(r["same_words"] for r in rows),
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    result = run(args, argv)
    for r in result["rows"]:
        print(f"{r['packer']} {r['out']}x{r['in']} threads={r['threads']} (block_in {r['block_in']}) "
              f"callers={r['callers']}: "
              f"{r['ms_per_module']:.2f} ms a module; words as GPTQModel's call: {r['same_words']}")
    if args.output is not None:
        write_json(args.output, result)
        print(f"wrote {args.output}")
    return 0 if result["all_same_words"] else 1


if __name__ == "__main__":
    sys.exit(main())
