"""llm-compressor on 1 vs N GPUs (torchrun, NCCL): stock recipe vs DefuseModifier routed / all.

Builds the random qwen3_moe of ``gptqmodel_gpu.py`` (Qwen3-30B-A3B layers: 128 experts, hidden
2048, moe_intermediate 768, top-8; bf16; default 2 layers) and calibration rows from the bundled
corpus (default 128 x 256 tokens), then runs GPTQ W4A16 (group 128) with ``oneshot`` for each
variant, once in one process and once under ``torchrun --nproc-per-node N`` (one GPU each):

* ``stock``  - llm-compressor 0.14 as shipped (its own MoE linearization, all experts calibrated:
               ``oneshot``'s default ``moe_calibrate_all_experts``); our integration is not imported;
* ``routed`` - ``DefuseModifier(routing="routed")`` first in the recipe;
* ``all``    - ``DefuseModifier(routing="all")``.

Every rank gets its own slice of the calibration rows (``calibration.distributed.rank_share``;
llm-compressor 0.14 itself would give every rank the first 1/N of an identical dataset). Each
run in its own process group: wall time of ``oneshot`` (calibrate + quantize + save),
``torch.cuda.max_memory_allocated`` per GPU, and for our variants the coverage totals every rank
computed (they must agree and equal the one-process totals). The N-process checkpoint is compared
with the one-process one (logits on a fixed prompt: cosine and max difference). Prints a markdown
table (speed-up = 1-process time / N-process time) and writes JSON with the command line under
``benchmarks/results/`` (default ``distributed_cuda.json``).

    python benchmarks/distributed_gpu.py                        # 2 GPUs, 2 layers, all variants
    python benchmarks/distributed_gpu.py --variants stock,routed --layers 1
    .venv/bin/python benchmarks/distributed_gpu.py --device cpu --tiny   # gloo smoke run, 2 CPU processes

Needs llmcompressor==0.14.0.1 (with compressed-tensors==0.19.0, transformers<=5.17) and this
package importable (``pip install -e .``, or ``PYTHONPATH=.`` from a source checkout). Budget on
2 x H200 at the default shape: about 1 minute per run, 6 runs plus the model build.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from gptqmodel_gpu import add_shape_args  # the same model shape flags (this folder is on sys.path)

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VARIANTS = ("stock", "routed", "all")
TINY = dict(layers=2, experts=8, hidden=128, intermediate=128, top_k=2, heads=4, kv_heads=2, head_dim=32, vocab=1024,
            samples=16, seq_len=64)
IGNORE = ["lm_head", "re:.*mlp.gate$"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny shape for a CPU smoke run: " + json.dumps(TINY))
    p.add_argument("--nproc", type=int, default=2, help="processes of the distributed runs (one GPU each)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS}")
    p.add_argument("--layers", type=int, default=2)
    add_shape_args(p)
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir, removed)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per run")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default benchmarks/results/distributed_<device>[_tiny].json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    return args


def _env() -> dict[str, str]:
    env = {**os.environ, "LLM_COMPRESSOR_LOG_LEVEL": os.environ.get("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ----- parent -----------------------------------------------------------------------------------
def run_one(variant: str, nproc: int, args: argparse.Namespace, work: Path) -> dict:
    """One ``oneshot`` of ``variant`` in ``nproc`` processes; the ranks' results merged."""
    out = work / f"{variant}-n{nproc}"
    out.mkdir(exist_ok=True)
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [sys.executable, *launcher, str(Path(__file__).resolve()), "--worker", variant, "--workdir", str(work),
           "--device", args.device, "--output", str(out), "--seq-len", str(args.seq_len)]
    row: dict = {"variant": variant, "nproc": nproc}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timeout after {args.timeout}s"}
    (work / f"{variant}-n{nproc}.log").write_text(proc.stdout + proc.stderr)
    ranks = sorted(out.glob("rank*.json"))
    if proc.returncode != 0 or len(ranks) != nproc:
        return {**row, "error": f"exit {proc.returncode}", "log_tail": (proc.stdout + proc.stderr)[-3000:]}
    results = [json.loads(p.read_text()) for p in ranks]
    coverages = [r["coverage_totals"] for r in results]
    row.update(
        process_s=round(time.perf_counter() - t0, 1),
        oneshot_s=round(max(r["oneshot_s"] for r in results), 1),
        peak_gpu_gib=[None if r["peak_gpu_bytes"] is None else round(r["peak_gpu_bytes"] / 2**30, 2) for r in results],
        coverage_totals=coverages[0],
        coverage_same_on_every_rank=all(c == coverages[0] for c in coverages),
        checkpoint=str(out / "checkpoint"),
    )
    return row


