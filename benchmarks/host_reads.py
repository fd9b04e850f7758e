"""How fast one decoder layer's checkpoint tensors reach the GPU: GPTQModel's way (``safe_open``
then ``copy_`` of each file-mapped tensor) against ``layer_reads`` (``pread`` into host buffers,
ordinary or pinned, then ``copy_``), and what pinning costs the other threads' CUDA launches.

    python benchmarks/host_reads.py --output benchmarks/results/host_reads_cuda.json

A Qwen3-30B-A3B layer's experts by default (384 bf16 tensors of 768 x 2048, 1.2 GB), written once
and read from the page cache (the file was just written, as in ``gptqmodel_gpu.py``)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def _timed(fn) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return round(time.perf_counter() - t0, 4)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from _args import whole

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tensors", type=whole(1), default=384)
    p.add_argument("--rows", type=whole(1), default=768)
    p.add_argument("--cols", type=whole(1), default=2048)
    p.add_argument("--output", type=Path, default=None)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("host_reads.py measures copies to a GPU: no CUDA device here")
    from _page_cache import evict
    from _source import use_source_checkout

    use_source_checkout()
    from safetensors import safe_open
    from safetensors.torch import save_file

    from defuser_quant.integrations.gptqmodel.layer_reads import read_tensors

    names = [f"t{i}" for i in range(args.tensors)]
    result: dict = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
                    "gpu": torch.cuda.get_device_name(0), "tensors": args.tensors,
                    "bytes": args.tensors * args.rows * args.cols * 2}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "layer.safetensors")
        g = torch.Generator().manual_seed(0)
        save_file({n: torch.randn(args.rows, args.cols, generator=g).to(torch.bfloat16) for n in names}, path)
        dst = [torch.empty(args.rows, args.cols, dtype=torch.bfloat16, device="cuda") for _ in names]

        def stock():
            with safe_open(path, framework="pt", device="cpu") as f:
                for n, d in zip(names, dst, strict=True):
                    d.copy_(f.get_tensor(n))

        def served(read):
            def copy():
                for n, d in zip(names, dst, strict=True):
                    d.copy_(read.take(path, n)[1])
            return copy

        result["stock_s"] = [_timed(stock) for _ in range(2)]
        # cold: the file's pages dropped from the page cache first (each figure after its own eviction)
        result["evicted"] = evict(path)
        result["stock_cold_s"] = _timed(stock)
        evict(path)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(4) as readers:
            cold = read_tensors({path: names}, pin=False, readers=readers)
        result["pageable_cold"] = {"read_s": round(time.perf_counter() - t0, 4), "copy_s": _timed(served(cold))}
        del cold
        with ThreadPoolExecutor(4) as readers:
            for pin in (False, True):
                key = "pinned" if pin else "pageable"
                rows = []
                for _ in range(2):  # the second read reuses PyTorch's cached pinned blocks
                    t0 = time.perf_counter()
                    read = read_tensors({path: names}, pin=pin, readers=readers)
                    read_s = time.perf_counter() - t0
                    rows.append({"read_s": round(read_s, 4), "copy_s": _timed(served(read))})
                    del read
                result[key] = rows
            # what a background pinned read costs the launches of another thread
            x = torch.zeros(1, device="cuda")

            def launches(n=20000):
                t0 = time.perf_counter()
                for _ in range(n):
                    x.add_(1)
                torch.cuda.synchronize()
                return round(time.perf_counter() - t0, 4)

            launches(2000)
            alone = launches()
            for pin in (False, True):
                done = threading.Event()

                def background(pin=pin):
                    read_tensors({path: names}, pin=pin, readers=readers, piece_bytes=64 << 20)
                    done.set()

                torch.cuda.empty_cache()
                empty_host = getattr(torch._C, "_host_emptyCache", None)
                if empty_host is not None:  # pin afresh, as a first layer does
                    empty_host()
                thread = threading.Thread(target=background)
                thread.start()
                during = launches()
                thread.join()
                result[f"launches_during_{'pinned' if pin else 'pageable'}_read_s"] = during
            result["launches_alone_s"] = alone
    text = json.dumps(result, indent=1)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
