"""Calibration forward throughput: every routing mode of a defused model vs the fused model.

A random qwen3_moe (shape from the flags) runs one calibration pass (``--batches`` batches of
``--batch-size`` x ``--seq-len`` tokens, under ``torch.no_grad()``) per measurement:

* ``fused/eager`` and ``fused/<default>``: the native fused model with the eager experts loop
  and with Transformers' default experts implementation (``grouped_mm`` where it dispatches);
* ``defused``: after ``convert_model``, no override;
* ``routed`` / ``budgeted`` / ``all``: inside ``routing_mode`` (one context per pass, as in a
  real calibration run), with a ``CoverageTracker`` attached.

Each row reports tokens/second (median of ``--repeats`` passes after one warm-up pass; rows are
timed round-robin), the ratio to fused eager, forced tokens per pass, and whether the logits
equal the defused model's (``torch.equal``). Prints a markdown table and writes JSON.

Runs with the package installed (``pip install -e .``) or from a source checkout on ``PYTHONPATH``.

    .venv/bin/python benchmarks/calibration_throughput.py --threads 1        # CPU, < 1 min on 2 cores
    .venv/bin/python benchmarks/calibration_throughput.py --device cuda --experts 128 --top-k 8 \\
        --hidden 2048 --intermediate 768 --layers 4 --batch-size 8 --seq-len 512
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="auto: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--intermediate", type=int, default=256, help="moe_intermediate_size")
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--top-k", type=int, default=4)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--vocab", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batches", type=int, default=2, help="batches per calibration pass")
    p.add_argument("--repeats", type=int, default=3, help="timed passes per row (median)")
    p.add_argument("--min-tokens", type=int, default=None, help="budgeted floor (default: 2x the mean routed tokens per expert per pass)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default benchmarks/results/calibration_throughput_<device>.json)")
    return p.parse_args(argv)


def build_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
        moe_intermediate_size=args.intermediate, num_experts=args.experts, num_experts_per_tok=args.top_k,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=max(args.seq_len, 128),
    )
    with torch.device(device):
        model = Qwen3MoeForCausalLM(config)  # real init, so buffers (rotary inv_freq) are right
    model = model.to(dtype).eval()
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).to(dtype) * 0.05)
    return model


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_pass(model: torch.nn.Module, batches: list[torch.Tensor], context: Callable[[], object]) -> tuple[float, object, torch.Tensor]:
    """One calibration pass; returns (seconds, whatever the context yielded, last logits)."""
    device = batches[0].device
    synchronize(device)
    start = time.perf_counter()
    with torch.no_grad(), context() as state:
        for ids in batches:
            out = model(ids).logits
    synchronize(device)
    return time.perf_counter() - start, state, out


def measure_all(rows_spec: list, batches: list[torch.Tensor], repeats: int) -> list[tuple[float, object, torch.Tensor, float | None]]:
    """Warm up every row, then time the rows round-robin so background load hits them alike.

    Returns per row: (median seconds, the last pass's context state, its logits, peak GiB on CUDA).
    """
    device = batches[0].device
    peaks: list[float | None] = []
    for _, _, model, context in rows_spec:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        run_pass(model, batches, context)
        peaks.append(torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None)
    runs: list[list] = [[] for _ in rows_spec]
    for _ in range(repeats):
        for i, (_, _, model, context) in enumerate(rows_spec):
            runs[i].append(run_pass(model, batches, context))
    return [(statistics.median(r[0] for r in rs), rs[-1][1], rs[-1][2], peak) for rs, peak in zip(runs, peaks)]


def main(argv: list[str] | None = None) -> dict:
    import transformers

    import sys

    sys.path.insert(0, str(HERE))
    from _source import use_source_checkout

    use_source_checkout()  # a plain checkout on PYTHONPATH works too (the GPU machine's case)
    from defuser_quant import convert_model
    from defuser_quant.calibration import CoverageTracker, routing_mode

    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    tokens_per_pass = args.batches * args.batch_size * args.seq_len
    mean_routed = tokens_per_pass * args.top_k / args.experts
    min_tokens = args.min_tokens if args.min_tokens is not None else int(2 * mean_routed)

    fused = build_model(args, device, dtype)
    default_impl = fused.config._experts_implementation
    defused = copy.deepcopy(fused)
    report = convert_model(defused)
    gen = torch.Generator(device="cpu").manual_seed(1)
    batches = [torch.randint(0, args.vocab, (args.batch_size, args.seq_len), generator=gen).to(device) for _ in range(args.batches)]

    def fused_with(impl: str):
        def context():
            fused.set_experts_implementation(impl)
            return nullcontext()
        return context

    def mode(name: str):
        @contextmanager
        def context():
            with CoverageTracker(defused, min_tokens=min_tokens), routing_mode(defused, name, min_tokens=min_tokens) as session:
                yield session
        return context

    rows_spec = [("fused", "eager", fused, fused_with("eager"))]
    if default_impl != "eager":
        rows_spec.append(("fused", default_impl, fused, fused_with(default_impl)))
    rows_spec += [("defused", "no override", defused, nullcontext)]
    rows_spec += [("defused", m, defused, mode(m)) for m in ("routed", "budgeted", "all")]

    rows, reference = [], None
    for (model_kind, variant, model, _), (seconds, state, logits, peak) in zip(rows_spec, measure_all(rows_spec, batches, args.repeats)):
        if model is defused and reference is None:
            reference = logits
        forced = sum(int(c.forced.sum()) for c in state.counts.values()) if hasattr(state, "counts") else 0
        row = {
            "model": model_kind,
            "variant": variant,
            "seconds_per_pass": seconds,
            "tokens_per_second": tokens_per_pass / seconds,
            "forced_tokens_per_pass": forced,
            "exact_vs_defused": None if model is fused else bool(torch.equal(logits, reference)),
        }
        if peak is not None:
            row["peak_memory_gib"] = peak
        rows.append(row)
    base = rows[0]["tokens_per_second"]
    for row in rows:
        row["vs_fused_eager"] = row["tokens_per_second"] / base

    result = {
        "benchmark": "calibration_throughput",
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "torch_threads": torch.get_num_threads(),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "default_experts_implementation": default_impl,
        "shape": {
            "hidden": args.hidden, "moe_intermediate": args.intermediate, "experts": args.experts, "top_k": args.top_k,
            "layers": args.layers, "heads": args.heads, "kv_heads": args.kv_heads, "head_dim": args.head_dim, "vocab": args.vocab,
        },
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "batches_per_pass": args.batches,
        "tokens_per_pass": tokens_per_pass,
        "repeats": args.repeats,
        "min_tokens": min_tokens,
        "defused_blocks": len(report.converted),
        "rows": rows,
    }
    output = args.output or HERE / "results" / f"calibration_throughput_{device.type}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nwritten {output}")
    return result


def markdown(result: dict) -> str:
    s = result["shape"]
    lines = [
        f"qwen3_moe {s['layers']} layers, hidden {s['hidden']}, {s['experts']} experts top-{s['top_k']}, "
        f"moe_intermediate {s['moe_intermediate']}, {result['dtype']} on {result['device']} ({result['torch_threads']} threads); "
        f"{result['tokens_per_pass']} tokens per pass, budgeted min_tokens={result['min_tokens']}",
        "",
        "| model | variant | tokens/s | vs fused eager | forced tokens/pass | logits == defused |",
        "|---|---|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        exact = "-" if r["exact_vs_defused"] is None else ("yes" if r["exact_vs_defused"] else "NO")
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['tokens_per_second']:,.0f} | {r['vs_fused_eager']:.2f}x | "
            f"{r['forced_tokens_per_pass']:,} | {exact} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