def compare_logits(a: Path, b: Path, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.arange(64).reshape(1, 64)
    logits = []
    for path in (a, b):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
        with torch.no_grad():
            logits.append(model(ids.to(device) % model.config.vocab_size).logits.float().cpu())
        del model
    x, y = logits
    return {"cosine": round(torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0).item(), 6),
            "max_abs_diff": round((x - y).abs().max().item(), 4)}


def markdown(rows: list[dict], nproc: int) -> str:
    lines = [f"| recipe | 1 process (s) | {nproc} processes (s) | speed-up | peak GPU memory per GPU (GiB) | routed tokens 1 -> {nproc} | logits cos |",
             "|---|---:|---:|---:|---|---|---:|"]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        one = next((r for r in rows if r["variant"] == variant and r["nproc"] == 1), {})
        many = next((r for r in rows if r["variant"] == variant and r["nproc"] == nproc), {})
        if "error" in one or "error" in many or not one or not many:
            lines.append(f"| {variant} | error: {one.get('error') or many.get('error')} | | | | | |")
            continue
        routed = [r["coverage_totals"]["routed_tokens"] if r["coverage_totals"] else "-" for r in (one, many)]
        lines.append(
            f"| {variant} | {one['oneshot_s']:.1f} | {many['oneshot_s']:.1f} | {one['oneshot_s'] / many['oneshot_s']:.2f}x | "
            f"{one['peak_gpu_gib'][0]} -> {' / '.join(map(str, many['peak_gpu_gib']))} | {routed[0]} -> {routed[1]} | "
            f"{many.get('logits_vs_1_process', {}).get('cosine', '-')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    import shutil
    import tempfile

    import torch

    sys.path.insert(0, str(HERE))
    from gptqmodel_gpu import build_source  # the same model and calibration rows

    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {VARIANTS}")
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        raise SystemExit(f"--nproc {args.nproc} needs {args.nproc} GPUs; {torch.cuda.device_count()} visible")
    out = args.output or HERE / "results" / f"distributed_{args.device}{'_tiny' if args.tiny else ''}.json"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dq-distributed-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        rows_data = build_source(args, work / "source")
        (work / "calibration.json").write_text(json.dumps(rows_data))
        rows = []
        for variant in variants:
            for nproc in (1, args.nproc):
                print(f"running {variant} in {nproc} process(es) ...", flush=True)
                row = run_one(variant, nproc, args, work)
                print(json.dumps({k: v for k, v in row.items() if k != "log_tail"}), flush=True)
                if "log_tail" in row:
                    print(row["log_tail"], flush=True)
                rows.append(row)
            one, many = rows[-2], rows[-1]
            if "error" not in one and "error" not in many:
                many["speedup"] = round(one["oneshot_s"] / many["oneshot_s"], 2)
                many["logits_vs_1_process"] = compare_logits(Path(one["checkpoint"]), Path(many["checkpoint"]), args.device)
        table = markdown(rows, args.nproc)
        print(table)
        import transformers

        payload = {
            "command": "python benchmarks/distributed_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "device": args.device,
            "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
            "nproc": args.nproc,
            "shape": {k: getattr(args, k) for k in ("layers", "experts", "hidden", "intermediate", "top_k", "samples", "seq_len")},
            "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                         "llmcompressor": _version("llmcompressor"), "compressed-tensors": _version("compressed-tensors")},
            "rows": rows,
            "table": table,
        }
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {out}")
        failed = [r for r in rows if "error" in r or not r.get("coverage_same_on_every_rank", True)]
        return 1 if failed else 0
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ----- worker (one rank) ----------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> int:
    import torch

    sys.path.insert(0, str(HERE))
    from _source import use_source_checkout

    use_source_checkout()
    from defuser_quant.calibration import distributed

    cuda = args.device == "cuda"
    distributed.init_from_env("nccl" if cuda else "gloo")
    if not cuda:
        torch.set_num_threads(1)
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    variant, work, out = args.worker, args.workdir, args.output
    source = work / "source"
    rows = json.loads((work / "calibration.json").read_text())
    data = distributed.rank_share(Dataset.from_list(rows))
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).to(device)
    recipe = [GPTQModifier(targets="Linear", scheme="W4A16", ignore=IGNORE)]
    defuse = None
    if variant != "stock":
        import defuser_quant.integrations.llmcompressor as dq_llmc  # changes nothing for "stock" (not imported there)

        defuse = dq_llmc.DefuseModifier(routing=variant)
        recipe.insert(0, defuse)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    oneshot(
        model=model, processor=AutoTokenizer.from_pretrained(source), dataset=data, recipe=recipe,
        output_dir=str(out / "checkpoint"), num_calibration_samples=len(data), max_seq_length=args.seq_len,
        shuffle_calibration_samples=False,
    )
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    result = {
        "rank": distributed.rank(),
        "oneshot_s": seconds,
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "coverage_totals": None if defuse is None or defuse.coverage is None else defuse.coverage.totals.model_dump(),
    }
    (out / f"rank{distributed.rank()}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
