"""Grouped vs per-expert loop inside llm-compressor's ``oneshot`` (GPTQ W4A16), on one device.

The shipped tiny qwen3_moe (4 layers, 16 experts), ``--samples`` x ``--seq-len`` calibration
tokens, ``DefuseModifier(grouped=False)`` then ``grouped=True`` for each routing mode. Every GPTQ
Hessian and sample count is captured right before its solve. Reports per mode: block calls
grouped / looped (and why), whether every module's sample count agrees, the largest relative
Hessian difference (Frobenius) over all modules and over layer 0's gate/up projections (the same
rows in both runs), the share of bit-identical Hessians and checkpoint tensors, and the logits of
the two checkpoints (cosine). The test suite checks the same on the CPU
(``tests/test_llmcompressor_grouped.py``); this script is for the GPU, where grouped_mm and the
per-expert matmuls may round differently, and runs from a source checkout (``PYTHONPATH=.``).

    python benchmarks/llmc_grouped_check.py --device cuda --output $OUT/llmc_grouped_cuda.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

from _args import names, whole

HERE = Path(__file__).resolve().parent
IGNORE = ["lm_head", "re:.*mlp.gate$"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from _source import use_source_checkout

    use_source_checkout()
    from defuser_quant.calibration.routing import ROUTING_MODES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--modes", type=names(ROUTING_MODES), default=["routed", "all"],
                   help="comma-separated routing modes (default routed,all)")
    p.add_argument("--samples", type=whole(1), default=16)
    p.add_argument("--seq-len", type=whole(1), default=64)
    p.add_argument("--output", type=Path, default=HERE / "results" / "llmc_grouped_check.json")
    return p.parse_args(argv)


def run(model_path, tokenizer, data, out: Path, routing: str, grouped: bool, device: str, seq_len: int) -> tuple[dict, object, float]:
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM

    import defuser_quant.integrations.llmcompressor as dq_llmc

    seen: dict = {}
    original = GPTQModifier.compress_modules

    def snapshot(self):
        for module, hessian in self._hessians.items():
            seen[self._module_names[module]] = (hessian.detach().float().cpu().clone(), float(self._num_samples[module]))
        return original(self)

    GPTQModifier.compress_modules = snapshot
    try:
        model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).to(device)
        defuse = dq_llmc.DefuseModifier(routing=routing, grouped=grouped)
        t0 = time.perf_counter()
        oneshot(model=model, processor=tokenizer, dataset=data, output_dir=str(out), num_calibration_samples=len(data),
                max_seq_length=seq_len, shuffle_calibration_samples=False,
                recipe=[defuse, GPTQModifier(targets="Linear", scheme="W4A16", ignore=IGNORE)])
        seconds = time.perf_counter() - t0
    finally:
        GPTQModifier.compress_modules = original
    return seen, defuse, seconds


def logits(path: Path, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
    with torch.no_grad():
        return model(torch.arange(64, device=device).reshape(1, 64)).logits.float().cpu()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)  # (it maps the source checkout's packages: use_source_checkout)
    import torch
    import transformers
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    from defuser_quant.assets import TINY_MOE_PATH
    from defuser_quant.calibration.data import CalibrationDataConfig, build_calibration_samples, to_hf_dataset

    tokenizer = AutoTokenizer.from_pretrained(TINY_MOE_PATH)
    data = to_hf_dataset(build_calibration_samples(CalibrationDataConfig(num_samples=args.samples, seq_len=args.seq_len), tokenizer))
    result = {"command": "python benchmarks/llmc_grouped_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "device": args.device, "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
              "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__},
              "modes": {}}
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for mode in args.modes:
            runs = {}
            for grouped in (False, True):
                out = Path(tmp) / f"{mode}-{'grouped' if grouped else 'loop'}"
                runs[grouped] = (*run(TINY_MOE_PATH, tokenizer, data, out, mode, grouped, args.device, args.seq_len), out)
            (loop, _, loop_s, loop_dir), (grouped, modifier, grouped_s, grouped_dir) = runs[False], runs[True]
            errors = {n: ((grouped[n][0] - h).norm() / h.norm().clamp_min(1e-30)).item() for n, (h, _) in loop.items() if n in grouped}
            layer0 = [e for n, e in errors.items() if n.startswith("model.layers.0.mlp.experts.") and not n.endswith("down_proj")]
            a, b = load_file(str(loop_dir / "model.safetensors")), load_file(str(grouped_dir / "model.safetensors"))
            x, y = logits(loop_dir, args.device), logits(grouped_dir, args.device)
            use = modifier.grouped_use
            row = {
                "oneshot_s": {"loop": round(loop_s, 2), "grouped": round(grouped_s, 2)},
                "block_calls": {"grouped": use.grouped, "loop": use.loop, "fallbacks": use.fallbacks},
                "modules": len(loop),
                "same_modules": sorted(loop) == sorted(grouped),
                "same_sample_counts": all(grouped.get(n, (None, -1))[1] == s for n, (_, s) in loop.items()),
                "hessian_rel_diff_max": max(errors.values()),
                "hessian_rel_diff_layer0_gate_up_max": max(layer0),
                "hessians_identical": f"{sum(torch.equal(grouped[n][0], h) for n, (h, _) in loop.items() if n in grouped)}/{len(loop)}",
                "checkpoint_tensors_identical": f"{sum(torch.equal(a[k], b[k]) for k in a if k in b)}/{len(a)}",
                "logits_cosine": round(torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0).item(), 6),
                "logits_max_abs_diff": round((x - y).abs().max().item(), 4),
            }
            row["ok"] = bool(row["same_modules"] and row["same_sample_counts"] and use.loop == 0 and use.grouped > 0
                             and row["hessian_rel_diff_max"] < 2e-2 and row["hessian_rel_diff_layer0_gate_up_max"] < 1e-5)
            ok &= row["ok"]
            result["modes"][mode] = row
            print(mode, json.dumps(row), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
