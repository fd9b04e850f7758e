"""GPTQModel end to end: defuser-quant's loader plugin vs stock GPTQModel + Defuser, one run.

Builds a random qwen3_moe with Qwen3-30B-A3B layers (128 experts, hidden 2048, moe_intermediate
768, top-8, 32/4 heads of 128, vocab 151936; bf16; default 1 layer, ``--layers 4`` for more)
from its config, saves it with a BPE tokenizer trained offline on the bundled corpus, then runs
each variant in its own process (the plugin and Defuser both patch process-wide state):

* ``stock``    - GPTQModel 7.6 as shipped (it defuses with the ``defuser`` package);
* ``ours``     - ``defuser_quant.integrations.gptqmodel.install()`` + ``quantize_with_defuser``
                 with native routing;
* ``ours-all`` - the same with ``routing="all"`` (every expert calibrated on every token);
* ``stock-again`` - stock once more: its checkpoint against stock's shows what the GPU's run-to-run
                 nondeterminism alone changes;
* ``ours-grouped`` / ``ours-all-grouped`` - ``ours`` / ``ours-all`` with ``grouped=True``: the
                 experts' calibration forwards as grouped GEMMs (``calibration.grouped``).

Every row records which GPTQModel code paths ran (``integrations.gptqmodel.kernels``): GPTQ
solves on the CUDA block-update extension or on GPTQModel's torch loop, Hessian inverses moved
to the CPU, the quantized Linear classes after ``quantize()`` and after reload. A CUDA run in
which any solve fell back is refused (exit 3, the JSON says ``"refused"``) unless
``--allow-fallback``, and then the table says so. ``--stages`` adds a per-stage time breakdown
(Hessian accumulation, solve, packing, experts forward; CUDA synchronized around each timed call).
Checkpoints are compared with stock's: identical tensors, the share of identical ``qweight``
tensors and the largest ``scales`` difference (the GPU is not deterministic; ``--deterministic``
turns on deterministic algorithms in every variant).

Each variant: ``GPTQModel.load`` (GPTQ 4-bit, group 128), ``quantize``, ``save``, reload and
logits on a fixed prompt. With several GPUs the variants run at the same time, each alone on its
own GPU (``CUDA_VISIBLE_DEVICES``), so one call fits more; GPTQModel's JIT-built CUDA block-update
extension is built once before any variant starts, so no variant pays for it. Reported: wall time per step, peak GPU memory
(``torch.cuda.max_memory_allocated``), peak host RSS, expert projections quantized out of all,
the smallest number of calibration rows any expert projection's GPTQ saw (from GPTQModel's
own log), whether the checkpoint equals stock's tensor for tensor, and the logits' max
difference to stock. Prints a markdown table and writes JSON under ``benchmarks/results/``.

    python benchmarks/gptqmodel_gpu.py                          # stock + ours, 1 layer
    python benchmarks/gptqmodel_gpu.py --variants stock,ours,ours-all   # 2 GPUs: 2 variants at a time
    python benchmarks/gptqmodel_gpu.py --layers 4 --variants stock,ours,ours-all --timeout 1800
    python benchmarks/gptqmodel_gpu.py --device cpu --tiny      # 2 CPU cores, < 1 minute

Budget (one H200, CUDA block-update extension built): ``quantize()`` of 2 Qwen3-30B-A3B layers
takes 36-55 s per variant, plus ~15-20 s of imports and ~5-10 s of reload per process, ~12 s to
build the source model and ~30 s to build the extension once: 3 variants with reload fit one
10-minute call, 4 do not reliably (docs/performance.md). Without the extension (GPTQModel's torch
loop, refused unless ``--allow-fallback``) it was about 4 minutes per layer per variant.

Needs gptqmodel==7.6.0 and this package importable (``pip install -e .`` or PYTHONPATH); on a GPU
machine without network, ``bash scripts/gpu_site/build.sh DIR`` here and ``PYTHONPATH=DIR:.`` there.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CORPUS = ROOT / "defuser_quant" / "assets" / "corpus" / "train.txt"
VARIANTS = ("stock", "stock-again", "ours", "ours-all", "ours-grouped", "ours-all-grouped")
DEFAULT_VARIANTS = ("stock", "ours")
TINY = dict(layers=2, experts=8, hidden=128, intermediate=128, top_k=2, heads=4, kv_heads=2, head_dim=32, vocab=1024,
            samples=16, seq_len=128, batch_size=4)


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """The model shape (Qwen3-30B-A3B layers by default) and calibration size flags."""
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=768, help="moe_intermediate_size")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--samples", type=int, default=128, help="calibration rows")
    p.add_argument("--seq-len", type=int, default=256, help="tokens per calibration row (at most)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny shape for a CPU smoke run: " + json.dumps(TINY))
    p.add_argument("--layers", type=int, default=1, help="decoder layers (each one a full Qwen3-30B-A3B layer)")
    add_shape_args(p)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--variants", default=None,
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default {','.join(DEFAULT_VARIANTS)}; all three with --tiny)")
    p.add_argument("--backend", default="gptq_triton",
                   help="GPTQModel kernel for quantize() packing and reload (a BACKEND value; 'auto' may pick Machete "
                        "on Hopper, which downloads CUTLASS and JIT-builds; default gptq_triton; on CPU use auto)")
    p.add_argument("--no-reload", action="store_true", help="skip the reload + logits step")
    p.add_argument("--stages", action="store_true", help="time the stages (synchronizes CUDA around each: a profile)")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms in every variant")
    p.add_argument("--warmup", action="store_true",
                   help="run the first variant once, untimed, before the timed runs (Triton compiles its kernels then)")
    p.add_argument("--allow-fallback", action="store_true",
                   help="report a CUDA run in which GPTQ solves fell back to GPTQModel's torch path (the table says so)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir, removed)")
    p.add_argument("--timeout", type=int, default=420, help="seconds per variant")
    p.add_argument("--gpus", type=int, default=None,
                   help="variants run at once, one GPU each (default: every visible GPU, 1 on CPU)")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default benchmarks/results/gptqmodel_<device>[_tiny].json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variants is None and args.tiny:
        args.variants = "stock,ours,ours-all"
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    if args.variants is None:
        args.variants = ",".join(VARIANTS if args.tiny else DEFAULT_VARIANTS)
    if args.device == "cpu" and args.backend == "gptq_triton":
        args.backend = "auto"
    return args


def _env(device: str, gpu: int | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if (os.cpu_count() or 1) <= 4:
        env.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel's pools need it on tiny machines
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


# ----- parent: build the model, run the variants, compare -----------------------------------
def build_source(args: argparse.Namespace, src: Path) -> list[dict]:
    """Tokenizer + random bf16 model saved to ``src``; returns the calibration rows."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    text = CORPUS.read_text(encoding="utf-8")
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if len(p) > 200]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(args.vocab, 4096), special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(paragraphs, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", bos_token="<|endoftext|>")
    fast.save_pretrained(src)
    config = Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate * 4,
        moe_intermediate_size=args.intermediate, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim, num_experts=args.experts,
        num_experts_per_tok=args.top_k, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
    )
    device = "cuda" if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(src)
    del model
    rows = []
    text_rows = iter(paragraphs)
    while len(rows) < args.samples:
        chunk = " ".join(next(text_rows) for _ in range(4))
        enc = fast(chunk, truncation=True, max_length=args.seq_len)
        if len(enc["input_ids"]) >= 16:
            rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return rows


