"""Loading quantized MoE checkpoints: ``defuser_quant.load`` vs ``GPTQModel.load`` vs stock Transformers.

For each checkpoint format the tiny shipped qwen3_moe is written in (real job runs: GPTQModel GPTQ
W4A16 and AWQ, llm-compressor GPTQ W4A16 pack-quantized and FP8_DYNAMIC, per-expert; the float model
per-expert and fused), every loader runs in its own fresh process (stock ``GPTQModel.load``
installs Defuser's class patch for the whole process) and records parameter+buffer bytes right
after loading and after one forward (compressed-tensors decompresses packed weights on the first
forward), whether the experts stayed quantized, the load report, and logits on fixed ids. The
table compares each loader's logits with ``defuser_quant.load``'s and with the float model's.

Fine-grained FP8 (Transformers' ``quant_method: fp8``) is written here with plain torch from the
float model (block 128, fused ``FP8Experts`` layout, and per-expert): on the CPU ``load`` refuses it
(no FP8 kernels) unless ``FineGrainedFP8Config(dequantize=True)`` is passed, and stock Transformers
loads its fused experts without their scales; ``--cuda`` runs those rows on a GPU, where ``load``
keeps the experts FP8, against stock Transformers' ``FP8Experts`` (its default grouped_mm forward
and its eager loop). Without the hub kernel ``kernels-community/finegrained-fp8`` (an offline GPU)
FP8 matmuls run through the plain-torch stand-in of ``tests/fp8_checkpoints.py``; the JSON says which.

    .venv/bin/python benchmarks/load_formats.py          # ~3 minutes on 2 CPU cores
    .venv/bin/python benchmarks/load_formats.py --only fine-grained   # just those rows, merged into the JSON
    python benchmarks/load_formats.py --cuda --output $OUT/load_formats_cuda.json   # GPU: FP8 rows
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
TESTS = HERE.parent / "tests"
IDS = list(range(1, 65))
FP8_FUSED = "fine-grained FP8 fused, block 128 (plain torch)"
FP8_PER_EXPERT = "fine-grained FP8 per-expert, block 128 (plain torch)"
DEQUANTIZE = "defuser_quant.load (dequantize=True)"
EAGER = "stock Transformers (eager experts)"
JOBS = {  # format -> (backend, method, scheme)
    "gptq (GPTQModel)": ("gptqmodel", "gptq", "W4A16"),
    "awq gemm (GPTQModel)": ("gptqmodel", "awq", "W4A16"),
    "compressed-tensors pack-quantized W4A16 (llm-compressor)": ("llmcompressor", "gptq", "W4A16"),
    "compressed-tensors FP8 per-channel (llm-compressor)": ("llmcompressor", "rtn", "FP8_DYNAMIC"),
}


def _nbytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _fp8_kernel() -> str:
    """Transformers' FP8 hub kernel, or the plain-torch stand-in installed where it cannot be fetched."""
    sys.path.insert(0, str(TESTS))
    from fp8_checkpoints import hub_fp8_kernel_available, torch_fp8_kernels

    if hub_fp8_kernel_available():
        return "hub kernels-community/finegrained-fp8"
    torch_fp8_kernels().__enter__()  # for the rest of this worker process
    return "plain-torch stand-in (tests/fp8_checkpoints.py): hub kernel unavailable"


