"""Calibration forward throughput: every routing mode of a defused model vs the fused model.

A random qwen3_moe (shape from the flags) runs one calibration pass (``--batches`` batches of
``--batch-size`` x ``--seq-len`` tokens, under ``torch.no_grad()``) per measurement:

* ``fused/eager`` and ``fused/<default>``: the native fused model with the eager experts loop
  and with Transformers' default experts implementation (``grouped_mm`` where it dispatches);
* ``fused/<default> all experts``: the fused model with every router's ``top_k`` set to its
  number of experts, so every token goes through every expert through Transformers' default
  experts implementation and Transformers' own combine: the expert work of the ``all`` mode
  (top-k routed + every other expert forced = every expert per token), the fair baseline for it;
* ``defused``: after ``convert_model``, no override;
* ``routed`` / ``budgeted`` / ``all``: inside ``routing_mode`` (one context per pass, as in a
  real calibration run), with a ``CoverageTracker`` attached;
* ``all whole-batch``: ``all`` with ``routing_mode(whole_batch=True)`` (each expert one call per
  batch over every token, as ``DefuseModifier`` runs ``routing: all``);
* ``... grouped``: the same with ``routing_mode(grouped=True)`` (``calibration.grouped``: each
  projection role as one grouped GEMM, every per-expert Linear's hooks still called).

``--hessians`` adds a check per mode: a Hessian ``x^T x`` (fp32) accumulated by a forward
pre-hook on every expert projection over one pass, per-expert loop vs grouped; reports the
largest difference relative to the largest Hessian entry, and the pass time with those hooks.
``--determinism`` runs the loop, the loop under ``deterministic_mode`` and the grouped forward
twice each and says whether the logits repeat bit for bit.

Each row reports tokens/second (median of ``--repeats`` passes after one warm-up pass; rows are
timed round-robin), its speed relative to each fused baseline (``vs_fused_eager``,
``vs_fused_fast``: top-k routed; ``vs_fused_all_experts``: every expert per token), forced tokens
per pass, and whether the logits equal the defused model's (``torch.equal``). ``slowdown`` names,
per defused row, the fused row doing the same expert work (``all`` rows: all experts; the others:
top-k) and how many times longer the row's pass takes. The JSON's ``baselines`` says what each
ratio compares against. Prints a markdown table and writes JSON.

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
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from _args import check_shape, whole  # beside this script: on sys.path when it runs (main puts it there too) or is imported by the tests

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"], help="auto: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--hidden", type=whole(1), default=512)
    p.add_argument("--intermediate", type=whole(1), default=256, help="moe_intermediate_size")
    p.add_argument("--experts", type=whole(1), default=32)
    p.add_argument("--top-k", type=whole(1), default=4)
    p.add_argument("--layers", type=whole(1), default=4)
    p.add_argument("--heads", type=whole(1), default=8)
    p.add_argument("--kv-heads", type=whole(1), default=4)
    p.add_argument("--head-dim", type=whole(1), default=64)
    p.add_argument("--vocab", type=whole(1), default=1024)
    p.add_argument("--batch-size", type=whole(1), default=2)
    p.add_argument("--seq-len", type=whole(1), default=128)
    p.add_argument("--batches", type=whole(1), default=2, help="batches per calibration pass")
    p.add_argument("--repeats", type=whole(1), default=3, help="timed passes per row (median)")
    p.add_argument("--min-tokens", type=int, default=None, help="budgeted floor (default: 2x the mean routed tokens per expert per pass)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-grouped", action="store_true", help="skip the grouped rows")
    p.add_argument("--no-fused-all", action="store_true", help="skip the fused all-experts baseline")
    p.add_argument("--hessians", action="store_true", help="compare per-expert Hessians, loop vs grouped")
    p.add_argument("--determinism", action="store_true", help="check run-to-run bitwise repeatability")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default benchmarks/results/calibration_throughput_<device>.json)")
    args = p.parse_args(argv)
    check_shape(p, args)
    return args


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


def top_k_routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The model's routers: modules with integer ``top_k`` and ``num_experts`` (qwen3_moe's ``TopKRouter``)."""
    return [
        m for m in model.modules()
        if isinstance(getattr(m, "top_k", None), int) and isinstance(getattr(m, "num_experts", None), int)
    ]