def warm_gptq_extension() -> tuple[float | None, bool | None]:
    """Build GPTQModel's CUDA block-update extension once (a JIT build the first user pays for)."""
    t0 = time.perf_counter()
    try:
        from gptqmodel.quantization.gptq_cuda import block_update_available
    except ImportError:
        return None, None
    available = bool(block_update_available())
    print(f"GPTQ block-update extension available: {available}", flush=True)
    return round(time.perf_counter() - t0, 2), available


def run_variants(variants: list[str], args: argparse.Namespace, work: Path, slots: int, partial: Path | None = None) -> list[dict]:
    """Each variant in its own process; ``slots`` of them at a time, slot i on GPU i.

    Every finished row is appended to ``partial`` (JSON lines) at once, so a run cut short by a
    time limit keeps what it measured.
    """
    free = list(range(slots))
    import threading

    lock = threading.Lock()

    def one(variant: str) -> dict:
        gpu = free.pop(0) if slots > 1 else None
        try:
            print(f"running {variant}" + ("" if gpu is None else f" on GPU {gpu}") + " ...", flush=True)
            row = run_variant(variant, args, work, gpu)
            row["gpu_index"] = gpu
            line = json.dumps({k: v for k, v in row.items() if k != "log_tail"})
            print(line, flush=True)
            if partial is not None:
                with lock, partial.open("a") as f:
                    f.write(line + "\n")
            if "log_tail" in row:
                print(row["log_tail"], flush=True)
            return row
        finally:
            if gpu is not None:
                free.append(gpu)

    with concurrent.futures.ThreadPoolExecutor(max_workers=slots) as pool:
        return list(pool.map(one, variants))