def worker(loader: str, path: str, out: str, device: str = "cpu") -> None:
    """Load ``path`` with ``loader`` in this (fresh) process and save what the table needs."""
    import torch

    torch.set_num_threads(1)
    placement = {"device_map": device} if device != "cpu" else {}
    start = time.perf_counter()
    info = None
    if loader == "defuser_quant.load":
        import defuser_quant

        model = defuser_quant.load(path, **placement)
    elif loader == DEQUANTIZE:
        import defuser_quant
        from transformers import FineGrainedFP8Config

        model = defuser_quant.load(path, quantization_config=FineGrainedFP8Config(dequantize=True), **placement)
    elif loader == "GPTQModel.load":
        from gptqmodel import GPTQModel

        model = GPTQModel.load(path, device="cpu").model
    else:
        from transformers import AutoModelForCausalLM

        extra = {"experts_implementation": "eager"} if loader == EAGER else {}
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **placement, **extra)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else None
    fp8 = any(p.dtype == torch.float8_e4m3fn for p in model.parameters())
    kernel = _fp8_kernel() if fp8 else None
    from defuser_quant.loading.load import is_quantized_module

    after_load = _nbytes(model)
    experts = model.model.layers[0].mlp.experts
    projections = [m for n, m in model.named_modules()  # per-expert Linears (quantized or not), not act_fn
                   if ".mlp.experts." in n and any(hasattr(m, t) for t in ("weight", "qweight", "weight_packed"))]
    quantized = sum(is_quantized_module(m) for m in projections)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([IDS], device=device)).logits.float().cpu()
    torch.save({
        "device": device,
        "cuda_peak_bytes_load": peak,
        "fp8_kernel": kernel,
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


def _run_worker(loader: str, path: Path, out: Path, device: str = "cpu") -> dict | None:
    pythonpath = os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "GPTQMODEL_CPU_WORKERS": "2", "PYTHONPATH": pythonpath, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, __file__, "--worker", loader, str(path), str(out), device],
                          capture_output=True, text=True, env=env, timeout=900)
    print(f"{loader} on {path.name}: exit {proc.returncode} in {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1][:300]}
    import torch

    return torch.load(out)


def _checkpoints(tmp: Path, only: str | None = None) -> dict[str, Path]:
    """Every format's checkpoint (``only``: the float reference and the formats whose name contains it)."""
    import torch
    from transformers import AutoModelForCausalLM

    from defuser_quant.assets import TINY_MOE_PATH

    sys.path.insert(0, str(TESTS))
    from fp8_checkpoints import write_fused_fp8

    wanted = lambda name: only is None or only.lower() in name.lower()  # noqa: E731
    paths = {"float per-expert": Path(TINY_MOE_PATH)}
    if wanted("float fused"):
        fused = tmp / "fused"
        AutoModelForCausalLM.from_pretrained(TINY_MOE_PATH, dtype=torch.bfloat16).save_pretrained(fused, save_original_format=False)
        paths["float fused"] = fused
    for name, per_expert in ((FP8_FUSED, False), (FP8_PER_EXPERT, True)):
        if wanted(name):
            paths[name] = write_fused_fp8(Path(TINY_MOE_PATH), tmp / name.split(",")[0].replace(" ", "-"),
                                          block=(128, 128), per_expert=per_expert)
    if not any(wanted(name) for name in JOBS):
        return paths
    from defuser_quant.jobs.config import parse_job_config
    from defuser_quant.jobs.runner import run_job
    from rich.console import Console

    for name, (backend, method, scheme) in JOBS.items():
        if not wanted(name):
            continue
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


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


def _short_error(text: str) -> str:
    """``pkg.mod.SomeError: /tmp/x/ckpt: what; what to do`` -> ``SomeError: what``."""
    kind, _, message = text.partition(": ")
    message = message.split(": ", 1)[1] if message.startswith("/") and ": " in message else message
    return f"{kind.rsplit('.', 1)[-1]}: {message.split('; ')[0]}".replace("|", "/")


def markdown_table(result: dict) -> str:
    """The docs/README table of a results JSON."""
    lines = [
        "| format | loader | MiB after load / forward | experts after load | unexpected keys | max abs logit diff vs `load` / vs float |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['format']} | {r['loader']} | {_short_error(r['error'])} | | | |")
            continue
        unexpected = "-" if r["load_report_unexpected"] is None else str(r["load_report_unexpected"])
        lines.append(
            f"| {r['format']} | {r['loader']} | {r['param_mib_after_load']} / {r['param_mib_after_forward']} | "
            f"{r['experts_after_load']} | {unexpected} | {_or_dash(r['max_abs_logit_diff_vs_defuser_quant_load'])} / "
            f"{r['max_abs_logit_diff_vs_float_model']} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=4, metavar=("LOADER", "CKPT", "OUT", "DEVICE"), help=argparse.SUPPRESS)
    parser.add_argument("--output", default=None,
                        help="results JSON (default: benchmarks/results/load_formats_cpu.json, or _cuda.json with --cuda)")
    parser.add_argument("--table", action="store_true", help="print the markdown table of --output and exit")
    parser.add_argument("--only", default=None, metavar="TEXT",
                        help="run only the formats whose name contains TEXT (and the float reference); their rows "
                             "replace those of the same format in an existing --output")
    parser.add_argument("--cuda", action="store_true",
                        help="GPU run of the fine-grained FP8 rows (loaders on device_map='cuda'); exit 1 when a check fails")
    args = parser.parse_args()
    output = Path(args.output or HERE / "results" / f"load_formats_{'cuda' if args.cuda else 'cpu'}.json")
    if args.table:
        print(markdown_table(json.loads(output.read_text())))
        return
    if args.worker:
        worker(*args.worker)
        return
    sys.path.insert(0, str(HERE))
    from _source import use_source_checkout

    use_source_checkout()
    if args.cuda:
        sys.exit(cuda_main(output))
    rows = _measure(args.only, "cpu")
    if args.only and output.exists():  # merge: rows of a re-run format replace its old ones in place
        new_rows = {}
        for r in rows:
            new_rows.setdefault(r["format"], []).append(r)
        merged = []
        for r in json.loads(output.read_text())["rows"]:
            if r["format"] not in new_rows:
                merged.append(r)
            elif r["format"] not in {m["format"] for m in merged}:
                merged += new_rows[r["format"]]
        rows = merged + [r for fmt, group in new_rows.items() if fmt not in {m["format"] for m in merged} for r in group]
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs", "versions": _versions(),
              "input_ids": f"1..{len(IDS)}", "rows": rows}
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_table(result))


