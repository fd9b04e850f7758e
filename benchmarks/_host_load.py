"""How busy the host was while a benchmark ran one run, so that a slow run on a shared machine says so.

A run's seconds depend on the machine's other work as much as on the code: on the device hosts, a run
with every stage 1.4-2x slower than its repeats came from the host, not the code (round 54). Around each
run the launcher reads ``/proc/stat`` (all CPUs: time busy, time stolen by the hypervisor) and its
waited-for children's CPU time (``RUSAGE_CHILDREN``: the run's own processes and threads), and records:

* ``others_cores``: CPU seconds the rest of the machine was busy, per wall second (the run's own CPU
  time taken out): how many cores other work kept busy beside the run;
* ``steal_pct``: the share of all CPU time the hypervisor gave to other guests;
* ``run_cores``: the run's own CPU seconds per wall second;
* ``probe_ms``: a fixed single-threaded Python loop timed just before the run (slower: a loaded host
  or lower clocks).

Where ``/proc/stat`` cannot be read (not Linux) the CPU figures are None; the probe always runs.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

#: Iterations of the probe loop (about 20-40 ms of one core).
PROBE_LOOPS = 1_000_000


@dataclass(frozen=True)
class CpuTimes:
    """``/proc/stat``'s aggregate ``cpu`` line in seconds: busy (user, nice, system, irq, softirq),
    stolen, and everything (idle and iowait included); ``cpus``: how many ``cpuN`` lines it had."""

    busy: float
    steal: float
    total: float
    cpus: int


def read_cpu_times(path: str = "/proc/stat") -> CpuTimes | None:
    """The machine's CPU times so far, or None where ``path`` cannot be read or parsed."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    head = next((line.split() for line in lines if line.startswith("cpu ")), None)
    if head is None or len(head) < 9:
        return None
    try:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in head[1:9])
    except ValueError:
        return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    cpus = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    busy = user + nice + system + irq + softirq
    return CpuTimes(busy=busy / tick, steal=steal / tick, total=(busy + idle + iowait + steal) / tick, cpus=cpus)


def children_cpu_seconds() -> float:
    """User plus system seconds of this process's finished, waited-for children (and theirs)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def probe_ms(loops: int = PROBE_LOOPS) -> float:
    """Milliseconds a fixed pure-Python loop took on this thread."""
    t0 = time.perf_counter()
    total = 0
    for i in range(loops):
        total += i & 7
    return round((time.perf_counter() - t0) * 1e3, 1)


def summarize(before: CpuTimes | None, after: CpuTimes | None, wall_s: float, run_cpu_s: float,
              probe: float | None) -> dict:
    """The host-load record of one run (module docstring) from the CPU times around it."""
    record: dict = {"seconds": round(wall_s, 2), "probe_ms": probe, "run_cores": None, "others_cores": None,
                    "steal_pct": None, "cpus": None}
    if wall_s > 0:
        record["run_cores"] = round(run_cpu_s / wall_s, 2)
    if before is None or after is None or wall_s <= 0:
        return record
    total = after.total - before.total
    record["cpus"] = after.cpus
    record["others_cores"] = round(max(0.0, (after.busy - before.busy) - run_cpu_s) / wall_s, 2)
    record["steal_pct"] = round(100 * (after.steal - before.steal) / total, 2) if total > 0 else 0.0
    return record


@contextmanager
def host_load(into: dict, key: str = "host_load") -> Iterator[None]:
    """Measure the host's load around the enclosed run (a child process the block waits for) into
    ``into[key]``; recorded also when the block raises (a timed-out run says how loaded the host was)."""
    probe = probe_ms()
    before, children = read_cpu_times(), children_cpu_seconds()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        wall = time.perf_counter() - t0
        into[key] = summarize(before, read_cpu_times(), wall, children_cpu_seconds() - children, probe)


def host_markdown(rows: list[dict], label: Callable[[dict], str] = lambda r: r.get("run", r.get("variant", "?"))) -> str:
    """One table of the rows' host-load records, each run named by ``label`` (empty when none has one)."""
    loaded = [r for r in rows if r.get("host_load")]
    if not loaded:
        return ""
    lines = ["", "", "Host load during each run (other work's busy cores beside the run, of the machine's CPUs; "
             "hypervisor steal; the run's own cores; a fixed Python loop just before it):", "",
             "| run | others' cores | CPUs | steal % | run's cores | probe ms |", "|---|---:|---:|---:|---:|---:|"]
    for r in loaded:
        h = r["host_load"]
        cells = [h.get(k) for k in ("others_cores", "cpus", "steal_pct", "run_cores", "probe_ms")]
        lines.append(f"| {label(r)} | " + " | ".join("-" if v is None else str(v) for v in cells) + " |")
    return "\n".join(lines)
