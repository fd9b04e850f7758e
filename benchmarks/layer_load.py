"""Where one decoder layer's load to the GPU spends its time when other threads are busy: the per-tensor
``copy_`` loop GPTQModel's ``_copy_checkpoint_tensors_into_submodule`` runs, from resident host memory (what
``layer_reads`` serves), alone and beside threads that hold the interpreter lock.

    python benchmarks/layer_load.py --output benchmarks/results/layer_load_cuda.json

Inside a GPTQModel run layer 1's load takes the main thread 0.45-1.0 s while layer 0's finalizes run on other
threads, against 0.26-0.67 s for layer 0's load at the start with nothing beside it (round 52's timelines), and 0.21 s
for the copies alone on a quiet H200 host (round 15). This measures, for a Qwen3-30B-A3B layer's experts by default
(384 bf16 tensors of 768 x 2048, 1.2 GB), the same copies with

* sources: ``pageable`` (ordinary host tensors, as ``layer_reads`` reads them), ``pinned`` (page-locked; the pinning
  is timed apart) and ``device`` (the whole layer uploaded to one GPU buffer first, in 64 MiB pieces on a side stream:
  the upload is timed apart, then each copy is device to device);
* loops: ``per_tensor`` (one ``copy_`` per tensor into a fresh ``torch.empty``, as GPTQModel allocates and copies) and
  ``foreach`` (the tensors allocated, then one ``torch._foreach_copy_``: one call, one wait for the lock);
* beside: ``none``; ``python`` (``--busy`` threads running pure-Python loops, which hold the interpreter lock until
  the switch interval takes it); ``mixed`` (``--busy`` threads alternating about 1 ms of Python with a 16 MiB host
  copy that releases the lock, like GPTQModel's finalize workers: Python, then the pack extension).

``--beside``, ``--sources`` and ``--loops`` pick the cells (each a comma list; all by default). ``--switch-intervals``
(microseconds, a comma list; default: the interpreter's own, 5000) times every cell once per interval, the interval set
just for the timed loop, as a part that lowered it only for a layer's load would (each cell records its
``switch_interval_us``).

Each cell is timed ``--repeats`` times (the device synchronized before and after), fewer when one time passes
``--cell-seconds``; no cell starts after ``--deadline`` seconds (the rest are listed as skipped). The JSON keeps every
time and the command, and is written again after each cell, so a run cut short keeps what it measured. ``--device
cpu`` runs the same loops into host memory (a dry run: no upload, no pinning)."""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from _report import write_json  # noqa: E402