def run_variant(variant: str, args: argparse.Namespace, work: Path, gpu: int | None = None) -> dict:
    result = work / f"{variant}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--workdir", str(work), "--device", args.device,
           "--batch-size", str(args.batch_size), "--backend", args.backend] + [
        flag for flag, on in (("--no-reload", args.no_reload), ("--stages", args.stages), ("--deterministic", args.deterministic)) if on
    ]
    t0 = time.perf_counter()
    try:
        env = _env(args.device, gpu)
        if args.deterministic:
            env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts in the worker
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as exc:
        text = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (exc.stdout, exc.stderr))
        (work / f"{variant}.log").write_text(text)
        return {"variant": variant, "error": f"timeout after {args.timeout}s", "log_tail": text[-3000:], "process_s": args.timeout}
    (work / f"{variant}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not result.exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {"variant": variant, "error": f"exit {proc.returncode}", "log_tail": tail, "process_s": time.perf_counter() - t0}
    data = json.loads(result.read_text())
    data["process_s"] = round(time.perf_counter() - t0, 2)
    return data


def compare_checkpoints(a: Path, b: Path) -> dict:
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        return {k: f for f in sorted(d.glob("*.safetensors")) for k in safe_open(str(f), "pt").keys()}

    ia, ib = index(a), index(b)
    common = sorted(set(ia) & set(ib))
    equal = qweights = qweights_equal = 0
    scale_diff = 0.0
    for key in common:
        with safe_open(str(ia[key]), "pt") as fa, safe_open(str(ib[key]), "pt") as fb:
            ta, tb = fa.get_tensor(key), fb.get_tensor(key)
            same = ta.dtype == tb.dtype and ta.shape == tb.shape and bool((ta == tb).all())
            equal += int(same)
            if key.endswith(".qweight"):
                qweights += 1
                qweights_equal += int(same)
            elif key.endswith(".scales") and ta.shape == tb.shape:
                scale_diff = max(scale_diff, float((ta.float() - tb.float()).abs().max()))
    return {"keys_a": len(ia), "keys_b": len(ib), "common": len(common), "equal": equal,
            "qweights": qweights, "qweights_equal": qweights_equal, "max_scale_diff": scale_diff}


def markdown(rows: list[dict]) -> str:
    cols = ["variant", "load_s", "quantize_s", "save_s", "total_s", "peak_gpu_gib", "peak_rss_gib", "experts_quantized",
            "min_expert_rows", "gptq_solve_path", "same_ckpt_as_stock", "qweights_equal", "max_scale_diff", "logits_vs_stock"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | error: {r['error']} |" + " |" * (len(cols) - 2))
            continue
        cells = [
            r["variant"], f"{r['load_s']:.1f}", f"{r['quantize_s']:.1f}", f"{r['save_s']:.1f}", f"{r['total_s']:.1f}",
            "-" if r.get("peak_gpu_bytes") is None else f"{r['peak_gpu_bytes'] / 2**30:.2f}",
            f"{r['peak_rss_bytes'] / 2**30:.2f}", f"{r['experts_quantized']}/{r['expert_projections']}",
            str(r.get("min_expert_samples", "-")), r.get("kernels_label", "-"), r.get("same_ckpt_as_stock", "-"),
            r.get("qweights_equal", "-"), r.get("max_scale_diff", "-"), r.get("logits_vs_stock", "-"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    staged = [r for r in rows if r.get("kernels", {}).get("stage_seconds")]
    if staged:
        stages = ["experts_forward", "hessian", "solve", "pack"]
        lines += ["", "| variant | quantize (s) | " + " | ".join(f"{s} (s)" for s in stages) + " | other in quantize (s) | save (s) |",
                  "|---|" + "---:|" * (len(stages) + 3)]
        for r in staged:
            sec = r["kernels"]["stage_seconds"]
            # experts_forward includes the Hessian accumulation its hooks run; other = quantize minus the disjoint stages.
            other = r["quantize_s"] - sec.get("experts_forward", sec.get("hessian", 0.0)) - sec.get("solve", 0.0) - sec.get("pack", 0.0)
            lines.append(f"| {r['variant']} | {r['quantize_s']:.1f} | " + " | ".join(f"{sec.get(s, 0.0):.2f}" for s in stages)
                         + f" | {other:.1f} | {r['save_s']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    import shutil
    import tempfile

    import torch

    variants = [v for v in args.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available (use --device cpu --tiny)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gptqmodel_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    calibration = build_source(args, work / "src")
    (work / "calibration.json").write_text(json.dumps(calibration))
    build_s = time.perf_counter() - t0
    print(f"built source model in {build_s:.1f}s under {work}", flush=True)
    jit_s, jit_ok = warm_gptq_extension() if args.device == "cuda" else (None, None)
    slots = 1 if args.device == "cpu" else max(1, min(args.gpus or torch.cuda.device_count(), len(variants)))
    out = args.output or HERE / "results" / f"gptqmodel_{args.device}{'_tiny' if args.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.stem + ".partial.jsonl")
    partial.write_text(json.dumps({"command": "python benchmarks/gptqmodel_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])}) + "\n")
    warmup = None
    if args.warmup:
        # Triton compiles GPTQModel's packing/inference kernels on first use and caches them on
        # disk; an untimed run first keeps that compilation out of whichever variant runs first.
        t_w = time.perf_counter()
        first = run_variant(variants[0], args, work)
        shutil.rmtree(work / f"{variants[0]}.out", ignore_errors=True)
        for leftover in work.glob(f"{variants[0]}.*"):
            if leftover.is_file():
                leftover.unlink()
        warmup = {"variant": variants[0], "seconds": round(time.perf_counter() - t_w, 2), "error": first.get("error")}
        print(f"warm-up run of {variants[0]}: {warmup}", flush=True)
    rows = run_variants(variants, args, work, slots, partial)
    stock = next((r for r in rows if r["variant"] == "stock" and "error" not in r), None)
    if stock is not None:
        import torch as _torch

        stock_logits = work / "stock.logits.pt"
        for r in rows:
            if r is stock or "error" in r:
                continue
            cmp = compare_checkpoints(work / "stock.out", work / f"{r['variant']}.out")
            r["checkpoint_vs_stock"] = cmp
            same = cmp["common"] == cmp["keys_a"] == cmp["keys_b"] == cmp["equal"]
            r["same_ckpt_as_stock"] = "yes" if same else f"{cmp['equal']}/{cmp['keys_a']}"
            r["qweights_equal"] = f"{cmp['qweights_equal']}/{cmp['qweights']}"
            r["max_scale_diff"] = f"{cmp['max_scale_diff']:.3g}"
            mine = work / f"{r['variant']}.logits.pt"
            if stock_logits.exists() and mine.exists():
                r["logits_vs_stock"] = f"{(_torch.load(mine) - _torch.load(stock_logits)).abs().max().item():.3g}"
    refused = None
    if args.device == "cuda":
        fell_back = [f"{r['variant']}: {r['fallback']}" for r in rows if r.get("fallback")]
        if fell_back and not args.allow_fallback:
            refused = "GPTQModel fell back to a slower path, so these timings are not comparable: " + "; ".join(fell_back) + \
                      ". Fix the build (see docs/performance.md) or pass --allow-fallback to report it as such."
    table = markdown(rows)
    print(table)
    meta = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
        "build_source_s": round(build_s, 2),
        "gptq_extension_warmup_s": jit_s,
        "gptq_extension_available": jit_ok,
        "warmup": warmup,
        "concurrent_variants": slots,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "gpus_visible": torch.cuda.device_count() if args.device == "cuda" else 0,
    }
    command = "python benchmarks/gptqmodel_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"meta": {**meta, "command": command}, "rows": rows, "markdown": table}
    if refused:
        payload["refused"] = refused
    out.write_text(json.dumps(payload, indent=1) + "\n")
    partial.unlink(missing_ok=True)
    print(f"wrote {out}")
    if args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    if refused:
        print(f"REFUSED: {refused}", file=sys.stderr)
        return 3
    return 0 if all("error" not in r for r in rows) else 1


# ----- worker: one variant in its own process ------------------------------------------------
def worker(args: argparse.Namespace) -> int:
    import resource

    import torch

    variant, work = args.worker, args.workdir
    cuda = args.device == "cuda" and torch.cuda.is_available()
    t_import = time.perf_counter()
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    backend = BACKEND(args.backend)
    sys.path.insert(0, str(HERE))
    from _source import use_source_checkout

    use_source_checkout()
    from defuser_quant.calibration.grouped import deterministic_mode
    from defuser_quant.integrations.gptqmodel.kernels import quant_linear_classes, record_gptq_kernels

    if not variant.startswith("stock"):
        from defuser_quant.integrations.gptqmodel import install, quantize_with_defuser

        install()
    import_s = time.perf_counter() - t_import
    calibration = json.loads((work / "calibration.json").read_text())
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = GPTQModel.load(str(work / "src"), QuantizeConfig(bits=4, group_size=128))
    t1 = time.perf_counter()
    extra: dict = {}
    with record_gptq_kernels(stages=args.stages) as kernels, deterministic_mode(args.deterministic):
        if variant.startswith("stock"):
            log = model.quantize(calibration, batch_size=args.batch_size, backend=backend)
        else:
            routing = "all" if variant.startswith("ours-all") else "routed"
            result = quantize_with_defuser(model, calibration, routing=routing, policy="warn", batch_size=args.batch_size,
                                           backend=backend, coverage_report=work / f"{variant}.coverage.json",
                                           grouped=variant.endswith("-grouped"))
            log = result.log
            extra["coverage_totals"] = result.coverage.totals.model_dump()
    t2 = time.perf_counter()
    extra["kernels"] = kernels.as_dict()
    extra["kernels_label"] = kernels.label()
    extra["fallback"] = kernels.fallback_reason() if cuda else None
    extra["quant_linear_after_quantize"] = quant_linear_classes(model.model)
    expert = re.compile(r"\.experts\.\d+\.")
    projections = [m for n, m in model.model.named_modules() if expert.search(f"{n}.") and n.rsplit(".", 1)[-1].endswith("proj")]
    quantized = sum(isinstance(m, BaseQuantLinear) for m in projections)
    samples = [int(r["samples"]) for rows in (log or {}).values() for r in rows if ".experts." in str(r.get("module")) and str(r.get("samples", "")).isdigit()]
    model.save(str(work / f"{variant}.out"))
    t3 = time.perf_counter()
    peak_gpu = torch.cuda.max_memory_allocated() if cuda else None
    reload_s = None
    if not args.no_reload:
        del model
        t4 = time.perf_counter()
        device = "cuda:0" if cuda else "cpu"
        reloaded = GPTQModel.load(str(work / f"{variant}.out"), device=device, backend=backend)
        extra["quant_linear_after_reload"] = quant_linear_classes(reloaded.model)
        ids = torch.tensor([calibration[0]["input_ids"][:64]], device=device)
        with torch.inference_mode():
            logits = reloaded.model(input_ids=ids).logits.float().cpu()
        torch.save(logits, work / f"{variant}.logits.pt")
        reload_s = time.perf_counter() - t4
    out = {
        "variant": variant,
        "backend": args.backend,
        "import_s": round(import_s, 2),
        "load_s": round(t1 - t0, 2),
        "quantize_s": round(t2 - t1, 2),
        "save_s": round(t3 - t2, 2),
        "total_s": round(t3 - t0, 2),
        "reload_logits_s": None if reload_s is None else round(reload_s, 2),
        "peak_gpu_bytes": peak_gpu,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "expert_projections": len(projections),
        "experts_quantized": quantized,
        "min_expert_samples": min(samples) if samples else None,
        "checkpoint_bytes": sum(f.stat().st_size for f in (work / f"{variant}.out").glob("*.safetensors")),
        **extra,
    }
    (work / f"{variant}.json").write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
