"""Which calls of GPTQModel's per-module work hold Python's interpreter lock while they run.

Each candidate runs back to back on a worker thread for ``--seconds`` while ``_gil_probe.GilProbe``
samples, on another thread, how late a 2 ms sleep gets the lock back. A call that lets the lock
go while it works (most torch kernels, GPTQModel's C++ packing) leaves the probe's delay at the
idle level; a call that keeps it delays the probe by up to the switch interval (5 ms by default),
like the pure-Python loop that is measured as the reference. Run it on the machine in question:
the answer is a property of the code, the delays of the machine.

    python benchmarks/gil_holders.py --output benchmarks/results/gil_holders_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def candidates(scratch: Path) -> dict[str, Callable[[], object] | None]:
    """Name -> one call (None: the idle baseline). An expert projection of Qwen3-30B-A3B shape."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    out_f, in_f, group = 768, 2048, 128
    weight = torch.randn(out_f, in_f) * 0.01
    scales = torch.rand(in_f // group, out_f) * 0.01 + 1e-3
    zeros = torch.full((in_f // group, out_f), 8.0)
    g_idx = torch.arange(in_f, dtype=torch.int32) // group
    packed = {"qweight": torch.randint(0, 2**31 - 1, (in_f // 8, out_f), dtype=torch.int32),
              "qzeros": torch.randint(0, 2**31 - 1, (in_f // group, out_f // 8), dtype=torch.int32),
              "scales": scales.half(), "g_idx": g_idx}
    bundle = scratch / "bundle.safetensors"
    save_file(packed, str(bundle))
    row = {"process": "gptq", "layer": 1, "module": "mlp.experts.110.down_proj", "loss": "0.0000158448",
           "samples": "36616", "damp": "0.05000", "time": "0.841", "fwd_time": "7.984", "(v)ram": "cuda:0=9.1GB"}

    def python_loop() -> int:
        return sum(range(10_000))

    def save() -> None:
        save_file(packed, str(scratch / "out.safetensors"))

    def read() -> None:
        with safe_open(str(bundle), "pt") as f:
            for key in f.keys():
                f.get_tensor(key)

    def log_row() -> None:
        with open(scratch / "log.json", "a") as f:
            json.dump(row, f, indent=4)
            f.write("\n")

    found: dict[str, Callable[[], object] | None] = {
        "idle": None,
        "python_loop": python_loop,
        "torch_mm": lambda: torch.mm(weight.T, weight),
        "tensor_clone": lambda: weight.clone(),
        "safetensors_save_file": save,
        "safetensors_read": read,
        "json_log_row": log_row,
    }
    try:
        from gptqmodel.nn_modules.qlinear.pack_block_ext import pack_block_cpu

        pack_block_cpu(weight, scales, zeros, g_idx, 4, 32, group, 1)
        found["gptqmodel_pack_block_cpu"] = lambda: pack_block_cpu(weight, scales, zeros, g_idx, 4, 32, group, 1)
    except Exception as exc:  # no gptqmodel, or its extension does not build here
        print(f"gptqmodel_pack_block_cpu left out: {exc}", file=sys.stderr)
    return found


def measure(call: Callable[[], object] | None, seconds: float) -> dict:
    from _gil_probe import GilProbe

    stop = threading.Event()
    calls = [0]

    def loop() -> None:
        while not stop.is_set():
            call()
            calls[0] += 1

    worker = threading.Thread(target=loop, daemon=True) if call is not None else None
    if worker is not None:
        worker.start()
    try:
        with GilProbe() as probe:
            time.sleep(seconds)
    finally:
        stop.set()
        if worker is not None:
            worker.join()
    return {"calls_per_s": round(calls[0] / probe.wall, 1) if call is not None else None, "probe": probe.summary()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=1.0, help="seconds per candidate")
    p.add_argument("--only", default=None, help="comma-separated candidate names (default: all)")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default: print only)")
    args = p.parse_args(argv)
    if args.seconds <= 0:
        p.error(f"--seconds must be > 0, got {args.seconds}")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core for the candidate: the probe's thread needs the other
    try:
        with tempfile.TemporaryDirectory(prefix="gil_holders_") as tmp:
            found = candidates(Path(tmp))
            names = list(found) if args.only is None else [n for n in args.only.split(",") if n]
            unknown = [n for n in names if n not in found]
            if unknown:
                p.error(f"unknown candidates {unknown}; choose from {', '.join(found)}")
            results = {name: measure(found[name], args.seconds) for name in names}
    finally:
        torch.set_num_threads(threads)
    for name, r in results.items():
        probe = r["probe"]
        print(f"{name:26s} calls/s {r['calls_per_s']!s:>8}  probe mean {probe['mean_ms']} ms  p90 {probe['p90_ms']} ms  "
              f"over switch {probe['over_switch']}")
    if args.output is not None:
        payload = {"command": shlex.join(["python", "benchmarks/gil_holders.py", *(argv if argv is not None else sys.argv[1:])]),
                   "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                   "cpus": os.cpu_count(), "results": results}
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
