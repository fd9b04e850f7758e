"""GPTQModel's per-batch rehome of a layer holding defused experts, against the ``rehome`` lean part.

Before every calibration batch GPTQModel 7.6's ``ForwardExecutor.run_single`` calls
``rehome_module_to_device(layer, device, move_parameters=True, move_buffers=True, root_module=model)``; the
plugin's ``rehome`` part (``integrations.gptqmodel.rehome``) answers that call with one walk when GPTQModel's
function would change nothing. This builds a Qwen3-MoE layer with ``--experts`` defused experts (the walk's cost
is per module, so small matrices do: ``--hidden``/``--intermediate``), then times, in one process and alternating,
``--calls`` calls of GPTQModel's function and of the lean part's, ``--repeats`` times each, and checks that
GPTQModel's own call left every tensor of the layer where it was (the case the part answers).

    python benchmarks/rehome_check.py --output benchmarks/results/rehome_check_cpu_round37.json
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

from _args import whole
from _report import write_json
from _source import use_source_checkout


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=whole(1), default=128, help="defused experts in the layer (Qwen3-30B-A3B: 128)")
    p.add_argument("--hidden", type=whole(1), default=256)
    p.add_argument("--intermediate", type=whole(1), default=128, help="moe_intermediate_size")
    p.add_argument("--calls", type=whole(1), default=100, help="calls per timed repeat")
    p.add_argument("--repeats", type=whole(1), default=5)
    p.add_argument("--output", type=Path, default=None)
    return p.parse_args(argv)


def _layer(args: argparse.Namespace):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM

    from defuser_quant.core import convert_model

    heads = max(1, args.hidden // 64)
    config = Qwen3MoeConfig(vocab_size=64, hidden_size=args.hidden, intermediate_size=args.intermediate,
                            moe_intermediate_size=args.intermediate, num_hidden_layers=1, num_attention_heads=heads,
                            num_key_value_heads=1, head_dim=64, num_experts=args.experts,
                            num_experts_per_tok=min(8, args.experts))
    model = Qwen3MoeForCausalLM(config)
    convert_model(model)
    return model, model.model.layers[0]


def _tensors(module) -> dict:
    return {name: (id(t), t.device) for name, t in (*module.named_parameters(), *module.named_buffers())}


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    use_source_checkout()
    import torch
    from gptqmodel.looper import forward_executor
    from gptqmodel.utils import looper_helpers

    from defuser_quant.integrations.gptqmodel import rehome

    refused = rehome.internals_refusal()
    if refused is not None:
        raise SystemExit(f"the rehome part refuses this GPTQModel ({refused}); nothing to compare")
    model, layer = _layer(args)
    device = torch.device("cpu")
    before = _tensors(layer)

    def stock() -> None:
        looper_helpers.rehome_module_to_device(layer, device, move_parameters=True, move_buffers=True, root_module=model)

    def lean() -> None:
        forward_executor.rehome_module_to_device(layer, device, move_parameters=True, move_buffers=True,
                                                 root_module=model)

    times: dict[str, list[float]] = {"stock": [], "lean": []}
    with rehome.lean_rehome() as stats:
        for fn in (stock, lean):
            fn()  # warm
        for _ in range(args.repeats):
            for name, fn in (("stock", stock), ("lean", lean)):
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    fn()
                times[name].append((time.perf_counter() - t0) / args.calls * 1000)
    median = {name: statistics.median(values) for name, values in times.items()}
    import gptqmodel

    return {
        "meta": {"command": " ".join(["python benchmarks/rehome_check.py", *argv]),
                 "python": platform.python_version(), "torch": torch.__version__, "gptqmodel": gptqmodel.__version__,
                 "machine": platform.machine(), "experts": args.experts, "calls": args.calls, "repeats": args.repeats},
        "modules": sum(1 for _ in layer.modules()),
        "per_call_ms": {name: [round(v, 4) for v in values] for name, values in times.items()},
        "median_ms": {name: round(v, 4) for name, v in median.items()},
        "stock_over_lean": round(median["stock"] / median["lean"], 2),
        "lean_calls": stats.as_dict(),  # every lean call answered by the walk: "stock" 0
        "layer_unchanged_by_stock": _tensors(layer) == before,
    }


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    result = run(args, argv)
    line = (f"{result['modules']} modules: GPTQModel's rehome {result['median_ms']['stock']:.3f} ms a call, the lean "
            f"part's {result['median_ms']['lean']:.3f} ms ({result['stock_over_lean']}x); "
            f"layer unchanged by GPTQModel's call: {result['layer_unchanged_by_stock']}")
    print(line)
    if args.output is not None:
        write_json(args.output, result)
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
