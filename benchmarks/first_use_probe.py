"""Is the wait in layer 0's first GPTQ solves the first use of their CUDA kernels, and does a small rehearsal remove it?

Rounds 42-43 (one H100): layer 0's first solves waited 0.2-0.3 s between the weight's clone and the Hessian
inverse, layer 1's 0.006 s (docs/performance.md, round 43). ``integrations/gptqmodel/solve_warmup.py``'s
:func:`rehearse` runs the steps in between (GPTQModel's quantizer parameters, the dead columns' masked writes,
act_group_aware's permutations, the plugin's parameters). This script times each step in fresh processes:

- ``cold``: the steps at a real projection's size (``--rows`` x ``--columns``) first, then again (``warm``);
- ``rehearsed``: the small rehearsal the ``solve_warmup`` part runs first, then the real size;
- ``attention_*``: a real-shape attention block's forward on the main thread, cold and warm, and after the part's
  attention rehearsal ran on another thread (``rehearse_attention``).

If ``cold`` is well over ``warm`` and ``rehearsed`` close to ``warm``, the wait is the kernels' first use and the
part takes it off the run's path. Each process synchronizes the device after every step.

    python benchmarks/first_use_probe.py --output out.json          # on a CUDA machine
    python benchmarks/first_use_probe.py --device cpu                # the plumbing, on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def child(mode: str, device: str, rows: int, columns: int) -> dict:
    """In this (fresh) process: the timings of ``mode`` (see the module doc)."""
    import torch
    from _source import use_source_checkout
    from gptqmodel import QuantizeConfig

    use_source_checkout()  # a plain checkout on PYTHONPATH (the GPU machine) maps defuser_quant.integrations here
    from defuser_quant.integrations.gptqmodel.solve_warmup import rehearse

    if device == "cuda":
        torch.cuda.init()
        torch.zeros(1, device=device)  # the context, outside the timings
    qcfg = QuantizeConfig(bits=4, group_size=128)  # GPTQModel's defaults otherwise: act_group_aware on
    groups = max(1, columns // 128)
    out: dict[str, dict[str, float]] = {}
    runs = (("cold", {"groups": groups, "rows": rows}), ("warm", {"groups": groups, "rows": rows})) if mode == "cold" \
        else (("rehearsal", {}), ("rehearsed", {"groups": groups, "rows": rows}))
    for name, size in runs:
        timings: dict[str, float] = {}
        begin = time.perf_counter()
        rehearse(device, qcfg, timings, **size)
        out[name] = {**{k: round(v, 5) for k, v in timings.items()}, "total": round(time.perf_counter() - begin, 5)}
    out.update(attention_child(mode, device))
    return out


def attention_child(mode: str, device: str) -> dict:
    """A Qwen3-30B-A3B attention block's forward (32/4 heads of 128, hidden 2048, sdpa, bf16, 8 x 256 tokens) on
    this thread: ``cold`` first and second time; ``rehearsed`` after ``rehearse_attention`` on another thread,
    as the ``solve_warmup`` part runs it on a GPTQModel worker."""
    import threading

    import torch
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeAttention, Qwen3MoeRotaryEmbedding

    from defuser_quant.integrations.gptqmodel.solve_warmup import rehearse_attention

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = Qwen3MoeConfig(hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                            num_hidden_layers=1)
    config._attn_implementation = "sdpa"
    attention = Qwen3MoeAttention(config, 0).to(device=device, dtype=dtype)
    rotary = Qwen3MoeRotaryEmbedding(config).to(device)
    x = torch.randn(8, 256, 2048, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    positions = torch.arange(256, device=device).unsqueeze(0).expand(8, -1)

    def forward() -> float:
        begin = time.perf_counter()
        with torch.inference_mode():
            attention(x, rotary(x, positions), None)
        if device == "cuda":
            torch.cuda.synchronize()
        return round(time.perf_counter() - begin, 5)

    if mode == "cold":
        first = forward()
        return {"attention_cold": {"forward": first}, "attention_warm": {"forward": forward()}}
    timings: dict[str, float] = {}
    worker = threading.Thread(target=rehearse_attention, args=(torch.device(device), config, dtype, timings))
    begin = time.perf_counter()
    worker.start()
    worker.join()
    rehearsal = {**{k: round(v, 5) for k, v in timings.items()}, "total": round(time.perf_counter() - begin, 5)}
    return {"attention_rehearsal": rehearsal, "attention_rehearsed": {"forward": forward()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--rows", type=int, default=4096, help="the real projection's rows (q_proj: 4096)")
    p.add_argument("--columns", type=int, default=2048, help="its columns, a multiple of 128 (hidden: 2048)")
    p.add_argument("--output", type=Path, default=None)
    p.add_argument("--child", choices=("cold", "rehearsed"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.rows < 1 or args.columns < 128 or args.columns % 128:
        p.error(f"--rows must be positive and --columns a multiple of 128, got {args.rows} x {args.columns}")
    if args.child:
        print(json.dumps(child(args.child, args.device, args.rows, args.columns)))
        return 0
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            print("first_use_probe.py: no CUDA device here; pass --device cpu to check the plumbing", file=sys.stderr)
            return 2
    result = {"command": " ".join(["python benchmarks/first_use_probe.py", *(argv if argv is not None else sys.argv[1:])]),
              "device": args.device, "rows": args.rows, "columns": args.columns}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), str(HERE), os.environ.get("PYTHONPATH"))))}
    for mode in ("cold", "rehearsed"):
        done = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", mode, "--device", args.device,
                               "--rows", str(args.rows), "--columns", str(args.columns)],
                              capture_output=True, text=True, timeout=600, env=env)
        if done.returncode != 0:
            print(f"first_use_probe.py: the {mode} process failed (exit {done.returncode}): "
                  f"{done.stderr.strip().splitlines()[-1] if done.stderr.strip() else 'no message'}", file=sys.stderr)
            return 1
        result.update(json.loads(done.stdout.strip().splitlines()[-1]))
    print(json.dumps({k: result[k] for k in ("cold", "warm", "rehearsal", "rehearsed", "attention_cold",
                                              "attention_warm", "attention_rehearsal", "attention_rehearsed")}, indent=1))
    if args.output is not None:
        from _report import write_json

        write_json(args.output, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