@contextmanager
def all_experts_routing(model: torch.nn.Module):
    """Every token through every expert of the fused model: each router's ``top_k`` = its number of experts
    (restored on exit); the experts implementation and the output combine stay Transformers' own."""
    routers = top_k_routers(model)
    saved = [r.top_k for r in routers]
    for r in routers:
        r.top_k = r.num_experts
    try:
        yield None
    finally:
        for r, k in zip(routers, saved):
            r.top_k = k


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

    routers = top_k_routers(fused)
    if len(routers) != args.layers:
        raise RuntimeError(f"found {len(routers)} routers with top_k/num_experts in the fused model, expected {args.layers}")

    def fused_all():
        fused.set_experts_implementation(default_impl)
        return all_experts_routing(fused)

    def mode(name: str, grouped: bool = False, whole_batch: bool = False):
        @contextmanager
        def context():
            with CoverageTracker(defused, min_tokens=min_tokens), routing_mode(
                defused, name, min_tokens=min_tokens, grouped=grouped, whole_batch=whole_batch
            ) as session:
                yield session
        return context

    rows_spec = [("fused", "eager", fused, fused_with("eager"))]
    if default_impl != "eager":
        rows_spec.append(("fused", default_impl, fused, fused_with(default_impl)))
    if not args.no_fused_all:
        rows_spec.append(("fused", f"{default_impl} all experts", fused, fused_all))
    rows_spec += [("defused", "no override", defused, nullcontext)]
    rows_spec += [("defused", m, defused, mode(m)) for m in ("routed", "budgeted", "all")]
    rows_spec.append(("defused", "all whole-batch", defused, mode("all", whole_batch=True)))
    if not args.no_grouped:
        rows_spec += [("defused", f"{m} grouped", defused, mode(m, grouped=True)) for m in ("routed", "budgeted", "all")]
        rows_spec.append(("defused", "all whole-batch grouped", defused, mode("all", grouped=True, whole_batch=True)))

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
            "max_logit_diff_vs_defused": None if model is fused else float((logits.float() - reference.float()).abs().max()),
        }
        if peak is not None:
            row["peak_memory_gib"] = peak
        rows.append(row)
    base = rows[0]
    fast = next((r for r in rows if r["model"] == "fused" and r["variant"] == default_impl and default_impl != "eager"), None)
    every = next((r for r in rows if r["model"] == "fused" and r["variant"].endswith(" all experts")), None)
    for row in rows:
        row["vs_fused_eager"] = row["tokens_per_second"] / base["tokens_per_second"]
        if fast:
            row["vs_fused_fast"] = row["tokens_per_second"] / fast["tokens_per_second"]
        if every:
            row["vs_fused_all_experts"] = row["tokens_per_second"] / every["tokens_per_second"]
        if row["model"] == "defused":
            same_work = every if row["variant"].split()[0] == "all" else (fast or base)
            if same_work is not None:
                row["slowdown"] = {
                    "baseline": f"fused/{same_work['variant']}",
                    "times": row["seconds_per_pass"] / same_work["seconds_per_pass"],
                }
    hessians = [hessian_check(defused, batches, m, min_tokens) for m in ("routed", "all")] if args.hessians else None
    determinism = determinism_check(defused, batches) if args.determinism else None

    result = {
        "command": "python benchmarks/calibration_throughput.py " + " ".join(map(shlex.quote, argv if argv is not None else sys.argv[1:])),
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
        "baselines": {
            "vs_fused_eager": "tokens/s over those of fused/eager: the fused model, Transformers' eager experts loop, top-k routing",
            "vs_fused_fast": f"tokens/s over those of fused/{default_impl}: the fused model, Transformers' default experts "
            "implementation, top-k routing (the expert work of the routed rows)",
            "vs_fused_all_experts": f"tokens/s over those of fused/{default_impl} all experts: the fused model with every "
            "router's top_k = its number of experts, so every token goes through every expert (the expert work of the all rows)",
            "slowdown": "seconds per pass over those of the fused row doing the same expert work: all rows vs fused all "
            "experts, routed/budgeted/no-override rows vs fused top-k (budgeted does some forced work on top)",
        },
        "rows": rows,
        "hessians": hessians,
        "determinism": determinism,
    }
    output = args.output or HERE / "results" / f"calibration_throughput_{device.type}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n")
    print(markdown(result))
    print(f"\nwritten {output}")
    return result


