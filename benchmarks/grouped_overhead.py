"""Host overhead of the grouped calibration forward: microseconds per block call at a tiny shape.

At hidden 64 / moe_intermediate 32 the GEMMs cost next to nothing, so what is timed is the
Python bookkeeping around them (the plan of the block's projections, the per-expert splits and
hook calls), which on a GPU cannot overlap the kernels of the block. One defused qwen3_moe block
of ``--experts`` experts, ``--tokens`` tokens routed top-``--top-k``:

* ``loop``: ``block.routed_forward`` (the per-expert loop), for reference;
* ``grouped``: ``grouped_routed_forward``, no hooks;
* ``grouped + coverage hooks``: with a forward pre-hook on every ``up`` projection (what
  ``CoverageTracker`` registers);
* ``grouped + hessian hooks``: with a forward pre-hook on every projection (a GPTQ-like consumer);
* ``forced all``: ``grouped_expert_calls`` over every token not routed to each expert (``all`` mode);
* ``plan check``: ``why_not_grouped`` alone;
* ``... parameters not in a dict``: every projection's ``_parameters`` a dict subclass (as under an
  offload cache, e.g. compressed-tensors' in llm-compressor): the plan cannot be kept between calls;
* ``grouped, registered parameter store``: the same subclass registered with
  ``register_parameter_store`` (reads hand back the stored tensors): the plan is kept again.

Each row: the best and the median over ``--repeats`` timings of ``--calls`` calls (the best is the
least disturbed by other load). Writes JSON (``--output``).

    .venv/bin/python benchmarks/grouped_overhead.py --threads 1 --output /tmp/overhead.json
    python benchmarks/grouped_overhead.py --device cuda --hidden 2048 --intermediate 768 --tokens 4096 --output $OUT/o.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from _args import check_shape, whole  # beside this script: on sys.path when it runs (main puts it there too) or is imported by the tests

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=whole(1), default=128)
    p.add_argument("--top-k", type=whole(1), default=8)
    p.add_argument("--hidden", type=whole(1), default=64)
    p.add_argument("--intermediate", type=whole(1), default=32)
    p.add_argument("--tokens", type=whole(1), default=512)
    p.add_argument("--calls", type=whole(1), default=20)
    p.add_argument("--repeats", type=whole(1), default=9)
    p.add_argument("--threads", type=whole(1), default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (CUDA: bf16, timings synchronized)")
    p.add_argument("--label", default="", help="free text stored in the JSON (e.g. the commit)")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    check_shape(p, args)
    return args


def _block(args: argparse.Namespace, device: torch.device, dtype: torch.dtype):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from defuser_quant import convert_model

    config = Qwen3MoeConfig(
        hidden_size=args.hidden, moe_intermediate_size=args.intermediate, num_experts=args.experts,
        num_experts_per_tok=args.top_k, num_hidden_layers=1,
    )
    torch.manual_seed(0)
    holder = torch.nn.Module()
    holder.mlp = Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        for p in holder.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    holder.to(device, dtype)  # before defusing: the per-expert weights stay views of the fused storage
    convert_model(holder)
    from defuser_quant.calibration import defused_blocks

    (_, block), = defused_blocks(holder)
    return block


def _time(fn, calls: int, repeats: int, device: torch.device) -> tuple[float, float]:
    """(best, median) microseconds per call over ``repeats`` timings of ``calls`` calls (best: least disturbed
    by other load on the machine)."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        samples.append((time.perf_counter() - start) / calls * 1e6)
    return min(samples), statistics.median(samples)


def main(argv: list[str] | None = None) -> dict:
    sys.path.insert(0, str(HERE))
    from _source import use_source_checkout

    use_source_checkout()
    from defuser_quant.calibration.grouped import (
        grouped_expert_calls,
        grouped_routed_forward,
        register_parameter_store,
        unregister_parameter_store,
        why_not_grouped,
    )

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    block = _block(args, device, dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(args.tokens, args.hidden, generator=gen).to(device, dtype)
    scores = torch.rand(args.tokens, args.experts, generator=gen)
    weights, index = scores.topk(args.top_k, dim=1)
    hit = torch.zeros(args.tokens, args.experts, dtype=torch.bool).scatter_(1, index, True)
    selection = {e: (~hit[:, e]).nonzero().flatten().to(device) for e in range(args.experts)}
    weights, index = weights.to(device, dtype), index.to(device)
    assert why_not_grouped(block, x) is None, why_not_grouped(block, x)
    reference = block.routed_forward(x, index, weights)

    def grouped():
        out = grouped_routed_forward(block, x, index, weights)
        assert out is not None

    rows = []

    def row(name: str, fn) -> None:
        with torch.no_grad():
            best, median = _time(fn, args.calls, args.repeats, device)
        rows.append({"variant": name, "us_per_call_best": best, "us_per_call_median": median})
        print(f"{name:34s} best {best:10.1f} us/call   median {median:10.1f}")

    with torch.no_grad():
        exact = bool(torch.equal(grouped_routed_forward(block, x, index, weights), reference))
    row("loop", lambda: block.routed_forward(x, index, weights))
    row("grouped", grouped)
    row("plan check (why_not_grouped)", lambda: why_not_grouped(block, x))
    seen = [0]

    def count(m, a):
        seen[0] += a[0].shape[0]

    handles = [expert.up_proj.register_forward_pre_hook(count) for expert in block]
    row("grouped + coverage hooks", grouped)
    row("loop + coverage hooks", lambda: block.routed_forward(x, index, weights))
    for h in handles:
        h.remove()
    hessians: dict = {}

    def hessian(m, a):
        h = hessians.get(m)
        hessians[m] = a[0].T @ a[0] if h is None else h.addmm_(a[0].T, a[0])

    handles = [lin.register_forward_pre_hook(hessian) for expert in block for lin in expert.children()]
    row("grouped + hessian hooks", grouped)
    row("loop + hessian hooks", lambda: block.routed_forward(x, index, weights))
    for h in handles:
        h.remove()
    row("forced all (grouped_expert_calls)", lambda: grouped_expert_calls(block, x, selection))

    class _Store(dict):
        """A ``_parameters`` that is not a plain dict (like an offload cache): the plan is not kept."""

    for expert in block:
        for linear in expert.children():
            linear._parameters = _Store(linear._parameters)
    row("plan check, parameters not in a dict", lambda: why_not_grouped(block, x))
    row("grouped, parameters not in a dict", grouped)
    # registered as a store whose reads hand back the stored tensor (compressed-tensors' device cache)
    register_parameter_store(_Store, lambda store, name: dict.get(store, name))
    try:
        row("grouped, registered parameter store", grouped)
    finally:
        unregister_parameter_store(_Store)
    result = {
        "benchmark": "grouped_overhead",
        "label": args.label,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "dtype": str(dtype).removeprefix("torch."),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "shape": {"experts": args.experts, "top_k": args.top_k, "hidden": args.hidden, "moe_intermediate": args.intermediate,
                  "tokens": args.tokens},
        "calls": args.calls,
        "repeats": args.repeats,
        "grouped_equals_loop": exact,
        "rows": rows,
    }
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"written {args.output}")
    return result


if __name__ == "__main__":
    main()
