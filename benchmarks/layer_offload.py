"""A quantized MoE layer moved back to the CPU: ``module.to("cpu")`` against ``staged_to_cpu``.

GPTQModel's ``post_quantize`` moves each finished layer with ``module.to("cpu")``; the lean
``layer_offload`` part uses :func:`defuser_quant.integrations.gptqmodel.layer_offload.staged_to_cpu`.
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
from _args import counts
from torch import nn

HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=768)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--busy-threads", type=counts(0), default=[0, 4], help="comma-separated thread counts to run under")
    p.add_argument("--staging-mib", type=int, default=64)
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
    from defuser_quant.integrations.gptqmodel.layer_offload import Staging, staged_to_cpu

    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("layer_offload.py needs CUDA")
    staging = Staging(nbytes=args.staging_mib << 20)
    rows = []
    for busy in args.busy_threads:
        stop = threading.Event()
        threads = [threading.Thread(target=_busy, args=(stop,), daemon=True) for _ in range(busy)]
        for t in threads:
            t.start()
        times: dict[str, list[float]] = {"module.to": [], "staged_to_cpu": []}
        try:
            for r in range(args.repeats):
                torch.manual_seed(r)
                layers = {"module.to": _layer(args), "staged_to_cpu": _layer(args)}
                layers["staged_to_cpu"].load_state_dict(layers["module.to"].state_dict())
                nbytes = sum(p.numel() * p.element_size() for p in layers["module.to"].parameters())
                order = ["module.to", "staged_to_cpu"] if r % 2 == 0 else ["staged_to_cpu", "module.to"]
                for name in order:
                    move = (lambda m=layers[name]: m.to("cpu")) if name == "module.to" else (
                        lambda m=layers[name]: staged_to_cpu(m, staging))
                    times[name].append(_time(move))
                if r == 0:
                    a, b = layers["module.to"].state_dict(), layers["staged_to_cpu"].state_dict()
                    assert all(b[k].device.type == "cpu" and torch.equal(a[k], b[k]) for k in a), "tensors differ"
                del layers
                torch.cuda.empty_cache()
        finally:
            stop.set()
            for t in threads:
                t.join()
        row = {"busy_threads": busy, "layer_bytes": nbytes, "same_tensors": True}
        for name, ts in times.items():
            row[name] = {"median_s": statistics.median(ts), "best_s": min(ts), "all_s": [round(t, 4) for t in ts],
                         "gb_per_s": nbytes / statistics.median(ts) / 1e9}
        row["speedup_median"] = row["module.to"]["median_s"] / row["staged_to_cpu"]["median_s"]
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
