"""Does the GPU run its first work after an idle spell slower? (a diagnostic for issue 17's first solve)

In GPTQModel's runs on one H100 (round 42a timelines) the first solves of layer 0 wait about 0.25 s
before their Hessian inverse (stock's and ours' alike; 0.006 s in layer 1): they wait for events of the
calibration forward's work on the GPU, and before that forward the GPU sat idle for about a second
while the inputs were captured on the CPU. One reading is that the GPU's clocks drop while it idles and
the first work after it runs at the low clock. This script measures that alone: after each idle spell
(``--idle``, seconds of ``time.sleep``) it runs the same fixed workload (``--matmuls`` float32 products
of ``--size`` square matrices, the shape of a 2048-column Hessian's products) and times it from the
first launch to its end (CUDA events and the host's clock); a second pass reads the SM clock
(nvidia-smi) at the end of each spell instead, apart from the timed workloads. Every spell follows
the workload itself, so the 0 s spell is the hot reference.

    python benchmarks/gpu_clock_ramp.py --output out.json        # on a CUDA machine
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from _args import whole
from _report import write_json


def sm_clock(index: int) -> dict | None:
    """nvidia-smi's current and maximum SM clock (MHz) and performance state of GPU ``index``, or None without it."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    out = subprocess.run([exe, "-i", str(index), "--query-gpu=clocks.sm,clocks.max.sm,pstate", "--format=csv,noheader,nounits"],
                         capture_output=True, text=True, timeout=20)
    if out.returncode != 0 or not out.stdout.strip():
        return None
    sm, sm_max, pstate = (x.strip() for x in out.stdout.strip().splitlines()[0].split(","))
    return {"sm_mhz": int(sm) if sm.isdigit() else sm, "sm_max_mhz": int(sm_max) if sm_max.isdigit() else sm_max, "pstate": pstate}


def workload(a: torch.Tensor, b: torch.Tensor, matmuls: int) -> tuple[float, float]:
    """``matmuls`` products queued at once; (GPU seconds first launch to end, host seconds launch to synchronize)."""
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    begin.record()
    for _ in range(matmuls):
        torch.mm(a, b)
    end.record()
    end.synchronize()
    return begin.elapsed_time(end) / 1e3, time.perf_counter() - t0


def summarize(points: list[dict]) -> dict:
    """Each idle spell's workload against the hot one (the 0 s spell): ``slowdown`` is its GPU seconds over the hot's."""
    hot = next((p for p in points if p["idle_s"] == 0), None)
    if hot is None:
        raise ValueError("the idle spells must include 0 (the hot reference)")
    return {f"{p['idle_s']:g}": {"gpu_s": round(p["gpu_s"], 4), "extra_s": round(p["gpu_s"] - hot["gpu_s"], 4),
                                 "slowdown": round(p["gpu_s"] / hot["gpu_s"], 3)} for p in points}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--idle", default="0,0.25,0.5,1,2,4", help="idle spells before the workload, seconds (comma list, with 0)")
    p.add_argument("--matmuls", type=whole(1), default=200, help="products per workload")
    p.add_argument("--size", type=whole(1), default=2048, help="square matrix side")
    p.add_argument("--repeat", type=whole(1), default=2, help="passes over the idle spells")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        spells = [float(x) for x in args.idle.split(",")]
    except ValueError:
        p.error(f"--idle must be a comma list of seconds, got {args.idle!r}")
    if 0 not in spells or any(s < 0 for s in spells):
        p.error(f"--idle needs a 0 (the hot reference) and no negative spell, got {args.idle!r}")
    if not torch.cuda.is_available():
        print("gpu_clock_ramp.py: no CUDA device here; it measures a GPU's clocks, run it on a CUDA machine", file=sys.stderr)
        return 2
    index = torch.cuda.current_device()
    a = torch.randn(args.size, args.size, device="cuda")
    b = torch.randn(args.size, args.size, device="cuda")
    workload(a, b, args.matmuls)  # kernels loaded, the allocator warm
    points = []
    for rnd in range(args.repeat):
        for idle in spells:
            workload(a, b, args.matmuls)  # hot before every spell, so each spell starts from the same state
            time.sleep(idle)
            gpu_s, host_s = workload(a, b, args.matmuls)
            points.append({"round": rnd, "idle_s": idle, "gpu_s": gpu_s, "host_s": host_s})
            print(f"idle {idle:g} s: the workload took {gpu_s * 1e3:.1f} ms on the GPU", flush=True)
    # the clocks apart from the timed workloads (an nvidia-smi call takes tens of milliseconds, itself idle time)
    clocks = []
    for idle in spells:
        workload(a, b, args.matmuls)
        time.sleep(idle)
        clocks.append({"idle_s": idle, "after_idle": sm_clock(index)})
    result = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
              "gpu": torch.cuda.get_device_name(index), "torch": torch.__version__, "matmuls": args.matmuls,
              "size": args.size, "points": points, "clocks": clocks,
              "by_idle": [summarize([p for p in points if p["round"] == r]) for r in range(args.repeat)]}
    print(json.dumps(result["by_idle"], indent=1))
    if args.output is not None:
        write_json(args.output, result)  # whole or not at all
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