def _versions() -> dict[str, str | None]:
    found = {}
    for package in ("torch", "transformers", "gptqmodel", "optimum", "llmcompressor", "compressed-tensors"):
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = None
    return found


def _loaders(fmt: str, device: str) -> list[str]:
    if fmt.startswith("fine-grained FP8"):
        return ["defuser_quant.load", "stock Transformers"] + ([EAGER] if device == "cuda" else []) + [DEQUANTIZE]
    return ["defuser_quant.load", "stock Transformers"] + (["GPTQModel.load"] if "GPTQModel" in fmt else [])


def _measure(only: str | None, device: str) -> list[dict]:
    rows = []
    reference = None  # logits of the float model loaded by stock Transformers
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        for fmt, path in _checkpoints(tmp, only).items():
            if fmt == "float per-expert" and only is not None and only.lower() not in fmt:
                reference = _run_worker("stock Transformers", path, tmp / "reference.pt", device)["logits"]
                continue
            loaders = _loaders(fmt, device)
            results = {name: _run_worker(name, path, tmp / f"{len(rows)}-{i}.pt", device) for i, name in enumerate(loaders)}
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
                    **({"device": r["device"]} if r.get("device", "cpu") != "cpu" else {}),
                    **({"cuda_peak_mib_load": round(r["cuda_peak_bytes_load"] / 2**20, 2)} if r.get("cuda_peak_bytes_load") else {}),
                    **({"fp8_kernel": r["fp8_kernel"]} if r.get("fp8_kernel") else {}),
                })
    return rows


def cuda_main(output: Path) -> int:
    """The FP8 rows on the GPU, with the checks the README states; 0 when they hold."""
    import torch

    if not torch.cuda.is_available():
        print("--cuda needs a CUDA device", file=sys.stderr)
        return 2
    rows = _measure("fine-grained FP8", "cuda")
    by = {(r["format"], r["loader"]): r for r in rows}
    checks = {}
    for fmt in (FP8_FUSED, FP8_PER_EXPERT):
        ours, stock = by.get((fmt, "defuser_quant.load"), {}), by.get((fmt, "stock Transformers"), {})
        checks[fmt] = {
            "experts kept FP8 (192/192 per-expert FP8 projections)": ours.get("experts_after_load", "").startswith("192/192"),
            "parameter MiB equal to stock FP8Experts": "error" not in ours and ours.get("param_mib_after_load") == stock.get("param_mib_after_load"),
            "logits vs stock (grouped_mm and eager) max abs diff <= 2% of max logit": all(
                "error" not in by.get((fmt, name), {"error": 1})
                and by[(fmt, name)]["max_abs_logit_diff_vs_defuser_quant_load"] <= 0.02 * ours.get("max_abs_logit", 0)
                for name in ("stock Transformers", EAGER)),
            "dequantize=True loads float experts": by.get((fmt, DEQUANTIZE), {}).get("experts_after_load", "").startswith("0/192"),
        }
    ok = all(all(c.values()) for c in checks.values())
    result = {"machine": torch.cuda.get_device_name(), "versions": _versions(), "input_ids": f"1..{len(IDS)}",
              "rows": rows, "checks": checks, "ok": ok}
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown_table(result))
    print(json.dumps({"checks": checks, "ok": ok}, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    main()