def _hessian_pass(model, batches, mode: str, min_tokens: int, grouped: bool) -> tuple[float, dict[str, torch.Tensor]]:
    from defuser_quant.calibration import defused_blocks, routing_mode

    hessians: dict[str, torch.Tensor] = {}
    handles = []

    def hook_for(key):
        def hook(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            if key in hessians:
                hessians[key].addmm_(x.T, x)
            else:
                hessians[key] = x.T @ x
        return hook

    for path, block in defused_blocks(model):
        for e, expert in enumerate(block):
            for name, linear in expert.named_children():
                handles.append(linear.register_forward_pre_hook(hook_for(f"{path}.{e}.{name}")))
    device = batches[0].device
    try:
        synchronize(device)
        start = time.perf_counter()
        with torch.no_grad(), routing_mode(model, mode, min_tokens=min_tokens, grouped=grouped):
            for ids in batches:
                model(ids)
        synchronize(device)
        return time.perf_counter() - start, hessians
    finally:
        for h in handles:
            h.remove()


def hessian_check(model, batches, mode: str, min_tokens: int) -> dict:
    """Per-expert Hessians over one pass, loop vs grouped: worst relative difference, pass times."""
    _hessian_pass(model, batches, mode, min_tokens, grouped=True)  # warm-up
    loop_s, loop = _hessian_pass(model, batches, mode, min_tokens, grouped=False)
    grouped_s, grouped = _hessian_pass(model, batches, mode, min_tokens, grouped=True)
    worst, worst_key = 0.0, None
    for key, h in loop.items():
        rel = float((grouped[key] - h).abs().max() / h.abs().max().clamp(min=1e-30))
        if rel > worst:
            worst, worst_key = rel, key
    same_keys = loop.keys() == grouped.keys()
    exact = sum(bool(torch.equal(h, grouped[key])) for key, h in loop.items()) if same_keys else 0
    return {"mode": mode, "modules": len(loop), "same_modules": same_keys, "identical": exact,
            "max_rel_diff": worst, "worst_module": worst_key, "loop_s": loop_s, "grouped_s": grouped_s}


def determinism_check(model, batches) -> dict:
    """Whether two runs give bitwise equal logits: loop, loop under deterministic_mode, grouped."""
    from defuser_quant.calibration import routing_mode
    from defuser_quant.calibration.grouped import deterministic_mode

    def twice(context) -> bool:
        outs = []
        for _ in range(2):
            with torch.no_grad(), context():
                outs.append(torch.cat([model(ids).logits for ids in batches]))
        return bool(torch.equal(outs[0], outs[1]))

    return {
        "loop": twice(nullcontext),
        "loop_deterministic_mode": twice(deterministic_mode),
        "grouped": twice(lambda: routing_mode(model, "routed", grouped=True)),
    }


def markdown(result: dict) -> str:
    s = result["shape"]
    lines = [
        f"qwen3_moe {s['layers']} layers, hidden {s['hidden']}, {s['experts']} experts top-{s['top_k']}, "
        f"moe_intermediate {s['moe_intermediate']}, {result['dtype']} on {result['device']} ({result['torch_threads']} threads); "
        f"{result['tokens_per_pass']} tokens per pass, budgeted min_tokens={result['min_tokens']}",
        "",
        "| model | variant | tokens/s | vs fused eager | vs fused default | vs fused all experts | slowdown vs same-work fused | forced tokens/pass | logits == defused |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in result["rows"]:
        slow = f"{r['slowdown']['times']:.2f}x ({r['slowdown']['baseline']})" if "slowdown" in r else "-"
        exact = "-" if r["exact_vs_defused"] is None else (
            "yes" if r["exact_vs_defused"] else f"max diff {r['max_logit_diff_vs_defused']:.3g}")
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['tokens_per_second']:,.0f} | {r['vs_fused_eager']:.2f}x | "
            f"{r.get('vs_fused_fast', 0):.2f}x | {r.get('vs_fused_all_experts', 0):.2f}x | "
            f"{slow} | {r['forced_tokens_per_pass']:,} | {exact} |"
        )
    for h in result.get("hessians") or []:
        lines.append(
            f"\nHessians, mode {h['mode']}: {h['identical']}/{h['modules']} identical, largest difference "
            f"{h['max_rel_diff']:.2e} of the largest entry ({h['worst_module']}); pass with Hessian hooks: "
            f"loop {h['loop_s']:.3f} s, grouped {h['grouped_s']:.3f} s"
        )
    if result.get("determinism"):
        lines.append(f"\nbitwise repeatable over two runs: {result['determinism']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
