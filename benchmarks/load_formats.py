"""Loading quantized MoE checkpoints: ``defuser_quant.load`` vs ``GPTQModel.load`` vs stock Transformers.

For each checkpoint format the tiny shipped qwen3_moe is written in (real job runs: GPTQModel GPTQ
W4A16 and AWQ, llm-compressor GPTQ W4A16 pack-quantized and FP8_DYNAMIC, per-expert; the float model
per-expert and fused), every loader runs in its own fresh process (stock ``GPTQModel.load``
installs Defuser's class patch for the whole process) and records parameter+buffer bytes right
after loading and after one forward (compressed-tensors decompresses packed weights on the first
forward), whether the experts stayed quantized, the load report, and logits on fixed ids. The
table compares each loader's logits with ``defuser_quant.load``'s and with the float model's.

    .venv/bin/python benchmarks/load_formats.py          # ~3 minutes on 2 CPU cores
    .venv/bin/python benchmarks/load_formats.py --table  # the README/docs table from the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

HERE = Path(__file__).resolve().parent
IDS = list(range(1, 65))
JOBS = {  # format -> (backend, method, scheme)
    "gptq (GPTQModel)": ("gptqmodel", "gptq", "W4A16"),
    "awq gemm (GPTQModel)": ("gptqmodel", "awq", "W4A16"),
    "compressed-tensors pack-quantized W4A16 (llm-compressor)": ("llmcompressor", "gptq", "W4A16"),
    "compressed-tensors FP8 per-channel (llm-compressor)": ("llmcompressor", "rtn", "FP8_DYNAMIC"),
}


def _nbytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def worker(loader: str, path: str, out: str) -> None:
    """Load ``path`` with ``loader`` in this (fresh) process and save what the table needs."""
    import torch

    torch.set_num_threads(1)
    start = time.perf_counter()
    info = None
    if loader == "defuser_quant.load":
        import defuser_quant

        model = defuser_quant.load(path)
    elif loader == "GPTQModel.load":
        from gptqmodel import GPTQModel

        model = GPTQModel.load(path, device="cpu").model
    else:
        from transformers import AutoModelForCausalLM

        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True)
    seconds = time.perf_counter() - start
    from defuser_quant.loading.load import is_quantized_module

    after_load = _nbytes(model)
    experts = model.model.layers[0].mlp.experts
    projections = [m for n, m in model.named_modules()  # per-expert Linears (quantized or not), not act_fn
                   if ".mlp.experts." in n and any(hasattr(m, t) for t in ("weight", "qweight", "weight_packed"))]
    quantized = sum(is_quantized_module(m) for m in projections)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([IDS])).logits.float()
    torch.save({
        "load_s": seconds,
        "bytes_after_load": after_load,
        "bytes_after_forward": _nbytes(model),
        "experts_class": f"{type(experts).__module__}.{type(experts).__qualname__}",
        "experts": f"{quantized}/{len(projections)} per-expert projections quantized" if projections
        else f"fused {str(experts.gate_up_proj.dtype).removeprefix('torch.')}",
        "missing": len(info["missing_keys"]) if info else None,
        "unexpected": len(info["unexpected_keys"]) if info else None,
        "logits": logits,
    }, out)


def _run_worker(loader: str, path: Path, out: Path) -> dict | None:
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "PYTHONPATH": str(HERE.parent)}
    proc = subprocess.run([sys.executable, __file__, "--worker", loader, str(path), str(out)],
                          capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1][:300]}
    import torch

    return torch.load(out)


def _checkpoints(tmp: Path) -> dict[str, Path]:
    import torch
    from transformers import AutoModelForCausalLM

    from defuser_quant.assets import TINY_MOE_PATH
    from defuser_quant.jobs.config import parse_job_config
    from defuser_quant.jobs.runner import run_job
    from rich.console import Console

    paths = {"float per-expert": Path(TINY_MOE_PATH)}
    fused = tmp / "fused"
    AutoModelForCausalLM.from_pretrained(TINY_MOE_PATH, dtype=torch.bfloat16).save_pretrained(fused, save_original_format=False)
    paths["float fused"] = fused
    for name, (backend, method, scheme) in JOBS.items():
        out = tmp / backend / method / scheme
        run_job(parse_job_config({
            "model": {"path": "builtin:tiny-qwen3-moe"},
            "quantization": {"backend": backend, "method": method, "scheme": scheme},
            "calibration": {"data": {"num_samples": 8, "seq_len": 64}, "routing": "all", "min_tokens": 1},
            "output": {"dir": str(out), "layout": "per-expert"},
            "evaluation": {"enabled": False},
        }), console=Console(quiet=True))
        paths[name] = out
    return paths


def markdown_table(result: dict) -> str:
    """The docs/README table of a results JSON."""
    lines = [
        "| format | loader | MiB after load / forward | experts after load | unexpected keys | max abs logit diff vs `load` / vs float |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['format']} | {r['loader']} | error: {r['error']} | | | |")
            continue
        unexpected = "-" if r["load_report_unexpected"] is None else str(r["load_report_unexpected"])
        lines.append(
            f"| {r['format']} | {r['loader']} | {r['param_mib_after_load']} / {r['param_mib_after_forward']} | "
            f"{r['experts_after_load']} | {unexpected} | {r['max_abs_logit_diff_vs_defuser_quant_load']} / "
            f"{r['max_abs_logit_diff_vs_float_model']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=3, metavar=("LOADER", "CKPT", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--output", default=str(HERE / "results" / "load_formats_cpu.json"))
    parser.add_argument("--table", action="store_true", help="print the markdown table of --output and exit")
    args = parser.parse_args()
    if args.table:
        print(markdown_table(json.loads(Path(args.output).read_text())))
        return
    if args.worker:
        worker(*args.worker)
        return
    sys.path.insert(0, str(HERE))
    from _source import use_source_checkout

    use_source_checkout()
    rows = []
    reference = None  # logits of the float model loaded by stock Transformers
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for fmt, path in _checkpoints(tmp).items():
            loaders = ["defuser_quant.load", "stock Transformers"] + (["GPTQModel.load"] if "GPTQModel" in fmt else [])
            results = {name: _run_worker(name, path, tmp / f"{len(rows)}-{i}.pt") for i, name in enumerate(loaders)}
            ours = results["defuser_quant.load"]
            if reference is None:
                reference = results["stock Transformers"]["logits"]
            for name, r in results.items():
                row = {"format": fmt, "loader": name}
                if "error" in r:
                    rows.append({**row, "error": r["error"]})
                    continue
                rows.append({
                    **row,
                    "param_mib_after_load": round(r["bytes_after_load"] / 2**20, 2),
                    "param_mib_after_forward": round(r["bytes_after_forward"] / 2**20, 2),
                    "experts_class": r["experts_class"],
                    "experts_after_load": r["experts"],
                    "load_report_missing": r["missing"],
                    "load_report_unexpected": r["unexpected"],
                    "max_abs_logit_diff_vs_defuser_quant_load": (
                        None if "error" in ours else round(float((r["logits"] - ours["logits"]).abs().max()), 4)),
                    "max_abs_logit_diff_vs_float_model": round(float((r["logits"] - reference).abs().max()), 4),
                    "max_abs_logit": round(float(r["logits"].abs().max()), 2),
                    "load_s": round(r["load_s"], 2),
                })
    versions = {p: metadata.version(p) for p in ("torch", "transformers", "gptqmodel", "optimum", "llmcompressor", "compressed-tensors")}
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "versions": versions,
              "input_ids": f"1..{len(IDS)}", "rows": rows}
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_table(result))


if __name__ == "__main__":
    main()
