"""Defuse speed and memory: defuser-quant vs Defuser vs llm-compressor, side by side.

Two decoder layers of Qwen3-30B-A3B shape (128 experts, hidden 2048, moe_intermediate 768,
bf16: 2.25 GiB of expert weights). Each tool runs in its own fresh subprocess on an identical
model, so one tool's allocations never flatter another's. As after ``from_pretrained``,
Transformers' checkpoint conversion table is already built when the timer starts.

After each tool's conversion, the worker times a forward pass of ``--forward-tokens`` tokens
through the converted model (median of ``--forward-repeats``) and compares its logits with those
of the fused model run with Transformers' eager experts loop (a separate ``fused`` worker, which
also times the fused model with its default experts implementation, ``grouped_mm``).

    .venv/bin/python benchmarks/defuse.py            # full shape (needs ~8 GiB RAM)
    .venv/bin/python benchmarks/defuse.py --small    # quick smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOOLS = ("defuser_quant", "defuser", "llmcompressor")
#: experts each token picks (build_model's num_experts_per_tok): --experts must reach it
TOP_K = 8


def build_model(args):
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=1024, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.intermediate, num_experts=args.experts, num_experts_per_tok=TOP_K,
        num_hidden_layers=args.layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        dtype="bfloat16",  # as from_pretrained of a bf16 checkpoint sets it (llm-compressor sizes its Linears by it)
    )
    from transformers.initialization import no_init_weights

    # Built on the CPU without weight init (random weights come below); buffers such as the rotary
    # inv_freq are computed as usual, so every worker process builds the identical model.
    with no_init_weights():
        model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
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


def forward_timing(model, args) -> tuple[float, "torch.Tensor"]:
    """Median seconds of a forward of ``args.forward_tokens`` tokens, and its logits."""
    import torch

    ids = torch.randint(0, 1024, (1, args.forward_tokens), generator=torch.Generator().manual_seed(1))
    times, logits = [], None
    with torch.no_grad():
        model(ids[:, :8])  # warm-up
        for _ in range(args.forward_repeats):
            t0 = time.perf_counter()
            logits = model(ids).logits
            times.append(time.perf_counter() - t0)
    return statistics.median(times), logits.float()


def run_fused(args) -> dict:
    """The fused reference: eager logits (saved for the tools to compare) and both timings."""
    import torch

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, expert_bytes = build_model(args)
    default = model.config._experts_implementation
    default_s, _ = forward_timing(model, args)
    model.set_experts_implementation("eager")
    eager_s, logits = forward_timing(model, args)
    torch.save(logits, args.reference)
    return {"tool": "fused", "default_experts_implementation": default, "forward_s": default_s,
            "eager_forward_s": eager_s, "expert_bytes": expert_bytes}


def run_one(tool: str, args) -> dict:
    import gc

    import torch

    sys.path.insert(0, str(HERE))
    from _memory import measure

    if tool == "fused":
        return run_fused(args)
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
    row = {"tool": tool, "seconds": m.seconds, "extra_peak_bytes": m.extra_bytes, "expert_bytes": expert_bytes,
           "expert_linears": linears}
    if args.forward_tokens:
        row["forward_s"], logits = forward_timing(model, args)
        reference = torch.load(args.reference)
        row["logits_max_abs_diff"] = (logits - reference).abs().max().item()
        row["logits_equal_fused_eager"] = bool(torch.equal(logits, reference))
    return row


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from _args import whole  # beside this script, on sys.path when it runs (or is imported by the tests)

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=whole(1), default=2)
    parser.add_argument("--experts", type=whole(1), default=128, help=f"experts per layer (at least {TOP_K}: each token picks {TOP_K})")
    parser.add_argument("--hidden", type=whole(1), default=2048)
    parser.add_argument("--intermediate", type=whole(1), default=768)
    parser.add_argument("--small", action="store_true", help="8 experts, hidden 256: a smoke run")
    parser.add_argument("--tools", default=",".join(TOOLS))
    parser.add_argument("--repeat", type=whole(1), default=1, help="runs per tool (best time is reported)")
    parser.add_argument("--forward-tokens", type=whole(0), default=256, help="tokens of the timed forward (0: skip)")
    parser.add_argument("--forward-repeats", type=whole(1), default=3)
    parser.add_argument("--output", default=str(HERE / "results" / "defuse_cpu.json"))
    parser.add_argument("--reference", help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.small:
        args.experts, args.hidden, args.intermediate = 8, 256, 128
    if args.experts < TOP_K:
        parser.error(f"--experts {args.experts} is fewer than the {TOP_K} experts each token picks (num_experts_per_tok)")
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(run_one(args.worker, args)))
        return
    rows = []
    reference = Path(tempfile.mkdtemp(prefix="defuse_bench_")) / "fused_eager_logits.pt"
    tools = (["fused"] if args.forward_tokens else []) + args.tools.split(",")
    for tool in tools:
        best = None
        for _ in range(1 if tool == "fused" else args.repeat):
            cmd = [sys.executable, __file__, "--worker", tool, "--layers", str(args.layers), "--experts", str(args.experts),
                   "--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
                   "--forward-tokens", str(args.forward_tokens), "--forward-repeats", str(args.forward_repeats),
                   "--reference", str(reference)]
            env = {**os.environ, "PYTHONWARNINGS": "ignore", "TRANSFORMERS_VERBOSITY": "error"}
            out = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if out.returncode != 0:
                print(out.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{tool} failed")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            if best is None or row.get("seconds", 0) < best.get("seconds", 0):
                best = row
        rows.append(best)
    fused = next((r for r in rows if r["tool"] == "fused"), None)
    rows = [r for r in rows if r["tool"] != "fused"]
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
    if fused is not None:
        tokens = args.forward_tokens
        print(f"\nforward of {tokens} tokens after conversion (median of {args.forward_repeats}); logits vs the fused "
              "model's eager experts loop\n")
        print("| model | forward (s) | tokens/s | vs fused eager | logits max abs diff | logits identical |")
        print("|---|---:|---:|---:|---:|---|")
        print(f"| fused, eager | {fused['eager_forward_s']:.3f} | {tokens / fused['eager_forward_s']:,.0f} | 1.00x | 0 | yes |")
        print(f"| fused, {fused['default_experts_implementation']} | {fused['forward_s']:.3f} | "
              f"{tokens / fused['forward_s']:,.0f} | {fused['eager_forward_s'] / fused['forward_s']:.2f}x | - | - |")
        for r in rows:
            print(f"| {r['tool']} | {r['forward_s']:.3f} | {tokens / r['forward_s']:,.0f} | "
                  f"{fused['eager_forward_s'] / r['forward_s']:.2f}x | {r['logits_max_abs_diff']:.3g} | "
                  f"{'yes' if r['logits_equal_fused_eager'] else 'no'} |")
    reference.unlink(missing_ok=True)
    reference.parent.rmdir()
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"args": vars(args), "fused": fused, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
