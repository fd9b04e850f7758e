"""Quantization quality on the shipped tiny trained MoE: routed-only vs all-experts calibration.

Held-out perplexity of the float model and of W4A16 GPTQ through each backend, calibrated with
routed tokens only or with every token through every expert, plus the number of experts that
got zero routed calibration tokens. Small calibration sets make starved experts visible.

    .venv/bin/python benchmarks/quality.py                 # ~3 minutes on 2 CPU cores
    .venv/bin/python benchmarks/quality.py --samples 32    # more calibration data
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import get_args

from _args import names, whole
from rich.console import Console

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from defuser_quant.jobs.config import Backend

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=whole(1), default=4, help="calibration samples (of --seq-len tokens)")
    parser.add_argument("--seq-len", type=whole(1), default=128)
    parser.add_argument("--eval-samples", type=whole(1), default=32)
    parser.add_argument("--backends", type=names(get_args(Backend)), default=["llmcompressor", "gptqmodel"],
                        help="comma-separated backends (default llmcompressor,gptqmodel)")
    parser.add_argument("--output", default=str(HERE / "results" / "quality_cpu.json"))
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()

    from defuser_quant.jobs.config import parse_job_config
    from defuser_quant.jobs.runner import run_job

    console = Console(quiet=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for backend in args.backends:
            for routing in ("routed", "all"):
                config = parse_job_config(
                    {
                        "model": {"path": "builtin:tiny-qwen3-moe", "dtype": "float32"},
                        "quantization": {"backend": backend, "method": "gptq", "scheme": "W4A16"},
                        "calibration": {
                            "data": {"num_samples": args.samples, "seq_len": args.seq_len, "seed": 0},
                            "routing": routing,
                            "min_tokens": 32,
                            "policy": "warn",
                        },
                        "output": {"dir": f"{tmp}/{backend}-{routing}"},
                        "evaluation": {
                            "data": {"split": "heldout", "num_samples": args.eval_samples, "seq_len": 256, "shuffle": False}
                        },
                    },
                    "quality",
                )
                report = run_job(config, console)
                r = report.result
                experts = [e for layer in r.coverage.layers for e in layer.experts]
                rows.append(
                    {
                        "backend": backend,
                        "routing": routing,
                        "ppl_float": r.ppl_before,
                        "ppl_w4a16": r.ppl_after,
                        "experts": len(experts),
                        "zero_routed": sum(1 for e in experts if e.routed == 0),
                        "min_calibrated": min(e.calibrated for e in experts),
                        "calibration_tokens": args.samples * args.seq_len,
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    print(f"\ntiny-qwen3-moe (4 layers x 16 experts, top-2), {args.samples} x {args.seq_len} calibration tokens, "
          f"held-out perplexity on {args.eval_samples} x 256 tokens\n")
    print("| backend | calibration routing | float ppl | W4A16 ppl | change | experts with 0 routed tokens | min tokens seen by an expert |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['backend']} | {r['routing']} | {r['ppl_float']:.2f} | {r['ppl_w4a16']:.2f} | "
              f"{100 * (r['ppl_w4a16'] / r['ppl_float'] - 1):+.2f}% | {r['zero_routed']} / {r['experts']} | {r['min_calibrated']} |")
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
