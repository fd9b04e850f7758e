"""llm-compressor on 1 vs N GPUs (torchrun, NCCL): stock recipe vs DefuseModifier routed / all, per stage.

Builds the random qwen3_moe of ``gptqmodel_gpu.py`` (Qwen3-30B-A3B layers: 128 experts, hidden
2048, moe_intermediate 768, top-8; bf16; default 2 layers) and calibration rows from the bundled
corpus (default 128 x 256 tokens), then runs GPTQ W4A16 (group 128) with ``oneshot`` for each
variant, once in one process and once under ``torchrun --nproc-per-node N`` (one GPU each):

* ``stock``  - llm-compressor 0.14 as shipped (its own MoE linearization, all experts calibrated:
               ``oneshot``'s default ``moe_calibrate_all_experts``); our integration is not imported;
* ``routed`` - ``DefuseModifier(routing="routed")`` first in the recipe (grouped expert GEMMs);
* ``all``    - ``DefuseModifier(routing="all")`` (grouped);
* ``routed-loop`` / ``all-loop`` - the same with ``grouped=False`` (the per-expert loop); their
               checkpoint is compared with the grouped variant's.
* ``all-rehearse`` - ``all`` with ``rehearse=True`` (opt-in): the calibration's and the solve's kernels
               launched once ahead on a background thread (``integrations/llmcompressor/rehearse.py``); the
               checkpoint must be ``all``'s (``checkpoint_vs_unrehearsed``). Round 45 ran it as the
               default, ``all`` then, against ``all-norehearse``.
* ``all-syncfree`` - ``all`` with ``sync_free_propagation=True`` (opt-in): the propagation passes' grouped
               forwards without their host sync per block call; the checkpoint must be ``all``'s
               (``checkpoint_vs_synced``).
* ``all-nosync`` - ``all`` with ``sync_free_calibration=True`` and ``sync_free_propagation=True`` (both opt-in):
               no host sync per block call in either pass (the calibration calls' rows per expert counted on the
               device); the checkpoint must be ``all``'s (``checkpoint_vs_synced``) and so must the coverage counts.
* ``all-mmloop`` - ``all`` with the Hessian products of equal spans taken one ``mm`` per expert, as before round 46
               (``calibration.gram.STACKED_DEVICES`` emptied in the run's process); the checkpoint must be
               ``all``'s (``checkpoint_vs_stacked``). Each row's ``hessian_batching.stacked_checks`` lists the
               problem shapes whose one ``bmm`` was checked and whether it gave the ``mm`` products bit for bit.
* ``all-looppack`` - ``all`` with ``batched_compress=False``: the save packs every quantized module with
               compressed-tensors' one-by-one loop, as before round 47 (the default packs alike modules in stacked
               chunks on a GPU; each row's ``compression_batching`` says what); the checkpoint must be ``all``'s
               (``checkpoint_vs_batched_pack``). Round 47's first call ran the stacked packing as ``all-batchpack``.
* ``all-frozensave`` - ``all`` with ``frozen_save=True`` (opt-in): the save runs with the heap frozen, so the
               full garbage collection that came in it (``gc_full.by_stage``) walks only what the save allocates; the
               checkpoint must be ``all``'s (``checkpoint_vs_unfrozen``); each row's ``frozen_save`` says what ran.
* ``all-unshared`` - ``all`` with ``share_hessians=False``: every gate/up Hessian takes each call's
               product itself; the checkpoint must be ``all``'s (``checkpoint_vs_shared``).
* ``routed-onewriter`` / ``all-onewriter`` - the same with ``save_threads=1``: Transformers writes
               the checkpoint's shards one by one (the default variants write them with
               DefuseModifier's writer pool, one shard per thread); the tensors must be identical.

``--gil-probe`` adds ``gil_probe`` to every row, one entry per rank: how late a thread that sleeps 2 ms
gets Python's interpreter lock back, sampled through ``oneshot`` (``_gil_probe.py``).
``--variants`` takes ``name`` (1 and N processes) or ``name@1`` / ``name@N`` (that count only).
Every rank gets its own slice of the calibration rows (``calibration.distributed.rank_share``;
llm-compressor 0.14 itself would give every rank the first 1/N of an identical dataset). Before
the timed ``oneshot`` each rank warms up the process group (NCCL builds its communicator on the
first collective, ~1-2 s, paid once per job and counted in the end-to-end time).

Before each run the launcher calls ``os.sync()`` (untimed, ``sync_before_s``): every run starts
with the earlier runs' checkpoints written back, so the run order does not slow a later save.
Each row's ``host_load`` (``_host_load.py``) says how busy the machine was beside the run (other work's cores,
hypervisor steal, the run's own cores, a Python probe); ``host_table`` lists them.

Per run: ``oneshot`` wall time (calibrate + quantize + save; slowest rank) and end to end (the
launcher's process, imports and model load included); per rank: ``torch.cuda.max_memory_allocated``,
stage times (``_llmc_stages.py``: setup, calibration forward, propagation forward, Hessian reduce,
solve, qparam broadcast, our rank sync and barrier, finalize, save; wall and CPU seconds; CUDA
synchronized at each boundary; plus ``experts_host``, the host seconds inside the experts blocks'
forwards, not synchronized), how many block calls ran grouped or looped (and why), and for our
variants the coverage totals (they must agree and equal the one-process totals), and ``gc_full``: the interpreter's
full garbage collections during ``oneshot`` (how many, their seconds, the longest, and ``by_stage``: the top-level
stage each came in; each holds the interpreter lock while it walks every tracked object). The N-process
checkpoint is compared with the one-process one (logits on a fixed prompt: cosine and max
difference). Each of our runs is also compared with stock at the same process count (``vs_stock``:
oneshot speed ratio, peak memory ratio, how many packed weights are identical and the largest
weight-scale difference; ``all`` calibrates like stock, every token through every expert, so its
checkpoint should match; ``routed`` calibrates differently). Prints markdown tables (speed-up =
1-process time / N-process time) and writes JSON
with the command line, after every run, under ``benchmarks/results/`` (default ``distributed_cuda.json``).
``--deadline`` skips the runs that would not finish in time, so one device call always leaves a JSON.

Triton compiles a kernel the first time a process needs it and caches it on disk, so the first
timed run would pay for compiles the later ones load (compressed-tensors' quantize kernel: ~1 s
of the first run's save on an H200). Every row records ``triton_compiles`` (per rank: Triton
kernels compiled inside the timed ``oneshot``, ``_triton_compiles.py``; null without Triton) and
the tables mark a run that compiled any. ``--warmup`` first runs the first planned variant once,
untimed, in one process on ``--warmup-samples`` calibration rows (default 8) of the same model,
so the kernels are compiled at the real shapes before any timed run (``warmup`` in the JSON:
variant, samples, seconds, error, triton_compiles; its checkpoint is deleted).

The host of a GPU machine can run stock's host-bound loop at quite different speeds from one run
to the next (38-76 s for the same stock ``oneshot`` on one H200 host). ``--repeat N`` runs the
variant list N times, interleaved, each run compared with the stock run of its own round
(``repeat`` in each row; the first tables show round 0), and ``repeat_table`` gives every
variant's ``oneshot`` per round, its median, and the median, lowest and highest ratio to stock.

    python benchmarks/distributed_gpu.py --deadline 450          # 2 GPUs: stock, routed, all (1 and 2 GPUs)
    python benchmarks/distributed_gpu.py --variants routed,routed-loop@1 --layers 1
    python benchmarks/distributed_gpu.py --warmup --deadline 450  # Triton compiles in an untimed run first
    python benchmarks/distributed_gpu.py --variants stock@1,routed@1,all@1 --warmup --repeat 2   # medians over rounds
    .venv/bin/python benchmarks/distributed_gpu.py --device cpu --tiny   # gloo smoke run, 2 CPU processes

Needs llmcompressor==0.14.0.1 (with compressed-tensors==0.19.0, transformers<=5.17) and this
package importable (``pip install -e .``, or ``PYTHONPATH=.`` from a source checkout). Budget on
2 x H200 at the default shape: 45-70 s per run end to end, 6 runs plus ~15 s model build and
~10 s per logits comparison.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

WORKER_T0 = time.perf_counter()

from _args import check_shape  # noqa: E402
from _host_load import host_load, host_markdown  # noqa: E402
from _page_cache import write_back  # noqa: E402
from _report import write_json  # noqa: E402
from gptqmodel_gpu import add_shape_args  # noqa: E402  the same model shape flags (this folder is on sys.path)
from gptqmodel_gpu import compare_checkpoints as compare_tensors  # noqa: E402  the same tensor-by-tensor comparison

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LLMC_INTEGRATION = "defuser_quant.integrations.llmcompressor"
VARIANTS = ("stock", "routed", "all", "routed-loop", "all-loop", "routed-onewriter", "all-onewriter", "all-unshared",
            "all-rehearse", "all-syncfree", "all-mmloop", "all-looppack", "all-nosync", "all-frozensave")
DEFAULT_VARIANTS = ("stock", "routed", "all")
#: The recipe's W4A16 group size: every quantized Linear's input width must be a multiple of it.
GROUP_SIZE = 128
TINY = dict(layers=2, experts=8, hidden=128, intermediate=128, top_k=2, heads=4, kv_heads=2, head_dim=32, vocab=1024,
            samples=16, seq_len=64)
IGNORE = ["lm_head", "re:.*mlp.gate$"]
#: stages in the tables (max over ranks); the JSON keeps every stage of every rank
STAGES = ("setup", "offload_setup", "calibrate_forward", "propagate_forward", "experts_host", "epoch_end", "hessian_reduce", "solve",
          "qparam_broadcast", "rank_sync", "barrier", "finalize", "save", "other")
SETUP = ("pre_process", "dataloader", "linearize", "initialize", "trace")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from _args import whole  # beside this script, on sys.path when it runs (or is imported by the tests)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny shape for a CPU smoke run: " + json.dumps(TINY))
    p.add_argument("--nproc", type=whole(2), default=2,
                   help="processes of the distributed runs (one GPU each; at least 2: each variant's run in one "
                        "process is compared with its run in N)")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS),
                   help=f"comma-separated, from {VARIANTS}; NAME@1 or NAME@N runs only that process count")
    p.add_argument("--layers", type=whole(1), default=2)
    add_shape_args(p)
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir, removed)")
    p.add_argument("--timeout", type=whole(1), default=900, help="seconds per run")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds for the whole benchmark: runs that would start with less than --min-run left are skipped")
    p.add_argument("--min-run", type=float, default=60.0, help="seconds a run needs at least (with --deadline)")
    p.add_argument("--warmup", action="store_true",
                   help="run the first planned variant once, untimed, in one process on --warmup-samples rows first "
                        "(Triton compiles its kernels at the real shapes then)")
    p.add_argument("--warmup-samples", type=int, default=8, help="calibration rows of the --warmup run")
    p.add_argument("--repeat", type=int, default=1,
                   help="run the variant list N times, interleaved (stock, routed, all, stock, ...): each run is "
                        "compared with the stock run of its own round, and a table gives the medians")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default benchmarks/results/distributed_<device>[_tiny].json)")
    p.add_argument("--gil-probe", action="store_true",
                   help="sample the interpreter lock's hand-back delay through oneshot (gil_probe: one entry per rank)")
    p.add_argument("--twice", action="store_true",
                   help="run each timed oneshot again in the same process on a freshly loaded model (oneshot_again_s): "
                        "the difference is what the process's first use of its kernels, caches and imports cost")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--calibration", type=Path, default=None, help=argparse.SUPPRESS)  # worker: its rows (calibration_file)
    args = p.parse_args(argv)
    if args.warmup_samples < 1:
        p.error("--warmup-samples must be at least 1")
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    check_shape(p, args)
    for flag, width in (("--hidden", args.hidden), ("--intermediate", args.intermediate),
                        ("--heads x --head-dim", args.heads * args.head_dim)):
        if width % GROUP_SIZE:
            p.error(f"{flag} gives quantized rows of {width} columns, not a multiple of W4A16's group size {GROUP_SIZE} "
                    "(llm-compressor splits every row into groups of it; both variants would fail): use a multiple of it")
    return args


def plan(variants: str, nproc: int) -> list[tuple[str, int]]:
    """``[(variant, process count)]`` from ``--variants`` (``name``, ``name@1``, ``name@N``)."""
    runs = []
    for item in (v for v in variants.split(",") if v):
        name, _, count = item.partition("@")
        if name not in VARIANTS:
            raise SystemExit(f"unknown variant {name!r}; choose from {VARIANTS}")
        if count not in ("", "1", "N", str(nproc)):
            raise SystemExit(f"{item}: the process count must be 1 or N (= --nproc {nproc})")
        counts = (1, nproc) if count == "" else (1,) if count == "1" else (nproc,)
        runs += [(name, n) for n in counts]
    return runs


def _env() -> dict[str, str]:
    env = {**os.environ, "LLM_COMPRESSOR_LOG_LEVEL": os.environ.get("LLM_COMPRESSOR_LOG_LEVEL", "WARNING")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ----- parent -----------------------------------------------------------------------------------
def run_one(variant: str, nproc: int, args: argparse.Namespace, work: Path, timeout: float,
            calibration: Path | None = None, name: str | None = None) -> dict:
    """One ``oneshot`` of ``variant`` in ``nproc`` processes; the ranks' results merged.

    ``calibration``: the rows file (default the worker's ``WORKDIR/calibration.json``); ``name``:
    of its output folder and log under ``work`` (default ``VARIANT-nN``)."""
    name = name or f"{variant}-n{nproc}"
    out = work / name
    out.mkdir(exist_ok=True)
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd = [sys.executable, *launcher, str(Path(__file__).resolve()), "--worker", variant, "--workdir", str(work),
           "--device", args.device, "--output", str(out), "--seq-len", str(args.seq_len)]
    if calibration is not None:
        cmd += ["--calibration", str(calibration)]
    if args.gil_probe:
        cmd.append("--gil-probe")
    if args.twice:
        cmd.append("--twice")
    row: dict = {"variant": variant, "nproc": nproc, "sync_before_s": write_back()}
    t0 = time.perf_counter()
    try:
        with host_load(row):
            proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        (work / f"{name}.log").write_text(str(exc.stdout or "") + str(exc.stderr or ""))
        return {**row, "error": f"timeout after {timeout:.0f}s"}
    (work / f"{name}.log").write_text(proc.stdout + proc.stderr)
    ranks = sorted(out.glob("rank*.json"))
    if proc.returncode != 0 or len(ranks) != nproc:
        return {**row, "error": f"exit {proc.returncode}", "log_tail": (proc.stdout + proc.stderr)[-3000:]}
    results = [json.loads(p.read_text()) for p in ranks]
    coverages = [r["coverage_totals"] for r in results]
    row.update(
        oneshot_s=round(max(r["oneshot_s"] for r in results), 2),
        end_to_end_s=round(time.perf_counter() - t0, 2),
        worker_s=[round(r["worker_s"], 2) for r in results],
        peak_gpu_gib=[None if r["peak_gpu_bytes"] is None else round(r["peak_gpu_bytes"] / 2**30, 2) for r in results],
        stages_max=stage_summary([r["stages"] for r in results], [r["oneshot_s"] for r in results]),
        stages_per_rank=[r["stages"] for r in results],
        grouped_use=[r["grouped_use"] for r in results],
        hessian_batching=[r.get("hessian_batching") for r in results],
        rehearsal=[r.get("rehearsal") for r in results],
        compression_batching=[r.get("compression_batching") for r in results],
        frozen_save=[r.get("frozen_save") for r in results],
        gc_full=[r.get("gc_full") for r in results],
        experts_classes=results[0]["experts_classes"],
        coverage_totals=coverages[0],
        coverage_same_on_every_rank=all(c == coverages[0] for c in coverages),
        triton_compiles=[r.get("triton_compiles") for r in results],
        checkpoint=str(out / "checkpoint"),
    )
    if args.gil_probe:
        row["gil_probe"] = [r.get("gil_probe") for r in results]
    if args.twice:
        row["oneshot_again_s"] = round(max(r["oneshot_again_s"] for r in results), 2)
    return row


def write_calibration(rows: list[dict], path: Path, samples: int | None = None) -> int:
    """The calibration rows (the first ``samples`` of them) as JSON at ``path``; how many were written."""
    rows = rows if samples is None else rows[:samples]
    path.write_text(json.dumps(rows))
    return len(rows)


def run_warmup(variant: str, rows: list[dict], args: argparse.Namespace, work: Path, timeout: float) -> dict:
    """``variant`` once in one process, untimed, on ``--warmup-samples`` rows of the same model, so
    Triton compiles (and caches) its kernels at the real shapes before any timed run; its output
    folder is deleted. Returns the JSON's ``warmup``."""
    import shutil

    samples = write_calibration(rows, work / "warmup-calibration.json", args.warmup_samples)
    t0 = time.perf_counter()
    row = run_one(variant, 1, args, work, timeout, calibration=work / "warmup-calibration.json", name=f"warmup-{variant}")
    shutil.rmtree(work / f"warmup-{variant}", ignore_errors=True)
    if "log_tail" in row:
        print(row["log_tail"], flush=True)
    compiles = row.get("triton_compiles") or [None]
    return {"variant": variant, "samples": samples, "seconds": round(time.perf_counter() - t0, 2),
            "error": row.get("error"), "triton_compiles": compiles[0]}


def triton_compiled(row: dict) -> int | None:
    """The most Triton kernels any rank of ``row`` compiled in its timed ``oneshot`` (None: not known)."""
    counts = [n for n in row.get("triton_compiles") or [] if n is not None]
    return max(counts) if counts else None


def triton_note(row: dict, run: str = "this run") -> str:
    """`` (Triton compiled N kernels in RUN)`` when ``row``'s timed region compiled any, else ``""``."""
    n = triton_compiled(row)
    return f" (Triton compiled {n} kernels in {run})" if n else ""


def _notes(*rows: dict) -> str:
    """:func:`triton_note` of each of a variant's runs (1 and N processes), naming the run."""
    return "".join(triton_note(r, f"the x{r['nproc']} run") for r in rows if r)


def stage_summary(per_rank: list[dict], oneshot_s: list[float]) -> dict[str, float]:
    """Wall seconds per table stage, the slowest rank's. ``setup`` sums its parts, ``rank_sync`` is
    ours (inside ``epoch_end``, like the Hessian reduce, solve, broadcast and barrier), ``other`` is
    ``oneshot`` minus every top-level stage."""
    from _llmc_stages import TOP_LEVEL

    def seconds(stages: dict, keys) -> float:
        return sum(stages.get(k, {}).get("s", 0.0) for k in keys)

    summary = {}
    for stage in STAGES:
        if stage == "other":
            values = [total - seconds(r, TOP_LEVEL) for r, total in zip(per_rank, oneshot_s)]
        else:
            keys = SETUP if stage == "setup" else [k for k in per_rank[0] if k.startswith("rank_sync")] if stage == "rank_sync" else (stage,)
            values = [seconds(r, keys) for r in per_rank]
        summary[stage] = round(max(values), 2)
    return summary


def compare_logits(a: Path, b: Path, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    ids = torch.arange(64).reshape(1, 64)
    logits = []
    for path in (a, b):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).to(device).eval()
        with torch.no_grad():
            logits.append(model(ids.to(device) % model.config.vocab_size).logits.float().cpu())
        del model
    if device == "cuda":
        torch.cuda.empty_cache()  # the parent shares GPU 0 with the next runs' rank 0
    x, y = logits
    return {"cosine": round(torch.nn.functional.cosine_similarity(x.flatten(), y.flatten(), dim=0).item(), 6),
            "max_abs_diff": round((x - y).abs().max().item(), 4)}


def compare_checkpoints(a: Path, b: Path) -> dict:
    """How many tensors are identical (all, and the packed weights), the largest weight-scale difference."""
    c = compare_tensors(a, b)
    return {
        "tensors": f"{c['equal']}/{c['common']}",
        "only_in_one": c["keys_a"] + c["keys_b"] - 2 * c["common"],
        "qweights_equal": f"{c['qweights_equal']}/{c['qweights']}",
        "max_scale_diff": c["max_scale_diff"] if c["qweights"] else None,
    }


def _find(rows: list[dict], variant: str, nproc: int, repeat: int = 0) -> dict:
    """The run of ``variant`` in ``nproc`` processes in round ``repeat`` (``--repeat``; rows without one are round 0)."""
    return next((r for r in rows if r["variant"] == variant and r["nproc"] == nproc and r.get("repeat", 0) == repeat), {})


def _label(r: dict) -> str:
    return f"{r['variant']} x{r['nproc']}" + (f" r{r['repeat']}" if "repeat" in r else "")


def _ok(*rows: dict) -> bool:
    return all(r and "error" not in r and "skipped" not in r for r in rows)


def markdown(rows: list[dict], nproc: int) -> str:
    lines = [f"| recipe | oneshot 1 -> {nproc} proc (s) | speed-up | end to end 1 -> {nproc} (s) | speed-up | "
             f"peak GPU memory per GPU (GiB) | routed tokens 1 -> {nproc} | logits cos |",
             "|---|---|---:|---|---:|---|---|---:|"]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        one, many = _find(rows, variant, 1), _find(rows, variant, nproc)
        if _ok(one) and not many or _ok(many) and not one:  # a single process count asked for (NAME@1)
            r = one or many
            if "checkpoint_vs_writer_pool" in r:
                vs = f"tensors vs writer pool: {r['checkpoint_vs_writer_pool']['tensors']}"
            else:
                vs = f"vs grouped: {r.get('logits_vs_grouped', {}).get('cosine', '-')}"
            lines.append(f"| {variant}{_notes(r)} | x{r['nproc']} only: {r['oneshot_s']:.1f} | | {r['end_to_end_s']:.1f} | | "
                         f"{' / '.join(map(str, r['peak_gpu_gib']))} | | {vs} |")
            continue
        if not _ok(one, many):
            bad = [f"{r['nproc']} proc: {r.get('error') or r.get('skipped')}" for r in (one, many) if r and not _ok(r)]
            lines.append(f"| {variant} | {'; '.join(bad) or 'not run in both'} | | | | | | |")
            continue
        routed = [r["coverage_totals"]["routed_tokens"] if r["coverage_totals"] else "-" for r in (one, many)]
        lines.append(
            f"| {variant}{_notes(one, many)} | {one['oneshot_s']:.1f} -> {many['oneshot_s']:.1f} | {one['oneshot_s'] / many['oneshot_s']:.2f}x | "
            f"{one['end_to_end_s']:.1f} -> {many['end_to_end_s']:.1f} | {one['end_to_end_s'] / many['end_to_end_s']:.2f}x | "
            f"{one['peak_gpu_gib'][0]} -> {' / '.join(map(str, many['peak_gpu_gib']))} | {routed[0]} -> {routed[1]} | "
            f"{many.get('logits_vs_1_process', {}).get('cosine', '-')} |"
        )
    return "\n".join(lines)


def stage_markdown(rows: list[dict]) -> str:
    """Per run: wall seconds per stage (slowest rank), and how the block calls ran; a run whose
    timed ``oneshot`` compiled Triton kernels says so."""
    lines = ["| run | oneshot | " + " | ".join(STAGES) + " | block calls grouped / loop |",
             "|---|---:|" + "---:|" * len(STAGES) + "---|"]
    for r in rows:
        if not _ok(r):
            continue
        use = r["grouped_use"][0]
        calls = "-" if use is None else f"{use['grouped']} / {sum(use['fallbacks'].values())}"
        lines.append(f"| {_label(r)}{triton_note(r)} | {r['oneshot_s']:.1f} | "
                     + " | ".join(f"{r['stages_max'][s]:.2f}" for s in STAGES) + f" | {calls} |")
    return "\n".join(lines)


#: the stages whose work is split over the ranks (each rank: its share of the batches, its share of the solves)
SPLIT = ("calibrate_forward", "propagate_forward", "solve")


def stock_markdown(rows: list[dict]) -> str:
    """Each of our runs against stock at the same process count: speed, peak memory, checkpoint."""
    lines = ["| run | oneshot (s) | stock (s) | faster than stock | peak GPU vs stock | qweights identical to stock | "
             "max scale diff |", "|---|---:|---:|---:|---:|---|---:|"]
    for r in rows:
        vs = r.get("vs_stock")
        if not vs:
            continue
        stock = _find(rows, "stock", r["nproc"], r.get("repeat", 0))
        ck = vs["checkpoint"]
        lines.append(f"| {_label(r)}{triton_note(r)} | {r['oneshot_s']:.1f} | "
                     f"{stock['oneshot_s']:.1f}{triton_note(stock, 'stock')} | "
                     f"{vs['oneshot_ratio']:.2f}x | {vs['peak_gpu_ratio']} | {ck['qweights_equal']} | {ck['max_scale_diff']} |")
    return "\n".join(lines)


def repeat_markdown(rows: list[dict]) -> str:
    """With ``--repeat``: per variant and process count, ``oneshot`` in every round, its median, and
    the median, lowest and highest of its ratios to the stock run of the same round."""
    import statistics

    lines = ["| run | oneshot per round (s) | median (s) | faster than stock: median | lowest | highest |",
             "|---|---|---:|---:|---:|---:|"]
    for variant, nproc in dict.fromkeys((r["variant"], r["nproc"]) for r in rows if "repeat" in r):
        done = [r for r in rows if r["variant"] == variant and r["nproc"] == nproc and "repeat" in r and _ok(r)]
        if not done:
            continue
        seconds = [r["oneshot_s"] for r in done]
        ratios = [r["vs_stock"]["oneshot_ratio"] for r in done if r.get("vs_stock")]
        spread = (f"{statistics.median(ratios):.2f}x | {min(ratios):.2f}x | {max(ratios):.2f}x" if ratios else "- | - | -")
        lines.append(f"| {variant} x{nproc} | {' / '.join(f'{x:.1f}' for x in seconds)} | "
                     f"{statistics.median(seconds):.1f} | {spread} |")
    return "\n".join(lines)


def again_markdown(rows: list[dict]) -> str:
    """With ``--twice``: each run's ``oneshot``, the same run again in its process, and the difference (what the
    process's first use of its kernels, caches and imports cost)."""
    lines = ["| run | oneshot (s) | again, same process (s) | first use (s) |", "|---|---:|---:|---:|"]
    for r in rows:
        if _ok(r) and r.get("oneshot_again_s") is not None:
            lines.append(f"| {_label(r)} | {r['oneshot_s']:.1f} | {r['oneshot_again_s']:.1f} | "
                         f"{r['oneshot_s'] - r['oneshot_again_s']:.1f} |")
    return "\n".join(lines)


def scaling_markdown(rows: list[dict], nproc: int) -> str:
    """What shrinks with the ranks: the split stages vs the rest of ``oneshot`` (slowest rank's seconds)."""
    lines = [f"| recipe | oneshot 1 -> {nproc} (s) | speed-up | calibrate + propagate + solve 1 -> {nproc} (s) | speed-up | "
             f"the rest 1 -> {nproc} (s) | of which save | of which setup + offload setup |",
             "|---|---|---:|---|---:|---|---|---|"]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        one, many = _find(rows, variant, 1), _find(rows, variant, nproc)
        if not _ok(one, many):
            continue
        split = [sum(r["stages_max"][s] for s in SPLIT) for r in (one, many)]
        rest = [r["oneshot_s"] - x for r, x in zip((one, many), split)]
        save = [r["stages_max"]["save"] for r in (one, many)]
        setup = [r["stages_max"]["setup"] + r["stages_max"]["offload_setup"] for r in (one, many)]
        lines.append(
            f"| {variant}{_notes(one, many)} | {one['oneshot_s']:.1f} -> {many['oneshot_s']:.1f} | {one['oneshot_s'] / many['oneshot_s']:.2f}x | "
            f"{split[0]:.1f} -> {split[1]:.1f} | {split[0] / max(split[1], 1e-9):.2f}x | {rest[0]:.1f} -> {rest[1]:.1f} | "
            f"{save[0]:.1f} -> {save[1]:.1f} | {setup[0]:.1f} -> {setup[1]:.1f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    started = time.perf_counter()
    import shutil
    import tempfile

    import torch

    sys.path.insert(0, str(HERE))
    from gptqmodel_gpu import build_source  # the same model and calibration rows

    runs = plan(args.variants, args.nproc)
    most = max((n for _, n in runs), default=1)
    if args.device == "cuda" and torch.cuda.device_count() < most:
        raise SystemExit(f"{most}-process runs need {most} GPUs; {torch.cuda.device_count()} visible "
                         "(one-GPU runs only: name the variants NAME@1)")
    out = args.output or HERE / "results" / f"distributed_{args.device}{'_tiny' if args.tiny else ''}.json"
    work = args.workdir or Path(tempfile.mkdtemp(prefix="dq-distributed-"))
    work.mkdir(parents=True, exist_ok=True)
    import transformers

    payload = {
        "command": "python benchmarks/distributed_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "nproc": args.nproc,
        "shape": {k: getattr(args, k) for k in ("layers", "experts", "hidden", "intermediate", "top_k", "samples", "seq_len")},
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
                     "llmcompressor": _version("llmcompressor"), "compressed-tensors": _version("compressed-tensors")},
        "notes": "oneshot_s: slowest rank, after a process-group warm-up; end_to_end_s: the launcher's process "
                 "(interpreter, imports, model load, NCCL set-up, oneshot, exit); stages: wall seconds, CUDA synchronized "
                 "at each boundary; triton_compiles: per rank, Triton kernels compiled inside the timed oneshot "
                 "(new entries of Triton's on-disk cache; null: Triton not importable)",
        "warmup": None,
        "rows": [],
    }
    rows = payload["rows"]

    def write() -> None:
        payload["table"], payload["stage_table"] = markdown(rows, args.nproc), stage_markdown(rows)
        payload["scaling_table"] = scaling_markdown(rows, args.nproc)
        payload["vs_stock_table"] = stock_markdown(rows)
        if args.twice:
            payload["first_use_table"] = again_markdown(rows)
        if payload.get("checkpoint_groups"):
            payload["vs_stock_table"] += "\n\n" + groups_markdown(payload["checkpoint_groups"])
        if args.repeat > 1:
            payload["repeat_table"] = repeat_markdown(rows)
        payload["host_table"] = host_markdown(rows, _label)
        write_json(out, payload)  # whole or not at all: a Ctrl-C mid-write leaves the last whole one

    try:
        t0 = time.perf_counter()
        rows_data = build_source(args, work / "source")
        write_calibration(rows_data, work / "calibration.json")
        payload["build_source_s"] = round(time.perf_counter() - t0, 1)
        left = None if args.deadline is None else args.deadline - (time.perf_counter() - started)
        if args.warmup and runs and (left is None or left >= 2 * args.min_run):
            print(f"warm-up: {runs[0][0]} in 1 process on {args.warmup_samples} rows, untimed ...", flush=True)
            timeout = args.timeout if left is None else min(args.timeout, left - 10)
            payload["warmup"] = run_warmup(runs[0][0], rows_data, args, work, timeout)
            print(f"warm-up: {json.dumps(payload['warmup'])}", flush=True)
            write()
        elif args.warmup and runs:
            payload["warmup"] = {"variant": runs[0][0], "skipped": f"deadline: {left:.0f}s left"}
        for round_, (variant, nproc) in ((i, run) for i in range(args.repeat) for run in runs):
            repeat = {} if args.repeat == 1 else {"repeat": round_}
            left = None if args.deadline is None else args.deadline - (time.perf_counter() - started)
            if left is not None and left < args.min_run:
                rows.append({"variant": variant, "nproc": nproc, **repeat, "skipped": f"deadline: {left:.0f}s left"})
                print(f"skipping {variant} in {nproc} process(es): {left:.0f}s left", flush=True)
                continue
            print(f"running {variant} in {nproc} process(es){f' (round {round_})' if repeat else ''} ...", flush=True)
            name = f"{variant}-n{nproc}" + (f"-r{round_}" if repeat else "")
            row = run_one(variant, nproc, args, work, args.timeout if left is None else min(args.timeout, left - 10),
                          name=name)
            row.update(repeat)
            print(json.dumps({k: v for k, v in row.items() if k not in ("log_tail", "stages_per_rank")}), flush=True)
            if "log_tail" in row:
                print(row["log_tail"], flush=True)
            rows.append(row)
            compare(rows, row, args)
            if variant == "stock":  # the runs listed before stock
                for earlier in rows:
                    vs_stock(rows, earlier)
            write()
        time_left = (lambda: None) if args.deadline is None else (lambda: args.deadline - (time.perf_counter() - started))
        payload["checkpoint_groups"] = checkpoint_groups(rows, time_left)
        write()
        print(payload["table"] if rows else "")
        print()
        print(stage_markdown(rows))
        print()
        print(scaling_markdown(rows, args.nproc))
        print()
        print(payload["vs_stock_table"])
        if args.repeat > 1:
            print()
            print(repeat_markdown(rows))
        if args.twice:
            print()
            print(payload["first_use_table"])
        print(payload["host_table"])
        write()
        print(f"wrote {out}")
        failed = [r for r in rows if "error" in r or not r.get("coverage_same_on_every_rank", True)]
        return 1 if failed else 0
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def compare(rows: list[dict], row: dict, args: argparse.Namespace) -> None:
    """A finished run against its references: N vs 1 process, stock, and for a suffixed variant
    (``-onewriter``, ``-unshared``, ``-rehearse``, ``-syncfree``, ``-nosync``, ``-mmloop``, ``-looppack``, ``-frozensave``,
    ``-loop``) the same variant without the suffix."""
    if not _ok(row):
        return
    one = _find(rows, row["variant"], 1, row.get("repeat", 0))
    if row["nproc"] != 1 and _ok(one):
        row["speedup"] = round(one["oneshot_s"] / row["oneshot_s"], 2)
        row["end_to_end_speedup"] = round(one["end_to_end_s"] / row["end_to_end_s"], 2)
        row["logits_vs_1_process"] = compare_logits(Path(one["checkpoint"]), Path(row["checkpoint"]), args.device)
    row["shard_files"] = len(list(Path(row["checkpoint"]).glob("*.safetensors")))
    vs_stock(rows, row)
    for suffix, key, against in _REFERENCE_OF_SUFFIX:
        if row["variant"].endswith(suffix):
            reference = _find(rows, row["variant"].removesuffix(suffix), row["nproc"], row.get("repeat", 0))
            if _ok(reference):
                row[key] = against(Path(reference["checkpoint"]), Path(row["checkpoint"]), args)


def _same_checkpoint(ref: Path, ckpt: Path, args: argparse.Namespace) -> dict:
    """Whether two checkpoints hold the same tensors (:func:`compare_checkpoints`): the suffixes that must not change them."""
    return compare_checkpoints(ref, ckpt)


#: variant suffix -> (row key, comparison of the run's checkpoint with the same variant's without the suffix)
_REFERENCE_OF_SUFFIX = (
    ("-onewriter", "checkpoint_vs_writer_pool", _same_checkpoint),
    ("-unshared", "checkpoint_vs_shared", _same_checkpoint),
    ("-rehearse", "checkpoint_vs_unrehearsed", _same_checkpoint),
    ("-syncfree", "checkpoint_vs_synced", _same_checkpoint),
    ("-nosync", "checkpoint_vs_synced", _same_checkpoint),
    ("-mmloop", "checkpoint_vs_stacked", _same_checkpoint),
    ("-looppack", "checkpoint_vs_batched_pack", _same_checkpoint),
    ("-frozensave", "checkpoint_vs_unfrozen", _same_checkpoint),
    ("-loop", "logits_vs_grouped", lambda ref, ckpt, args: compare_logits(ref, ckpt, args.device)),
)


def vs_stock(rows: list[dict], row: dict) -> None:
    """``row["vs_stock"]`` (speed and peak memory ratios, checkpoint comparison) once stock has run
    at the same process count (in the same ``--repeat`` round); a run listed before stock gets it
    when stock is done."""
    stock = _find(rows, "stock", row["nproc"], row.get("repeat", 0))
    if row["variant"] == "stock" or "vs_stock" in row or not _ok(row, stock):
        return
    row["vs_stock"] = {
        "oneshot_ratio": round(stock["oneshot_s"] / row["oneshot_s"], 2),
        "peak_gpu_ratio": round(max(row["peak_gpu_gib"]) / max(stock["peak_gpu_gib"]), 2)
        if row["peak_gpu_gib"][0] is not None else None,
        "checkpoint": compare_checkpoints(Path(stock["checkpoint"]), Path(row["checkpoint"])),
    }


def _identical(cmp: dict) -> bool:
    """Whether a :func:`compare_checkpoints` result is two checkpoints with the same tensors, all equal."""
    equal, common = cmp["tensors"].split("/")
    return equal == common and cmp["only_in_one"] == 0


def checkpoint_groups(rows: list[dict], time_left: Callable[[], float | None]) -> dict[str, dict]:
    """Per process count (``"x1"``, ...): the finished runs of every ``--repeat`` round grouped by identical
    checkpoints (``_groups.py``), the first stock run's group first. Each run was compared with its own
    round's stock run only, and stock's runs can disagree on CUDA; the verdicts those comparisons (and
    a suffixed run's with its base variant's) reached are reused, so a call whose stock runs agree reads one
    checkpoint pair per stock run after the first. A read starts only while ``time_left()`` (seconds to
    the deadline; None: none) is over twice the slowest read so far and at least 10 s; ``unsettled`` lists
    the runs it could not place then, ``read`` the pairs it read with their seconds."""
    from _groups import group_identical

    out: dict[str, dict] = {}
    for nproc in sorted({r["nproc"] for r in rows if _ok(r) and r.get("checkpoint")}):
        runs = [r for r in rows if _ok(r) and r["nproc"] == nproc and r.get("checkpoint")]
        ordered = [r for r in runs if r["variant"] == "stock"] + [r for r in runs if r["variant"] != "stock"]
        path_of = {_label(r): Path(r["checkpoint"]) for r in runs}
        known: dict[tuple[str, str], bool] = {}
        for r in runs:  # the run's own comparisons: with its round's stock run, and a suffixed run's with its base
            against = [(r.get("vs_stock", {}).get("checkpoint"), "stock")]
            against += [(r.get(key), r["variant"].removesuffix(suffix)) for suffix, key, how in _REFERENCE_OF_SUFFIX
                        if how is _same_checkpoint and r["variant"].endswith(suffix)]
            for cmp, variant in against:
                reference = _find(rows, variant, nproc, r.get("repeat", 0))
                if cmp and _ok(reference):
                    known[(_label(reference), _label(r))] = _identical(cmp)
        read: list[dict] = []

        def may_compare() -> bool:
            left = time_left()
            return left is None or left > max(10.0, 2 * max((x["seconds"] for x in read), default=0.0))

        def compare(a: str, b: str) -> bool:
            t0 = time.perf_counter()
            cmp = compare_checkpoints(path_of[a], path_of[b])
            read.append({"pair": [a, b], "seconds": round(time.perf_counter() - t0, 2), "identical": _identical(cmp)})
            return read[-1]["identical"]

        groups, unsettled = group_identical([_label(r) for r in ordered], known, compare, may_compare)
        out[f"x{nproc}"] = {"groups": groups, "unsettled": unsettled, "read": read}
    return out


def groups_markdown(groups: dict[str, dict]) -> str:
    """One line per process count naming the runs whose checkpoints are identical, group by group."""
    lines = []
    for count, found in groups.items():
        line = f"Identical checkpoints ({count}, every tensor equal): " + " | ".join("{" + ", ".join(g) + "}" for g in found["groups"])
        if found["unsettled"]:
            line += "; not compared before the deadline: " + ", ".join(found["unsettled"])
        lines.append(line)
    return "\n\n".join(lines)


def _version(name: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


# ----- worker (one rank) ----------------------------------------------------------------------------
def calibration_file(args: argparse.Namespace) -> Path:
    """The worker's calibration rows: ``--calibration``, else ``WORKDIR/calibration.json``."""
    return args.calibration or args.workdir / "calibration.json"


def worker(args: argparse.Namespace) -> int:
    import torch

    sys.path.insert(0, str(HERE))
    from _source import use_source_checkout

    use_source_checkout()
    from defuser_quant.calibration import distributed

    cuda = args.device == "cuda"
    distributed.init_from_env("nccl" if cuda else "gloo")
    if not cuda:
        torch.set_num_threads(1)
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    variant, work, out = args.worker, args.workdir, args.output
    source = work / "source"
    rows = json.loads(calibration_file(args).read_text())
    data = distributed.rank_share(Dataset.from_list(rows))
    device = f"cuda:{torch.cuda.current_device()}" if cuda else "cpu"
    if variant == "stock":
        # Importing our integration swaps llm-compressor's MoE linearization for ours even without
        # DefuseModifier in the recipe (and _llmc_stages imports it when it can): block it here.
        if sys.modules.get(LLMC_INTEGRATION) is not None:
            raise RuntimeError(f"stock variant but {LLMC_INTEGRATION} is already imported: the baseline would not be stock")
        sys.modules[LLMC_INTEGRATION] = None  # type: ignore[assignment]  # import -> ImportError

    def model_and_recipe() -> tuple[Any, list, Any]:
        """The model loaded on the device and the variant's recipe (with its DefuseModifier, None for stock)."""
        loaded = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16).to(device)
        steps = [GPTQModifier(targets="Linear", scheme="W4A16", ignore=IGNORE)]
        if variant == "stock":
            return loaded, steps, None
        import defuser_quant.integrations.llmcompressor as dq_llmc

        routing, _, suffix = variant.partition("-")
        if suffix == "mmloop":
            from defuser_quant.calibration import gram

            gram.STACKED_DEVICES = frozenset()  # this run's process only
        modifier = dq_llmc.DefuseModifier(routing=routing, grouped=suffix != "loop",
                                          save_threads=1 if suffix == "onewriter" else None,
                                          share_hessians=suffix != "unshared", rehearse=suffix == "rehearse",
                                          sync_free_propagation=suffix in ("syncfree", "nosync"),
                                          sync_free_calibration=suffix == "nosync",
                                          batched_compress=suffix != "looppack", frozen_save=suffix == "frozensave")
        return loaded, [modifier, *steps], modifier

    def run_oneshot(loaded: Any, steps: list, folder: Path) -> float:
        """``oneshot`` of ``steps`` on ``loaded`` into ``folder``; its seconds (the GPU synchronized)."""
        begin = time.perf_counter()
        oneshot(
            model=loaded, processor=AutoTokenizer.from_pretrained(source), dataset=data, recipe=steps,
            output_dir=str(folder), num_calibration_samples=len(data), max_seq_length=args.seq_len,
            shuffle_calibration_samples=False,
        )
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - begin

    model, recipe, defuse = model_and_recipe()
    from _llmc_stages import install as install_stage_clock

    clock = install_stage_clock(cuda)
    if distributed.is_distributed():  # the communicator is built on the first collective: not oneshot's time
        import torch.distributed as dist

        dist.all_reduce(torch.ones(1, device=device))
        dist.barrier()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    from _gil_probe import GilProbe
    from _profile import maybe_profile
    from _triton_compiles import count_triton_compiles

    probe = GilProbe() if args.gil_probe else None
    from defuser_quant.checkpoint.frozen_heap import timed_collections

    full_collections: list[float] = []  # the interpreter's full garbage collections during oneshot, seconds each
    full_by_stage: dict[str, dict[str, float]] = {}  # ... by the top-level stage they came in

    def collected(generation: int, start: float, end: float) -> None:
        if generation == 2:
            full_collections.append(end - start)
            where = full_by_stage.setdefault(clock.top_level_stage(), {"collections": 0, "seconds": 0.0})
            where["collections"] += 1
            where["seconds"] = round(where["seconds"] + end - start, 4)

    with count_triton_compiles() as compiles:  # its cache scans stay outside the timed region
        with maybe_profile(f"llmc-{variant}-n{distributed.world_size()}-rank{distributed.rank()}"), \
                probe or contextlib.nullcontext(), timed_collections(collected):
            seconds = run_oneshot(model, recipe, out / "checkpoint")
    use = None if defuse is None or defuse.grouped_use is None else defuse.grouped_use
    experts_classes = sorted({f"{type(m).__module__}.{type(m).__qualname__}" for n, m in model.named_modules()
                              if n.endswith("mlp.experts")})
    if variant == "stock" and any("defuser_quant" in c for c in experts_classes):
        raise RuntimeError(f"stock variant but the experts blocks are {experts_classes}: not llm-compressor's own")
    result = {
        "experts_classes": experts_classes,
        "rank": distributed.rank(),
        "oneshot_s": seconds,
        "worker_s": time.perf_counter() - WORKER_T0,
        "stages": clock.totals(),
        "grouped_use": None if use is None else {"grouped": use.grouped, "without_sync": use.without_sync,
                                                 "fallbacks": use.fallbacks},
        "hessian_batching": _hessian_batching(defuse),
        "peak_gpu_bytes": torch.cuda.max_memory_allocated() if cuda else None,
        "coverage_totals": None if defuse is None or defuse.coverage is None else defuse.coverage.totals.model_dump(),
        "triton_compiles": compiles.kernels,
        "gil_probe": None if probe is None else probe.summary(),
        "rehearsal": None if defuse is None else defuse.rehearsal,
        "compression_batching": None if defuse is None else defuse.compression_batching,
        "frozen_save": None if defuse is None else defuse.frozen_save_stats,
        "gc_full": {"collections": len(full_collections), "seconds": round(sum(full_collections), 4),
                    "longest_s": round(max(full_collections, default=0.0), 4), "by_stage": full_by_stage},
    }
    if args.twice:  # the same run again in this process: the difference is what the first use of everything cost
        del model, recipe
        again_model, again_recipe, _ = model_and_recipe()
        result["oneshot_again_s"] = run_oneshot(again_model, again_recipe, out / "checkpoint-again")
    (out / f"rank{distributed.rank()}.json").write_text(json.dumps(result))
    return 0


def _hessian_batching(defuse: object | None) -> dict | None:
    """What the batched GPTQ Hessian hooks did in this run (ours, grouped), incl. the shared accumulations."""
    if defuse is None or not getattr(defuse, "grouped", False):
        return None
    import dataclasses

    from defuser_quant.calibration.gram import stacked_checks
    from defuser_quant.integrations.llmcompressor.hessians import last_batching

    checks = [{**shape._asdict(), "dtype": str(shape.dtype), "exact": exact} for shape, exact in stacked_checks().items()]
    return {**dataclasses.asdict(last_batching()), "stacked_checks": checks}


if __name__ == "__main__":
    raise SystemExit(main())