PIECE_BYTES = 64 << 20
SOURCES = ("pageable", "pinned", "device")
LOOPS = ("per_tensor", "foreach")
BESIDE = ("none", "python", "mixed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from _args import whole

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tensors", type=whole(1), default=384)
    p.add_argument("--rows", type=whole(1), default=768)
    p.add_argument("--cols", type=whole(1), default=2048)
    p.add_argument("--busy", type=whole(1), default=8, help="threads beside the load (GPTQModel's CPU workers: 8)")
    p.add_argument("--repeats", type=whole(1), default=3)
    p.add_argument("--cell-seconds", type=float, default=5.0, help="no further repeat of a cell after a time this long")
    p.add_argument("--deadline", type=float, default=90.0, help="seconds after which no cell starts")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--beside", type=_choices(BESIDE), default=BESIDE, help=f"comma list of {', '.join(BESIDE)}")
    p.add_argument("--sources", type=_choices(SOURCES), default=SOURCES,
                   help=f"comma list of {', '.join(SOURCES)} (with --device cpu only pageable is measured)")
    p.add_argument("--loops", type=_choices(LOOPS), default=LOOPS, help=f"comma list of {', '.join(LOOPS)}")
    p.add_argument("--switch-intervals", type=_intervals, default=None,
                   help="comma list of switch intervals in microseconds, each cell timed at each (default: the "
                        "interpreter's own)")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    if args.device == "cpu" and "pageable" not in args.sources:
        p.error(f"--sources {','.join(args.sources)} with --device cpu: a dry run on the CPU measures only pageable")
    return args


def _choices(allowed: tuple[str, ...]) -> Callable[[str], tuple[str, ...]]:
    def parse(text: str) -> tuple[str, ...]:
        picked = tuple(x for x in text.split(",") if x)
        unknown = [x for x in picked if x not in allowed]
        if unknown or not picked:
            raise argparse.ArgumentTypeError(f"{text!r}: pick one or more of {', '.join(allowed)}, comma separated")
        return picked
    return parse


def _intervals(text: str) -> tuple[int, ...]:
    try:
        picked = tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        picked = ()
    if not picked or min(picked) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: whole microseconds >= 1, comma separated (Python's default: 5000)")
    return picked


@contextlib.contextmanager
def switch_interval(microseconds: int | None):
    """The interpreter's switch interval set to ``microseconds`` inside (None: left as it is), restored after."""
    if microseconds is None:
        yield
        return
    before = sys.getswitchinterval()
    sys.setswitchinterval(microseconds / 1e6)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class Busy:
    """``count`` threads that keep the interpreter busy (``kind``: ``python`` or ``mixed``) until :meth:`stop`."""

    def __init__(self, kind: str, count: int) -> None:
        self.kind, self.stopping = kind, threading.Event()
        self.rounds = [0] * count
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(count)]

    def _run(self, index: int) -> None:
        a = torch.empty(PIECE_BYTES // 4, dtype=torch.uint8)
        b = torch.empty_like(a)
        while not self.stopping.is_set():
            deadline = time.perf_counter() + 0.001
            while time.perf_counter() < deadline:  # about 1 ms of bytecode holding the lock
                sum(i * i for i in range(200))
            if self.kind == "mixed":
                b.copy_(a)  # a host copy that releases the lock, as a C extension does
            self.rounds[index] += 1

    def __enter__(self) -> Busy:
        for t in self.threads:
            t.start()
        time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join()


def upload(flat: torch.Tensor, device: str) -> tuple[torch.Tensor, float]:
    """``flat`` (host bytes) copied to one device buffer in PIECE_BYTES pieces on a side stream; (buffer, seconds)."""
    _sync(device)
    t0 = time.perf_counter()
    out = torch.empty(flat.numel(), dtype=torch.uint8, device=device)
    if device == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for start in range(0, flat.numel(), PIECE_BYTES):
                out[start:start + PIECE_BYTES].copy_(flat[start:start + PIECE_BYTES], non_blocking=True)
        torch.cuda.current_stream().wait_stream(side)
        out.record_stream(side)
    else:
        out.copy_(flat)
    _sync(device)
    return out, time.perf_counter() - t0


def views(flat: torch.Tensor, count: int, rows: int, cols: int) -> list[torch.Tensor]:
    per = rows * cols * 2
    return [flat[i * per:(i + 1) * per].view(torch.bfloat16).view(rows, cols) for i in range(count)]


def loop(kind: str, sources: list[torch.Tensor], device: str) -> Callable[[], None]:
    def per_tensor() -> None:
        for s in sources:
            torch.empty(s.shape, dtype=s.dtype, device=device).copy_(s)

    def foreach() -> None:
        targets = [torch.empty(s.shape, dtype=s.dtype, device=device) for s in sources]
        torch._foreach_copy_(targets, sources)

    return per_tensor if kind == "per_tensor" else foreach


def timed(fn: Callable[[], None], device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return round(time.perf_counter() - t0, 6)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("layer_load.py measures copies to a GPU: no CUDA device here (--device cpu for a dry run)")
    per = args.rows * args.cols * 2
    g = torch.Generator().manual_seed(0)
    block = torch.randint(0, 256, (PIECE_BYTES,), dtype=torch.uint8, generator=g)
    flat = block.repeat(-(-args.tensors * per // PIECE_BYTES))[:args.tensors * per].clone()  # the bytes do not matter
    result: dict = {"command": "python " + " ".join([sys.argv[0], *(argv if argv is not None else sys.argv[1:])]),
                    "device": torch.cuda.get_device_name(0) if device == "cuda" else "cpu",
                    "torch": torch.__version__, "python": sys.version.split()[0],
                    "switch_interval_s": sys.getswitchinterval(), "tensors": args.tensors, "bytes": flat.numel(),
                    "busy_threads": args.busy, "cells": []}
    sources: dict[str, list[torch.Tensor]] = {}
    if "pageable" in args.sources:
        sources["pageable"] = views(flat, args.tensors, args.rows, args.cols)
    if device == "cuda" and "pinned" in args.sources:  # only the sources picked are built: pinning takes seconds
        t0 = time.perf_counter()
        pinned = torch.empty(flat.numel(), dtype=torch.uint8, pin_memory=True)
        pinned.copy_(flat)
        result["pin_s"] = round(time.perf_counter() - t0, 4)
        sources["pinned"] = views(pinned, args.tensors, args.rows, args.cols)
    if device == "cuda" and "device" in args.sources:
        uploads = []
        for _ in range(args.repeats):
            staged, seconds = upload(flat, device)
            uploads.append(round(seconds, 4))
        result["upload_s"] = uploads  # pageable host -> one device buffer, 64 MiB pieces, side stream
        sources["device"] = views(staged, args.tensors, args.rows, args.cols)
    loop("per_tensor", views(flat, args.tensors, args.rows, args.cols)[:8], device)()  # first-use costs out of the cells
    started, result["skipped"] = time.perf_counter(), []
    try:
        measure(args, sources, device, result, started)
    except KeyboardInterrupt:
        result["interrupted"] = True
        write(result, args.output)
        print(f"interrupted: {len(result['cells'])} cells measured"
              + (f", kept in {args.output}" if args.output else ""), file=sys.stderr)
        return 130
    write(result, args.output)
    if args.output:
        print(f"wrote {args.output}")
    else:
        print(json.dumps(result, indent=1))
    return 0


def measure(args: argparse.Namespace, sources: dict[str, list[torch.Tensor]], device: str, result: dict,
            started: float) -> None:
    """Every cell (see the module docstring) into ``result["cells"]``, the file written after each."""
    intervals = args.switch_intervals or (None,)
    for beside in args.beside:
        for source, tensors in sources.items():
            for kind in args.loops:
                for us in intervals:
                    name = f"{beside}/{source}/{kind}" + (f"/si{us}" if us is not None else "")
                    if time.perf_counter() - started > args.deadline:
                        result["skipped"].append(name)
                        continue
                    run = loop(kind, tensors, device)
                    with Busy(beside, args.busy) if beside != "none" else contextlib.nullcontext() as busy:
                        with switch_interval(us):
                            times = repeat(run, device, args.repeats, args.cell_seconds)
                    cell = {"beside": beside, "source": source, "loop": kind,
                            "switch_interval_us": us if us is not None else round(sys.getswitchinterval() * 1e6),
                            "seconds": times, "median_s": round(statistics.median(times), 6),
                            "busy_rounds": sum(busy.rounds) if busy is not None else None}
                    result["cells"].append(cell)
                    print(f"{name:34s} median {cell['median_s']:.4f} s  {times}", flush=True)
                    write(result, args.output)


def repeat(run: Callable[[], None], device: str, times: int, cell_seconds: float) -> list[float]:
    out: list[float] = []
    while len(out) < times and (not out or out[-1] <= cell_seconds):
        out.append(timed(run, device))
    return out


def write(result: dict, output: Path | None) -> None:
    if output is not None:
        write_json(output, result)


if __name__ == "__main__":
    raise SystemExit(main())
