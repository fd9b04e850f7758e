"""Can a layer's experts be packed on the GPU, batched, with GPTQModel's exact bytes?

GPTQModel packs each finished module on a CPU worker (``PackableQuantLinear.pack_block`` ->
``pack_block_cpu``, its C++ extension): for every weight, ``q = clamp(nearbyint((w + zero * scale) /
scale), 0, maxq)`` in float32 from the module's bf16 dequantized weight, then 32 / bits codes per
int32 word; the zero points the same way. On an H200 run that is about 1.6 s of the finalize
workers' time per two Qwen3-30B-A3B layers, and the last layer's packing is on the critical path
(docs/performance.md, rounds 15 and 17). This script checks the batched solve's packing
(``BatchedSolve.pack``): ``torch_pack`` (:func:`defuser_quant.integrations.gptqmodel.packing.pack_words`)
does the same float32 operations (add, multiply, divide, round half to even, clamp: each correctly
rounded on the CPU and on CUDA, and with no multiply-add to contract) for many modules at once,
and the script compares its words with the extension's, module by module, and times both.

Inputs are what GPTQ hands the packer: random codes, positive float32 scales per group of
``--group-size`` input columns, integral zero points, the dequantized weight ``scale * (q - zero)``
cast to bf16, and ``g_idx`` in natural order or permuted as ``act_group_aware`` leaves it.

    python benchmarks/pack_exactness.py --output $OUT/pack_exactness_cuda.json
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _args import counts, whole  # noqa: E402
from _report import write_json  # noqa: E402
from _source import use_source_checkout  # noqa: E402

use_source_checkout()
# The same function the batched solve packs with (integrations/gptqmodel/packing.py).
from defuser_quant.integrations.gptqmodel.packing import pack_words as torch_pack  # noqa: E402


def make_inputs(modules: int, out: int, inp: int, group_size: int, bits: int, sym: bool, act_order: bool,
                seed: int = 0) -> dict[str, torch.Tensor]:
    """What GPTQ hands the packer for ``modules`` modules (CPU tensors, ``pack_block``'s layouts)."""
    g = torch.Generator().manual_seed(seed)
    groups = inp // group_size
    maxq = (1 << bits) - 1
    codes = torch.randint(0, maxq + 1, (modules, out, inp), generator=g)
    scales = torch.rand(modules, groups, out, generator=g) * 0.02 + 1e-4
    if sym:
        zeros = torch.full((modules, groups, out), float((maxq + 1) // 2))
    else:
        zeros = torch.randint(0, maxq + 1, (modules, groups, out), generator=g).to(torch.float32)
    g_idx = torch.arange(inp, dtype=torch.int32) // group_size
    if act_order:  # act_group_aware: each column keeps its group, the columns' order is permuted
        g_idx = g_idx[torch.randperm(inp, generator=g)]
    col_scale = scales.index_select(1, g_idx.long()).transpose(1, 2)
    col_zero = zeros.index_select(1, g_idx.long()).transpose(1, 2)
    weight = (col_scale * (codes.to(torch.float32) - col_zero)).to(torch.bfloat16)
    return {"weight": weight, "scales": scales, "zeros": zeros, "g_idx": g_idx}


def extension_pack(inputs: dict[str, torch.Tensor], bits: int) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """GPTQModel's ``pack_block_cpu`` on each module (its call in ``pack_block``); and the seconds."""
    from gptqmodel.nn_modules.qlinear.pack_block_ext import pack_block_cpu

    qweights, qzeros = [], []
    t = time.perf_counter()
    for b in range(inputs["weight"].shape[0]):
        qw, qz = pack_block_cpu(inputs["weight"][b], inputs["scales"][b], inputs["zeros"][b],
                                inputs["g_idx"].to(torch.int32), bits, 32, 8192, 1)
        qweights.append(qw)
        qzeros.append(qz)
    return qweights, qzeros, time.perf_counter() - t


def compare(args: argparse.Namespace, bits: int, sym: bool, act_order: bool) -> dict:
    inputs = make_inputs(args.modules, args.out, args.inp, args.group_size, bits, sym, act_order)
    want_w, want_z, ext_s = extension_pack(inputs, bits)
    device = torch.device(args.device)
    moved = {k: v.to(device) for k, v in inputs.items()}
    torch_pack(**{k: v[:1] if k != "g_idx" else v for k, v in moved.items()}, bits=bits)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    got_w, got_z = torch_pack(**moved, bits=bits)
    got_w, got_z = got_w.cpu(), got_z.cpu()  # (waits for the device)
    torch_s = time.perf_counter() - t
    equal = sum(torch.equal(a, b) and torch.equal(c, d) for a, b, c, d in zip(want_w, got_w, want_z, got_z, strict=True))
    return {"bits": bits, "sym": sym, "act_order": act_order, "modules": args.modules,
            "modules_equal": int(equal), "extension_s": round(ext_s, 4), "torch_s": round(torch_s, 4)}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--modules", type=int, default=128, help="modules packed together (a layer's experts of one role)")
    p.add_argument("--out", type=whole(32), default=768, help="out features (Qwen3-30B-A3B gate/up: 768)")
    p.add_argument("--inp", type=whole(32), default=2048, help="in features (Qwen3-30B-A3B gate/up: 2048)")
    p.add_argument("--group-size", type=int, default=128)
    p.add_argument("--bits", type=counts(2), default="4,2,8")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    if any(b not in (2, 4, 8) for b in args.bits):
        p.error(f"--bits: 2, 4 or 8 only (whole codes per 32-bit word), got {args.bits}")
    if args.modules < 1 or args.inp % 32 or args.out % 32 or args.group_size < 1 or args.inp % args.group_size:
        p.error("--modules must be >= 1, --inp and --out multiples of 32, --inp a multiple of --group-size")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device here; use --device cpu")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = [compare(args, bits, sym, act_order)
            for bits in args.bits for sym in (True, False) for act_order in (False, True)]
    for r in rows:
        print(f"{r['bits']} bit sym={r['sym']} act_order={r['act_order']}: {r['modules_equal']}/{r['modules']} modules "
              f"equal; extension {r['extension_s']:.3f} s, torch on {args.device} {r['torch_s']:.3f} s", flush=True)
    report = {"meta": {"command": shlex.join([sys.executable, *sys.argv]), "python": platform.python_version(),
                       "torch": torch.__version__, "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(0),
                       "shape": [args.modules, args.out, args.inp], "group_size": args.group_size},
              "rows": rows, "all_equal": all(r["modules_equal"] == r["modules"] for r in rows)}
    if args.output is not None:
        write_json(args.output, report)
    return 0 if report["all_equal"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
