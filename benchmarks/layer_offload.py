"""A MoE layer moved between the GPU and the CPU: ``module.to`` against the staged moves.

GPTQModel's ``post_quantize`` moves each finished layer with ``module.to("cpu")``; the lean
``layer_offload`` part uses :func:`defuser_quant.integrations.gptqmodel.layer_offload.staged_to_cpu`
(``--directions to-cpu``). GPTQModel's ``pre_quantize`` moves layer 0, loaded on the CPU for the input
capture, with ``module.to("cuda")``; the lean ``layer_onload`` part uses ``stage_uploads`` and
``swap_in`` (``--directions to-gpu``).
One layer of Qwen3-30B-A3B shape by default (128 experts x gate/up/down nn.Linear in bf16, plus
the attention projections): 1.2 GB on the GPU. Each repeat builds the layer on the GPU again and
times both moves, alternating which goes first; the first repeat also checks that both give the
same tensors. ``--busy-threads N`` keeps N Python threads issuing small CUDA ops meanwhile (as
GPTQModel's device workers do while the main thread moves a layer), to see the GIL's share.

    python benchmarks/layer_offload.py --output $OUT/layer_offload.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch
from _args import counts, whole
from torch import nn

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=whole(1), default=128)
    p.add_argument("--hidden", type=whole(1), default=2048)
    p.add_argument("--intermediate", type=whole(1), default=768)
    p.add_argument("--repeats", type=whole(1), default=5)
    p.add_argument("--busy-threads", type=counts(0), default=[0, 4], help="comma-separated thread counts to run under")
    p.add_argument("--staging-mib", type=whole(1), default=64)
    p.add_argument("--directions", default="to-cpu,to-gpu",
                   help="comma-separated: to-cpu (post_quantize's move), to-gpu (pre_quantize's move of layer 0)")
    p.add_argument("--label", default="", help="free text stored in the JSON (e.g. the commit)")
    p.add_argument("--output", type=Path, default=None)
    return p.parse_args(argv)


def _layer(args: argparse.Namespace) -> nn.Module:
    h, i = args.hidden, args.intermediate
    kw = {"device": "cuda", "dtype": torch.bfloat16, "bias": False}
    experts = nn.ModuleList(
        nn.ModuleDict({"gate": nn.Linear(h, i, **kw), "up": nn.Linear(h, i, **kw), "down": nn.Linear(i, h, **kw)})
        for _ in range(args.experts)
    )
    attention = nn.ModuleDict({"q": nn.Linear(h, 4096, **kw), "k": nn.Linear(h, 512, **kw),
                               "v": nn.Linear(h, 512, **kw), "o": nn.Linear(4096, h, **kw)})
    return nn.ModuleDict({"experts": experts, "attention": attention, "router": nn.Linear(h, args.experts, **kw)})


def _busy(stop: threading.Event) -> None:
    x = torch.ones(64, device="cuda")
    while not stop.is_set():
        x.mul_(1.0)


def _upload(module: nn.Module, staging) -> None:
    from defuser_quant.integrations.gptqmodel.layer_offload import stage_uploads, swap_in

    device = torch.device("cuda", torch.cuda.current_device())
    swap_in(module, stage_uploads(module, staging, device), device)


def _to_cpu(module: nn.Module, staging) -> None:
    from defuser_quant.integrations.gptqmodel.layer_offload import staged_to_cpu

    staged_to_cpu(module, staging)


#: direction -> (stock name, staged name, name -> move(module, staging))
DIRECTIONS = {
    "to-cpu": ("module.to", "staged_to_cpu", {"module.to": lambda m, s: m.to("cpu"), "staged_to_cpu": _to_cpu}),
    "to-gpu": ("module.to(cuda)", "stage_uploads", {"module.to(cuda)": lambda m, s: m.to("cuda"), "stage_uploads": _upload}),
}


def _time(fn) -> float:
    torch.cuda.synchronize()
    begin = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - begin


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(HERE))
    from _source import use_source_checkout

    use_source_checkout()
    from defuser_quant.integrations.gptqmodel.layer_offload import Staging

    args = parse_args(argv)
    directions = [d for d in args.directions.split(",") if d]
    unknown = sorted(set(directions) - set(DIRECTIONS))
    if unknown or not directions:
        raise SystemExit(f"layer_offload.py: --directions takes {', '.join(DIRECTIONS)}, got {args.directions!r}")
    if not torch.cuda.is_available():
        raise SystemExit("layer_offload.py needs CUDA")
    staging = Staging(nbytes=args.staging_mib << 20)
    rows = []
    for direction in directions:
        stock, staged, moves = DIRECTIONS[direction]
        for busy in args.busy_threads:
            stop = threading.Event()
            threads = [threading.Thread(target=_busy, args=(stop,), daemon=True) for _ in range(busy)]
            for t in threads:
                t.start()
            times: dict[str, list[float]] = {stock: [], staged: []}
            try:
                for r in range(args.repeats):
                    torch.manual_seed(r)
                    layers = {stock: _layer(args), staged: _layer(args)}
                    layers[staged].load_state_dict(layers[stock].state_dict())
                    if direction == "to-gpu":  # both start on the CPU, as layer 0 does
                        for m in layers.values():
                            m.to("cpu")
                    nbytes = sum(p.numel() * p.element_size() for p in layers[stock].parameters())
                    order = [stock, staged] if r % 2 == 0 else [staged, stock]
                    for name in order:
                        times[name].append(_time(lambda m=layers[name], name=name: moves[name](m, staging)))
                    if r == 0:
                        a, b = layers[stock].state_dict(), layers[staged].state_dict()
                        assert all(b[k].device == a[k].device and torch.equal(a[k], b[k]) for k in a), "tensors differ"
                    del layers
                    torch.cuda.empty_cache()
            finally:
                stop.set()
                for t in threads:
                    t.join()
            row = {"direction": direction, "busy_threads": busy, "layer_bytes": nbytes, "same_tensors": True}
            for name, ts in times.items():
                row[name] = {"median_s": statistics.median(ts), "best_s": min(ts), "all_s": [round(t, 4) for t in ts],
                             "gb_per_s": nbytes / statistics.median(ts) / 1e9}
            row["speedup_median"] = row[stock]["median_s"] / row[staged]["median_s"]
            rows.append(row)
            print(json.dumps(row))
    result = {
        "command": "python benchmarks/layer_offload.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "label": args.label,
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "rows": rows,
    }
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
