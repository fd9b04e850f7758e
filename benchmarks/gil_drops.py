"""What a call that gives up the interpreter lock costs a thread beside busy ones (probes for issue 17's last finalize
window): a copy made while holding another lock, and a tensor's deallocation.

**Copies inside a lock.** ``block_finalize``'s extension pool read each member's processed scales, zeros and ``g_idx``
under GPTQModel's processor lock and copied them (``clone``) before letting it go, as GPTQModel's own finalize does;
the group worker takes the same lock for each member's state pops. A tensor copy gives up the interpreter lock, so a
holder that copies must take the interpreter lock back before it can let the processor's lock go, behind every thread
then running Python. This reproduces that shape without GPTQModel: ``--pool`` reader threads each take the lock, read
three tensors of a Qwen3-30B-A3B expert projection's result shapes, copy them inside or after the lock, make two more
copies, then sleep ``--ext-ms`` (the extension, which holds neither lock); ``--busy`` threads run pure Python; one
worker takes the lock every ``--ext-ms`` and records how long it waited. Each placement runs ``--seconds`` in turns,
``--repeat`` times.

**Frees.** A thread drops the last reference to ``--frees`` small tensors one by one, alone and then beside ``--busy``
threads running pure Python, ``--repeat`` times: a tensor's deallocation gives up the interpreter lock too, so beside
busy threads each one may wait up to the switch interval to get it back; so does a torch call with nothing to do
(``.to("cpu")`` of a CPU tensor). A dict pop, which does not, is timed the same way for reference.

    python benchmarks/gil_drops.py --output benchmarks/results/gil_drops_cpu.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from _args import whole
from _report import emit_json

PLACEMENTS = ("inside", "after")


def _busy_python(stop: threading.Event, loop: int, pause: float) -> None:
    """Pure Python (``loop`` additions) until ``stop``, sleeping ``pause`` seconds between loops (0: never)."""
    while not stop.is_set():
        total = 0
        for i in range(loop):
            total += i
        if pause:
            time.sleep(pause)


def run(placement: str, pool: int, busy: int, seconds: float, ext_ms: float) -> dict:
    """One turn: the worker's waits for the lock while the readers copy ``placement`` the lock."""
    if placement not in PLACEMENTS:
        raise ValueError(f"placement {placement!r}: choose from {PLACEMENTS}")
    lock, stop = threading.Lock(), threading.Event()
    state = {"q_scales": torch.rand(768, 16), "q_zeros": torch.full((768, 16), 8.0),
             "q_g_idx": torch.arange(2048, dtype=torch.int32) // 128}
    pause = ext_ms / 1e3

    def reader() -> None:
        while not stop.is_set():
            with lock:
                held = [state[k] for k in ("q_zeros", "q_scales", "q_g_idx")]
                copies = [t.clone() for t in held] if placement == "inside" else None
            if copies is None:
                copies = [t.clone() for t in held]
            copies[1].T.contiguous(), copies[0].T.contiguous()  # the extension's transposed inputs
            time.sleep(pause)

    waits: list[float] = []

    def worker() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            with lock:
                waits.append(time.perf_counter() - t0)
            time.sleep(pause)

    threads = ([threading.Thread(target=reader) for _ in range(pool)]
               + [threading.Thread(target=_busy_python, args=(stop, 20_000, pause / 4)) for _ in range(busy)]
               + [threading.Thread(target=worker)])
    try:
        for t in threads:
            t.start()
        time.sleep(seconds)
    finally:  # also on Ctrl-C: the threads end with the turn, nothing is written
        stop.set()
        for t in threads:
            if t.is_alive():
                t.join()
    ordered = sorted(waits)
    return {"placement": placement, "worker_takes": len(waits), "mean_wait_ms": round(statistics.mean(waits) * 1e3, 4),
            "p90_wait_ms": round(ordered[int(len(ordered) * 0.9)] * 1e3, 4), "max_wait_ms": round(ordered[-1] * 1e3, 4)}


def frees(count: int, busy: int) -> dict:
    """Microseconds a tensor's deallocation, a torch call that returns its input (``.to("cpu")`` of a CPU tensor) and
    a dict pop take a thread, alone (``busy`` 0) or beside ``busy`` threads running pure Python."""
    stop = threading.Event()
    threads = [threading.Thread(target=_busy_python, args=(stop, 10_000, 0.0)) for _ in range(busy)]
    for t in threads:
        t.start()
    try:
        tensors = [torch.zeros(16) for _ in range(count)]
        t0 = time.perf_counter()
        for i in range(count):
            tensors[i] = None
        free_us = (time.perf_counter() - t0) / count * 1e6
        probe = torch.zeros(16, dtype=torch.int32)
        t0 = time.perf_counter()
        for _ in range(count):
            probe.to("cpu")  # returns its input: nothing to do but the call
        noop_us = (time.perf_counter() - t0) / count * 1e6
        table = dict.fromkeys(range(count))
        t0 = time.perf_counter()
        for i in range(count):
            table.pop(i)
        pop_us = (time.perf_counter() - t0) / count * 1e6
    finally:
        stop.set()
        for t in threads:
            t.join()
    return {"busy": busy, "frees": count, "free_us": round(free_us, 3), "noop_to_us": round(noop_us, 3),
            "dict_pop_us": round(pop_us, 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pool", type=whole(1), default=14, help="reader threads (block_finalize's pool on 16 cores: 14)")
    p.add_argument("--busy", type=whole(0), default=4, help="threads running pure Python beside them")
    p.add_argument("--seconds", type=float, default=2.0, help="each turn's length")
    p.add_argument("--ext-ms", type=float, default=0.5, help="each reader's and the worker's lock-free pause, ms")
    p.add_argument("--repeat", type=whole(1), default=2, help="turns of each placement")
    p.add_argument("--frees", type=whole(1), default=2000, help="tensors freed one by one, alone and beside --busy")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    if not 0 < args.seconds <= 600 or not 0 <= args.ext_ms <= 1000:
        p.error(f"--seconds must be in (0, 600] and --ext-ms in [0, 1000], got {args.seconds} and {args.ext_ms}")
    torch.set_num_threads(1)  # one thread a copy, as in a worker pool of many threads
    turns = []
    for rnd in range(args.repeat):
        for placement in PLACEMENTS:
            turn = run(placement, args.pool, args.busy, args.seconds, args.ext_ms) | {"round": rnd}
            turns.append(turn)
            print(f"copies {placement} the lock: the worker took it {turn['worker_takes']} times, mean wait "
                  f"{turn['mean_wait_ms']:.3f} ms, p90 {turn['p90_wait_ms']:.3f} ms", flush=True)
    given = argv if argv is not None else sys.argv[1:]
    freed = [frees(args.frees, busy) | {"round": rnd} for rnd in range(args.repeat) for busy in (0, args.busy)]
    for f in freed:
        print(f"{f['frees']} tensors freed beside {f['busy']} busy threads: {f['free_us']:.2f} us each; a no-op "
              f".to() {f['noop_to_us']:.2f} us; a dict pop {f['dict_pop_us']:.3f} us", flush=True)
    result = {"command": " ".join(["python", "benchmarks/gil_drops.py", *given]),
              "cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
              "python": platform.python_version(), "switch_interval_s": sys.getswitchinterval(),
              "pool": args.pool, "busy": args.busy, "seconds": args.seconds, "ext_ms": args.ext_ms, "turns": turns,
              "frees": freed}
    emit_json(args.output, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
