"""A weight fingerprint's cost one at a time and with many threads side by side (a probe for issue 17's last finalize
window): torch's widened sums against numpy's buffered ones.

``block_finalize``'s pool checks every member that takes packed words (``BatchedSolve(pack=True)``, ``pack_ahead``,
``device_words``) against them with :func:`~defuser_quant.integrations.gptqmodel.packing.weight_fingerprint`, up to
14 members at once on a 16-core host. torch's ``sum(dtype=int32)`` of a 16-bit weight makes a widened copy of the whole
weight first; numpy's casts in small buffers. Each way sums ``--members`` weights of ``--shape`` (bf16, a
Qwen3-30B-A3B expert projection by default) one after another on one thread, then all of them on ``--threads``
threads, ``--repeat`` times; the figures are milliseconds a member (the threads' wall time over the members). Both
ways give the same sums, checked for every weight before any timing.

    python benchmarks/fingerprint_threads.py --output benchmarks/results/fingerprint_threads_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from _args import whole
from _report import emit_json
from _source import use_source_checkout

use_source_checkout()  # a plain checkout (the GPU machine) finds the subpackages only through this
from defuser_quant.integrations.gptqmodel import packing  # noqa: E402

WAYS = {"torch": packing._bit_sums_torch, "numpy": packing._bit_sums_numpy}


def _per_member_ms(way, weights: list[torch.Tensor], threads: int) -> float:
    bits = [w.view(torch.int16) for w in weights]
    if threads == 1:
        t0 = time.perf_counter()
        for b in bits:
            way(b, torch.int32)
        return (time.perf_counter() - t0) / len(bits) * 1e3
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda b: way(b, torch.int32), bits[:threads]))  # the threads started and warm
        t0 = time.perf_counter()
        list(pool.map(lambda b: way(b, torch.int32), bits))
        return (time.perf_counter() - t0) / len(bits) * 1e3


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", type=whole(32), nargs=2, default=[768, 2048], metavar=("OUT", "IN"),
                   help="each weight's shape (bf16)")
    p.add_argument("--members", type=whole(1), default=128, help="weights summed a turn")
    p.add_argument("--threads", type=whole(2), default=14, help="threads side by side (block_finalize's pool on 16 "
                                                                "cores: 14)")
    p.add_argument("--repeat", type=whole(1), default=3, help="turns of each way")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # one thread a sum, as in a worker pool of many threads
    weights = [torch.randn(*args.shape).to(torch.bfloat16) for _ in range(args.members)]
    for w in weights:
        bits = w.view(torch.int16)
        if not torch.equal(WAYS["torch"](bits, torch.int32), WAYS["numpy"](bits, torch.int32)):
            raise SystemExit("fingerprint_threads: torch's and numpy's sums differ; nothing timed")
    turns = []
    for rnd in range(args.repeat):
        for name, way in WAYS.items():
            one = _per_member_ms(way, weights, 1)
            many = _per_member_ms(way, weights, args.threads)
            turns.append({"round": rnd, "way": name, "one_thread_ms": round(one, 4), "threads_ms": round(many, 4)})
            print(f"{name:5s}: {one:.3f} ms a member on one thread, {many:.3f} ms a member on {args.threads} threads",
                  flush=True)
    medians = {name: {key: round(statistics.median(t[key] for t in turns if t["way"] == name), 4)
                      for key in ("one_thread_ms", "threads_ms")} for name in WAYS}
    given = argv if argv is not None else sys.argv[1:]
    result = {"command": " ".join(["python", "benchmarks/fingerprint_threads.py", *given]),
              "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "python": platform.python_version(), "shape": args.shape, "members": args.members,
              "threads": args.threads, "turns": turns, "medians": medians}
    emit_json(args.output, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
