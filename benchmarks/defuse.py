"""Defuse speed and memory: defuser-quant vs Defuser vs llm-compressor, side by side.

Two decoder layers of Qwen3-30B-A3B shape (128 experts, hidden 2048, moe_intermediate 768,
bf16: 2.25 GiB of expert weights). Each tool runs in its own fresh subprocess on an identical
model, so one tool's allocations never flatter another's. As after ``from_pretrained``,
Transformers' checkpoint conversion table is already built when the timer starts.

    .venv/bin/python benchmarks/defuse.py            # full shape (needs ~8 GiB RAM)
    .venv/bin/python benchmarks/defuse.py --small    # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOOLS = ("defuser_quant", "defuser", "llmcompressor")


def build_model(args):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=1024, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.intermediate, num_experts=args.experts, num_experts_per_tok=8,
        num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    )
    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(config)
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():  # touch every page so RSS is real before measuring
            p.normal_(0, 0.02, generator=gen)
    # from_pretrained builds Transformers' checkpoint conversion table before any tool runs;
    # a model built from a config has not, so build it here for every tool alike.
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    get_checkpoint_conversion_mapping(config.model_type)
    expert_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "experts" in n)
    return model, expert_bytes


def run_one(tool: str, args) -> dict:
    import gc

    import torch

    sys.path.insert(0, str(HERE))
    from _memory import measure

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, expert_bytes = build_model(args)
    gc.collect()
    if tool == "defuser_quant":
        import defuser_quant

        convert = lambda: defuser_quant.convert_model(model)  # noqa: E731
    elif tool == "defuser":
        import defuser

        convert = lambda: defuser.convert_model(model)  # noqa: E731
    else:
        from llmcompressor.modeling.moe.linearize import linearize_moe

        convert = lambda: linearize_moe(model)  # noqa: E731
    _, m = measure(convert)
    linears = sum(1 for n, mod in model.named_modules() if "experts." in n and isinstance(mod, torch.nn.Linear))
    return {"tool": tool, "seconds": m.seconds, "extra_peak_bytes": m.extra_bytes, "expert_bytes": expert_bytes,
            "expert_linears": linears}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--small", action="store_true", help="8 experts, hidden 256: a smoke run")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool (best time is reported)")
    parser.add_argument("--output", default=str(HERE / "results" / "defuse_cpu.json"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small:
        args.experts, args.hidden, args.intermediate = 8, 256, 128
    if args.worker:
        print(json.dumps(run_one(args.worker, args)))
        return
    rows = []
    for tool in args.tools.split(","):
        best = None
        for _ in range(args.repeat):
            cmd = [sys.executable, __file__, "--worker", tool, "--layers", str(args.layers), "--experts", str(args.experts),
                   "--hidden", str(args.hidden), "--intermediate", str(args.intermediate)]
            env = {**os.environ, "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{tool} failed")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            if best is None or row["seconds"] < best["seconds"]:
                best = row
        rows.append(best)
    ours = next(r for r in rows if r["tool"] == "defuser_quant")
    gib = 1024**3
    print(f"\n{args.layers} layers, {args.experts} experts, hidden {args.hidden}, moe_intermediate {args.intermediate}, bf16: "
          f"{ours['expert_bytes'] / gib:.2f} GiB of expert weights; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores\n")
    print("| tool | wall time (s) | extra peak RSS (MiB) | extra peak / expert bytes | time vs defuser-quant |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tool']} | {r['seconds']:.4f} | {r['extra_peak_bytes'] / 2**20:.1f} | "
              f"{100 * r['extra_peak_bytes'] / r['expert_bytes']:.2f}% | {r['seconds'] / ours['seconds']:.1f}x |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
