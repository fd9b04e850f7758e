"""GPTQModel end to end: defuser-quant's loader plugin vs stock GPTQModel + Defuser, one run.

Builds a random qwen3_moe with Qwen3-30B-A3B layers (128 experts, hidden 2048, moe_intermediate
768, top-8, 32/4 heads of 128, vocab 151936; bf16; default 1 layer, ``--layers 4`` for more)
from its config, saves it with a BPE tokenizer trained offline on the bundled corpus, then runs
each variant in its own process (the plugin and Defuser both patch process-wide state):

* ``stock``    - GPTQModel 7.6 as shipped (it defuses with the ``defuser`` package);
* ``ours``     - ``defuser_quant.integrations.gptqmodel.install()`` + ``quantize_with_defuser``
                 with native routing;
* ``ours-all`` - the same with ``routing="all"`` (every expert calibrated on every token);
* ``stock-again`` - stock once more: its checkpoint against stock's shows what the GPU's run-to-run
                 nondeterminism alone changes;
* ``ours-grouped`` / ``ours-all-grouped`` - ``ours`` / ``ours-all`` with ``grouped=True``: the
                 experts' calibration forwards as grouped GEMMs (``calibration.grouped``);
* ``ours-batched`` / ``ours-grouped-batched`` - ``ours`` / ``ours-grouped`` with
                 ``batched_solve=True``: a layer's equal-shape modules (its experts) solved together
                 inside GPTQModel's GPTQ processor (``integrations.gptqmodel.batched``); the row's
                 ``solve`` says how many modules took the batched path, on which kernel, and why
                 the others were solved per module.
* ``ours-grouped-batched-serial`` - ``ours-grouped-batched`` with ``BatchedSolve(parallel=1)``: one
                 chunk solved at a time, by the worker that asked first (the default since round 11);
* ``ours-grouped-batched-hinv4`` - with ``BatchedSolve(inverse_threads=4)``: each chunk's Hessian
                 inverses spread over four host threads, each on its own stream;
* ``ours-grouped-batched-parallel4`` - with ``BatchedSolve(parallel=4)``: up to four chunks at once, each
                 on a waiting worker's own stream (the default in round 10), to measure what that saves;
* ``ours-grouped-batched-host`` / ``ours-grouped-batched-hinv4-host`` - with
                 ``BatchedSolve(host_results=True)``: each chunk's scales, zeros and ``g_idx`` handed
                 to GPTQModel already on the CPU (one copy per chunk instead of GPTQModel's pinned copy,
                 event and sync task per tensor);
* ``ours-grouped-batched-hinv1-device`` - with ``BatchedSolve(inverse_threads=1, host_results=False)``:
                 the batched solve as it was before round 14 made four inverse threads and host-side
                 results its defaults (inverses one after another; results streamed by GPTQModel);
* ``ours-grouped-batched-norecopy`` - every lean bookkeeping part but ``recopy``: each expert
                 projection's checkpoint tensors copied again before its forward replay, as GPTQModel
                 does, to measure what that part saves;
* ``ours-grouped-batched-noreads`` - every lean bookkeeping part but ``layer_reads``: each layer
                 loaded from the checkpoint's file mapping, as GPTQModel does, instead of from the
                 host buffers read ahead (``--cold`` makes every variant read its layers from disk);
* ``ours-grouped-batched-ahead2`` - with ``BatchedSolve(solve_ahead=2)``: a solver thread solves the
                 next two chunks while GPTQModel's workers process the earlier ones, to measure that
                 against the default (a worker solves the chunk it waits for);
* ``ours-grouped-batched-pack`` - with ``BatchedSolve(pack=True)``: GPTQModel's finalize workers
                 take each batched module's words packed on the GPU by the solve instead of running
                 their CPU extension (the row's ``solve.pack`` says how many were offered, served
                 and refused); ``-nopack`` (``pack=False``) is the default since round 18 measured it;
* ``ours-grouped-batched-nobundle`` - every lean bookkeeping part but ``offload_bundle``: each finalized
                 expert projection offloaded to disk on its own, as GPTQModel does, instead of one
                 bundle per experts block;
* ``ours-grouped-batched-nokeeplast`` - every lean bookkeeping part but ``keep_last_block``: the last
                 experts block is bundled to disk like the others instead of staying in memory for
                 the save (the default since round 28);
* ``ours-grouped-batched-noonload`` - every lean bookkeeping part but ``layer_onload``: layer 0's move
                 from the CPU to the GPU by GPTQModel's ``module.to`` instead of the staged upload
                 (the default since round 28);
* ``ours-grouped-batched-nowarm`` - every lean bookkeeping part but ``worker_warmup``: GPTQModel's workers
                 warm up before their first task (the first subset's solves, the first finalizes) instead
                 of during the input capture (the default since round 31);
* ``ours-grouped-batched-noline`` - every lean bookkeeping part but ``line_redraw``: LogBar draws the
                 progress bars again after every log line (GPTQModel's 776 module records at the end)
                 instead of at most every 0.1 s (the default since round 32);
* ``ours-grouped-batched-layerahead`` - the default lean bookkeeping parts plus the opt-in ``layer_ahead``:
                 each layer after layer 0 loaded by GPTQModel's own ``pre_quantize`` on a background thread
                 once the layer before it has run its last subset forward, instead of when GPTQModel gets to it
                 (round 34: no gain measured, so not a default);
* ``ours-grouped-batched-gcfreeze`` - the default lean bookkeeping parts plus ``gc_freeze`` (a default since round 52,
                 so this is ``ours-grouped-batched``): the objects alive when the run starts left out of the
                 interpreter's full garbage collections until it ends, and the same during the model's save
                 (``bookkeeping.gc_freeze.save``; ``stock+gcfreeze1`` does it around stock's ``quantize()`` only);
* ``ours-grouped-batched-nogcfreeze`` - every lean bookkeeping part but ``gc_freeze`` (the default before round 52);
* ``ours-grouped-batched-layerahead-gcfreeze`` - both parts together (round 34's layer_ahead pause was
                 a full collection, which gc_freeze takes out of the run);
* ``ours-grouped-batched-nodiskprobe`` - every lean bookkeeping part but ``disk_probe``: GPTQModel's disk
                 write-speed probe (100 MB written and fsynced) runs inside ``ModuleLooper.__init__`` before the
                 first layer instead of on a background thread;
* ``ours-grouped-batched-norehome`` - every lean bookkeeping part but ``rehome``: GPTQModel's per-batch
                 ``rehome_module_to_device`` of the layer (three walks over its modules) runs in full before
                 every calibration batch instead of the one-walk check that it would change nothing;
* ``ours-grouped-batched-nobasemem`` - every lean bookkeeping part but ``base_in_memory``: GPTQModel writes the base
                 modules (the embedding, final norm, rotary embedding) to its offload folder after the input capture
                 instead of leaving them as the capture loaded them;
* ``ours-grouped-batched-capturelazy`` - the default lean bookkeeping parts plus the opt-in ``capture_lazy``: layer 0
                 stays lazy through the input capture and ``pre_quantize`` loads it once onto the GPU, instead of
                 into host memory at the capture and then to the GPU (``bookkeeping.capture_lazy`` counts it);
* ``ours-grouped-batched-capturelazy-gcfreeze`` - the two opt-in parts that act at the start and the layer change
                 (layer 0 kept lazy; no full collection in the run) together;
* ``ours-grouped-batched-tailworkers`` - the default lean bookkeeping parts plus the opt-in ``tail_workers``: when
                 the last layer starts, GPTQModel's CPU worker group grows to the host's cores for its finalizes
                 (``bookkeeping.tail_workers`` says how many were added);
* ``ours-grouped-batched-blockfinalize`` - the default lean bookkeeping parts plus ``block_finalize`` (itself a default
                 since round 51 where the process has 16 cores or more, so there this is ``ours-grouped-batched``): a
                 layer's expert projections of one role finalized by one worker after GPTQModel's own finalize of the
                 first, their pack extension calls on a pool of threads (``bookkeeping.block_finalize`` says how many);
* ``ours-grouped-batched-noblockfinalize`` - every lean bookkeeping part but ``block_finalize``: each expert
                 projection finalized by its own GPTQModel task (the default before round 51);
* ``ours-grouped-batched-blockfinalize-devicewords`` - that, plus the opt-in ``device_words``: each layer's groups
                 packed on the GPU before the layer moves to the CPU, the members taking those words instead of the
                 extension's (``bookkeeping.block_finalize.words_*``);
* ``ours-grouped-batched-stealgroups`` - the default lean bookkeeping parts plus the opt-in ``steal_groups`` (with
                 ``block_finalize``, itself a default only with 16 cores: ``-blockfinalize-stealgroups`` names both):
                 a layer's expert groups made side by side, a waiting member's task taking the groups no task has
                 reached yet (``bookkeeping.block_finalize.stolen``);
* ``ours-grouped-batched-rowpack`` - the default lean bookkeeping parts plus the opt-in ``row_pack`` (with
                 ``block_finalize``, a default only with 16 cores): the members' words, and each group reference's
                 check, from this project's row-wise pack kernel instead of GPTQModel's extension
                 (``bookkeeping.block_finalize.row_packed``; ``row_pack_refused`` where it could not be built);
* ``ours-grouped-batched-loadpriority`` - the default lean bookkeeping parts plus the opt-in ``load_priority`` (with
                 ``block_finalize``: ``-blockfinalize-loadpriority`` names both): while a layer holding our experts
                 loads, the finalize tasks and the block finalize's workers wait instead of competing with the load
                 for the interpreter lock (``bookkeeping.load_priority``: loads, pauses, timeouts);
* ``ours-grouped-batched-loadswitch`` - the default lean bookkeeping parts plus the opt-in ``load_switch``: while a
                 layer holding our experts loads, the interpreter's switch interval is 0.5 ms instead of 5 ms, so the
                 load's per-tensor calls get the lock back sooner from the finalize threads
                 (``bookkeeping.load_switch``: loads, their seconds, the interval put back);
* ``ours-grouped-batched-layerstage`` - the default lean bookkeeping parts plus the opt-in ``layer_stage``: after a
                 layer's last subset forward the next layer's read-ahead bytes are copied to the GPU, so its load
                 copies device to device (``bookkeeping.layer_stage``: staged, bytes, seconds, refused;
                 ``bookkeeping.layer_reads.staged_loads``); ``-capturelazy-layerstage`` adds ``capture_lazy`` too, the
                 first layer's read copied to the GPU from the block's start;
* ``ours-grouped-batched-nosolvewarmup`` - every lean bookkeeping part but ``solve_warmup`` (a default since round
                 44): layer 0's first solves and attention forward load their CUDA kernels on the run's path instead
                 of a rehearsal on GPTQModel's workers during the input capture (``bookkeeping.solve_warmup``);
* ``ours-grouped-batched-stocksave`` - the plugin installed with ``fast_save=False``: GPTQModel's own
                 shard writer and its re-read of the source weights at save, to measure what the plugin's
                 save path (``shard_writer``, ``save_sources``) saves; every ``ours`` row records what its
                 save did (``save_path``: ``integrations.gptqmodel.last_save()``);
* ``ours-grouped-batched-hookhessians`` - with ``batched_hessians=False``: GPTQModel's GPTQ Hessian
                 hook chain called per expert and grouped call, as GPTQModel calls it, instead of once per
                 grouped call for all experts (``integrations.gptqmodel.hessians``, the default since round
                 21); every ``ours`` row records what ran batched (``hessians``);
* ``ours-grouped-batched-modulerows`` - with ``BatchedSolve(log_rows="module")``: GPTQModel's log row
                 per module instead of one per batched chunk (the default since round 19), to measure
                 what the chunk rows save;
* ``ours-grouped-batched-ownstreams`` / ``ours-grouped-batched-callerstreams`` - with
                 ``BatchedSolve(streams="own")`` / ``streams="caller"``: every chunk solved on the worker's
                 private stream with each inverse thread on its own, or everything on the worker's current
                 stream as GPTQModel's per-module solve (the default, ``"auto"``, takes ``"caller"`` under
                 ``--deterministic`` and ``"own"`` otherwise); the row's ``solve.streams`` counts the chunks;
* ``ours-grouped-batched-noahead`` - with ``BatchedSolve(inverses_ahead=False)``: each chunk's Hessian
                 inverses computed when that chunk is solved, instead of beside the chunk before's column
                 loop (the default since round 33); the row's ``solve.inverses_ahead`` counts the chunks;
* ``ours-grouped-batched-norows`` - with ``BatchedSolve(rows_kernel=False)``: GPTQModel's block-update
                 extension launched per Hessian and block, instead of one launch of ``rows_kernel`` per
                 chunk and block (the default since round 33; ``meta.rows_kernel_available`` says whether
                 it built, and the row's ``kernels_label`` which ran);
* ``ours-grouped-batched-packahead`` - with ``BatchedSolve(pack_ahead=True)`` (opt-in): each batched
                 module's words packed by GPTQModel's own CPU extension on background threads as soon
                 as GPTQModel takes its result, and served to its finalize; the row's ``solve.pack``
                 counts offered / served / refused / failed and the finalizes' wait;
* ``ours-grouped-batched-pack-stealgroups`` - ``-pack`` with the opt-in ``steal_groups`` (and ``block_finalize``, a
                 default with 16 cores): the last layer's finalize window with neither of its two bounds, the pack
                 extension (the members take the solve's GPU words) nor the groups made one after another (a waiting
                 member's task takes the groups no task has reached yet); ``bookkeeping.block_finalize``'s
                 ``words_ahead`` and ``stolen`` say whether both happened;
* ``ours-grouped-batched-chunk1g5`` / ``ours-grouped-batched-chunk2g`` - with ``BatchedSolve(chunk_bytes=1.5 /
                 2 GiB)`` instead of 1 GiB: fewer, larger chunks a subset (a chunk's column loop launches
                 about as many kernels whatever its module count), at the price of more working memory;
                 the row's ``solve.chunks`` and ``peak_gpu_bytes`` say what it cost;
* ``ours-grouped-batched-inplace`` - with ``BatchedSolve(inplace_update=True)``: each module's update after a
                 column block as one in-place ``addmm_`` instead of a matmul and a subtraction (the row's
                 ``solve.block_updates`` counts the chunks solved each way; its checkpoint is compared with
                 stock's like every other row's);
* ``ours-grouped-batched-stockbk`` - ``ours-grouped-batched`` with ``lean_bookkeeping=False``:
                 GPTQModel's own per-module materialize/offload scans (``integrations.gptqmodel.overhead``),
                 to measure what the lean bookkeeping saves; every ``ours`` row records what it did
                 (``bookkeeping``).

Any variant takes modifiers after ``+``, each at most once: ``+si<N>`` runs its process with
``sys.setswitchinterval(N microseconds)`` (Python's default is 5000: how long a thread that wants the
interpreter lock back waits before it asks the running one to let go), ``+cpuw<N>`` sets
``GPTQMODEL_CPU_WORKERS=N`` (GPTQModel's CPU pool: the threads that pack and offload finished
modules; GPTQModel's default is half the cores, at most 12), ``+cudaw<N>`` gives GPTQModel's device
pool N workers per CUDA device instead of its 4 (the threads that run ``process()`` and so the
solves: fewer of them contend less for the interpreter lock), ``+pin1`` has ``layer_reads`` read
into pinned buffers (``layer_reads.PIN``), ``+nooff1`` loads with ``QuantizeConfig(offload_to_disk=False)``
(a diagnostic: what GPTQModel's per-module disk offload costs; not a comparable setting), ``+gcfreeze1`` calls
``gc.freeze()`` before ``quantize()`` and ``gc.unfreeze()`` after it (the interpreter's full collections, which hold
the interpreter lock while they scan every tracked object, then skip what was alive before the run; the row's
``gc_freeze`` says how many objects and what full collections still ran), ``+wt<N>`` (ours only) installs the
plugin with ``write_threads=N``: the save's shards copied into a mapping of each file by N threads (the row's
``save_path.writes.mapped`` counts the files written so). ``stock+si500`` and
``ours-grouped-batched+si500+cpuw4`` are variants; the row's ``modifiers`` say what was set.
``--gil-probe`` adds ``gil_probe`` to every row: how late a thread that sleeps 2 ms gets the lock
back, sampled through ``quantize()`` (``_gil_probe.py``); its mean is what each lock hand-back
costs there. ``--timeline`` adds ``timeline`` to every row: each subset stage of ``quantize()`` split into its calibration
forward, the time a batched chunk solve ran, and the rest, with the main thread's time outside the
subset stages gap by gap (``main_gaps``: the seconds of each step of GPTQModel's layer loop in it, such as
``BaseQModel.pre_quantize`` or ``build_layer_subset_plans``, and what no span covers) and each layer's finalize
window (``_timeline.py``); every span (GPTQModel's region-timer samples, subset stages, chunk solves, the layer
loop's steps, with their threads) is kept beside the JSON as ``<output stem>.<run>.timeline.jsonl``.
``--hessian-prints`` adds ``hessian_prints`` and ``weight_prints`` to every row (digests of the Hessian
and the weight each module's GPTQ solve starts from, and ``inverse_prints``: the inverse factor computed for each
Hessian, ``_hessian_prints.py``; one device sync per module, so a diagnostic, not a timing run) and
``hessians_vs_stock`` / ``weights_vs_stock`` / ``inverses_vs_stock`` to every other row: how
many modules' Hessians (weights) equal stock's and the first that differ, in the order stock solved them. With ``qweights_equal_by_group``
it tells whether a checkpoint difference starts in the Hessians or in the solve.

Every row records which GPTQModel code paths ran (``integrations.gptqmodel.kernels``): GPTQ
solves on the CUDA block-update extension or on GPTQModel's torch loop, Hessian inverses moved
to the CPU, the quantized Linear classes after ``quantize()`` and after reload. A CUDA run in
which any solve fell back is refused (exit 3, the JSON says ``"refused"``) unless
``--allow-fallback``, and then the table says so. ``--stages`` adds a per-stage breakdown to every
row (``stages``: wall seconds of the decoder-layer forward, the Hessian accumulation inside it, the
GPTQ solve, finalize = create the quantized module + pack, packing alone, save, and the framework
overhead = quantize time not spent in forward, solve or finalize; CUDA synchronized around each
timed call, so a profile: run it apart from the timing run). Every row records ``tail_s``: the
seconds from the last GPTQ solve handed to GPTQModel to ``quantize()``'s return (the last layer's
finalize, GPTQModel's end of the loop; ``GptqKernelRecord.seconds_after_last_solve``), and
``regions``: GPTQModel's own region timer (seconds and calls per region, summed over its threads).
Checkpoints are compared with the reference run (``meta.checkpoint_reference``) as soon as both are
on disk, between runs, each comparison also a line of the ``.partial.jsonl`` file, so a call cut
short after its runs keeps them.

``--gpu-counts 1,2`` measures GPTQModel's multi-GPU path: each variant runs once with the first GPU
visible and once with the first two (``CUDA_VISIBLE_DEVICES``; GPTQModel then replicates each
layer for a data-parallel calibration forward and spreads the GPTQ solves over both), one run at a
time; rows ``<variant>@<n>gpu`` record the time, the peak memory of every GPU, and the checkpoint
against the same variant's 1-GPU run.
Checkpoints are compared with stock's: identical tensors, the share of identical ``qweight``
tensors and the largest ``scales`` difference (the GPU is not deterministic; ``--deterministic``
turns on deterministic algorithms in every variant). ``meta.checkpoint_groups`` (and the line under
the tables) groups the runs whose checkpoints are identical, so a reference run that differs from
the other stock runs (stock's experts loop sums with ``index_add_``, not deterministic on CUDA) is
told from a variant that differs from stock.

Each variant: ``GPTQModel.load`` (GPTQ 4-bit, group 128), ``quantize``, ``save``, reload and
logits on a fixed prompt. With several GPUs the variants run at the same time, each alone on its
own GPU (``CUDA_VISIBLE_DEVICES``), so one call fits more; GPTQModel's JIT-built CUDA block-update
extension, defuser-quant's rows kernel and GPTQModel's CPU packing extension are built once before any variant
starts, so no variant pays for them, each in a child process of its own while the source model is built
(``_parallel_warm.py``; the JSON's ``extensions_waited_s``: how long the parent waited for them after it). Reported: wall time per step, peak GPU memory
(``torch.cuda.max_memory_allocated``), peak host RSS, expert projections quantized out of all,
the smallest number of calibration rows any expert projection's GPTQ saw (from GPTQModel's
own log), whether the checkpoint equals stock's tensor for tensor, and the logits' max
difference to stock. Prints a markdown table and writes JSON under ``benchmarks/results/``.
Every row records ``triton_compiles``: Triton kernels compiled inside its timed load + quantize +
save (``_triton_compiles.py``: new entries of Triton's on-disk cache, from any process, so with
variants running at once on several GPUs a count may include another's; null without Triton),
and ``triton_compiles_reload`` for the reload + logits step; the table marks a run that compiled
any. ``--warmup`` runs the first variant once, untimed, first, so they are compiled before.

    python benchmarks/gptqmodel_gpu.py                          # stock + ours, 1 layer
    python benchmarks/gptqmodel_gpu.py --variants stock,ours,ours-all   # 2 GPUs: 2 variants at a time
    python benchmarks/gptqmodel_gpu.py --layers 4 --variants stock,ours,ours-all --timeout 1800
    python benchmarks/gptqmodel_gpu.py --device cpu --tiny      # 2 CPU cores, < 1 minute
    python benchmarks/gptqmodel_gpu.py --layers 2 --variants stock,ours-grouped,ours-grouped-batched --stages
    python benchmarks/gptqmodel_gpu.py --layers 2 --variants ours-grouped-batched --gpu-counts 1,2   # 2 GPUs
    python benchmarks/gptqmodel_gpu.py --variants stock,ours --warmup   # Triton compiles in an untimed run first
    python benchmarks/gptqmodel_gpu.py --layers 2 --variants ours-grouped-batched,stock --repeat 2   # each side twice

``--deadline S`` starts no run that would end more than S seconds after the script started (each variant's longest
run so far, else the longest of any, as its estimate); the skipped runs are listed in the JSON's ``skipped``, so a
device call with a hard limit ends with a whole JSON. Before each run that has the machine to itself the script
calls ``os.sync()`` (untimed, the row's ``sync_before_s``), as ``distributed_gpu.py`` does: every run starts with
the earlier runs' checkpoints (about 2 GB each at the two-layer shape) written back, so the run order does not slow a
later run's save (round 53: ours' saves took 0.88 s in a call's first run and 1.1-1.8 s in its later ones).
Every row also says how busy the host was beside its run (``host_load``, ``_host_load.py``: other work's busy cores
from ``/proc/stat`` less the run's own CPU time, hypervisor steal, the run's cores, a Python probe just before it),
with a table after the ratios, so a slow run on a shared machine shows whether the machine was busy.
``--repeat N`` runs the variant list N times, one round after another (rows ``<variant>#2`` and
on; each compared with the first stock run's checkpoint: the first plain ``stock`` run, else the
first stock run of another setting such as ``stock+cpuw4``, named in ``meta.checkpoint_reference``),
and ``ratios_vs_stock`` holds each
variant's ratios against every stock run of the call (min / median / max over all pairs), the
spread of stock's and ours' run-to-run times in one figure.

Profiles (``benchmarks/_profile.py``): ``DQ_PROFILE_DIR``, ``DQ_TORCH_PROFILE_DIR`` or ``DQ_SAMPLE_DIR``
profile each variant's ``quantize`` (``gptqmodel-<run>``; with ``DQ_PROFILE_DIR`` before Python 3.12 also GPTQModel's
module finalizes on their worker threads, ``gptqmodel-<run>.finalize.txt``; from 3.12 the one profile holds every
thread) and, on its own, its save (``gptqmodel-<run>-save``);
the sampler also writes ``gptqmodel-<run>.tail.sampled.txt``, the samples from the last GPTQ solve on.
The ``+gil1`` modifier runs a variant under py-spy sampling only the interpreter lock's holder (``_gil_sampler.py``,
``DQ_GIL_DIR`` set for that run): the row gets ``gil_sample`` (quantize) and ``gil_sample_save``, GIL-held seconds by
thread and function, and py-spy's stacks are kept beside the JSON (``<out>.gptqmodel-<run>[-save].gil.txt.gz``); such
runs are left out of ``ratios_vs_stock``.

Budget (one H200, CUDA block-update extension built): ``quantize()`` of 2 Qwen3-30B-A3B layers
takes 36-55 s per variant, plus ~15-20 s of imports and ~5-10 s of reload per process, ~12 s to
build the source model and ~30 s to build the extension once: 3 variants with reload fit one
10-minute call, 4 do not reliably (docs/performance.md). Without the extension (GPTQModel's torch
loop, refused unless ``--allow-fallback``) it was about 4 minutes per layer per variant.

Needs gptqmodel==7.6.0 and this package importable (``pip install -e .`` or PYTHONPATH); on a GPU
machine without network, ``bash scripts/gpu_site/build.sh DIR`` here and ``PYTHONPATH=DIR:.`` there.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
STARTED = time.perf_counter()  # --deadline counts from here
ROOT = HERE.parent
CORPUS = ROOT / "defuser_quant" / "assets" / "corpus" / "train.txt"
#: variant suffix -> the lean bookkeeping part it leaves out (to measure that part in the same call)
WITHOUT_PART = {"-norecopy": "recopy", "-noreads": "layer_reads", "-nobundle": "offload_bundle",
                "-nokeeplast": "keep_last_block", "-noonload": "layer_onload", "-nowarm": "worker_warmup",
                "-noline": "line_redraw", "-nodiskprobe": "disk_probe", "-norehome": "rehome",
                "-nobasemem": "base_in_memory", "-nosolvewarmup": "solve_warmup", "-noblockfinalize": "block_finalize",
                "-nogcfreeze": "gc_freeze"}
#: variant suffix -> the opt-in lean bookkeeping part it adds to the default ones
WITH_PART = {"-layerahead": "layer_ahead", "-gcfreeze": "gc_freeze", "-capturelazy": "capture_lazy",
             "-tailworkers": "tail_workers", "-blockfinalize": "block_finalize", "-devicewords": "device_words",
             "-stealgroups": "steal_groups", "-rowpack": "row_pack", "-loadpriority": "load_priority",
             "-loadswitch": "load_switch",
             "-layerstage": "layer_stage"}
#: ``--timeline``: the phase from ``quantize_with_defuser``'s call to GPTQModel's ``quantize`` (the plugin's set-up)
SET_UP_PHASE = "quantize_with_defuser set-up"
#: variants with more than one part suffix (each suffix as above)
COMBINED_PARTS = ("ours-grouped-batched-layerahead-gcfreeze", "ours-grouped-batched-capturelazy-gcfreeze",
                  "ours-grouped-batched-blockfinalize-devicewords", "ours-grouped-batched-blockfinalize-stealgroups",
                  "ours-grouped-batched-blockfinalize-loadpriority", "ours-grouped-batched-capturelazy-layerstage")
VARIANTS = ("stock", "stock-again", "ours", "ours-all", "ours-grouped", "ours-all-grouped", "ours-batched",
            "ours-grouped-batched", "ours-all-grouped-batched", "ours-grouped-batched-stockbk",
            "ours-grouped-batched-serial", "ours-grouped-batched-parallel4", "ours-grouped-batched-hinv4",
            "ours-grouped-batched-hinv6", "ours-grouped-batched-hinv8",
            "ours-grouped-batched-host", "ours-grouped-batched-hinv4-host",
            "ours-grouped-batched-hinv1-device", "ours-grouped-batched-ahead2",
            "ours-grouped-batched-nopack", "ours-grouped-batched-pack", "ours-grouped-batched-modulerows",
            "ours-grouped-batched-stocksave", "ours-grouped-batched-hookhessians",
            "ours-grouped-batched-ownstreams", "ours-grouped-batched-callerstreams",
            "ours-grouped-batched-noahead", "ours-grouped-batched-norows", "ours-grouped-batched-packahead",
            "ours-grouped-batched-invgraphs", "ours-grouped-batched-noinvgraphs", "ours-grouped-batched-loopgraphs",
            "ours-grouped-batched-graphs", "ours-grouped-batched-hinv8-invgraphs", "ours-grouped-batched-hinv12-invgraphs",
            "ours-grouped-batched-solvehigh", "ours-grouped-batched-chunk1g5", "ours-grouped-batched-chunk2g",
            "ours-grouped-batched-inplace", "ours-grouped-batched-pack-stealgroups",
            *(f"ours-grouped-batched{suffix}" for suffix in (*WITHOUT_PART, *WITH_PART)), *COMBINED_PARTS)
MODIFIERS = {"si": "sys.setswitchinterval, microseconds", "cpuw": "GPTQMODEL_CPU_WORKERS",
             "cudaw": "GPTQModel device workers per CUDA device (its default: 4)",
             "pin": "layer_reads into pinned buffers (layer_reads.PIN)",
             "nooff": "QuantizeConfig(offload_to_disk=False): no per-module disk offload (a diagnostic bound)",
             "gcfreeze": "gc.freeze() before quantize() (the objects alive then are left out of full collections)",
             "wt": "install(write_threads=N): the save's shards copied into a mapping of each file by N threads",
             "gil": "py-spy samples the interpreter lock's holder through quantize() and the save (_gil_sampler.py; "
                    "needs py-spy: $DQ_PYSPY or on PATH); such a run is left out of the ratios"}
DEFAULT_VARIANTS = ("stock", "ours")
TINY = dict(layers=2, experts=8, hidden=128, intermediate=128, top_k=2, heads=4, kv_heads=2, head_dim=32, vocab=1024,
            samples=16, seq_len=128, batch_size=4)


#: Calibration rows shorter than this many tokens are skipped (build_source), so --seq-len must reach it.
MIN_ROW_TOKENS = 16
#: The benchmark tokenizer's ids: its byte-level alphabet (256) and two special tokens, at least.
MIN_VOCAB = 258


def add_shape_args(p: argparse.ArgumentParser) -> None:
    """The model shape (Qwen3-30B-A3B layers by default) and calibration size flags (call
    ``_args.check_shape`` after parsing)."""
    from _args import whole  # beside this script, on sys.path when it runs (or is imported by the tests)

    p.add_argument("--experts", type=whole(1), default=128)
    p.add_argument("--hidden", type=whole(1), default=2048)
    p.add_argument("--intermediate", type=whole(1), default=768, help="moe_intermediate_size")
    p.add_argument("--top-k", type=whole(1), default=8)
    p.add_argument("--heads", type=whole(1), default=32)
    p.add_argument("--kv-heads", type=whole(1), default=4)
    p.add_argument("--head-dim", type=whole(1), default=128)
    p.add_argument("--vocab", type=whole(MIN_VOCAB), default=151936,
                   help=f"vocabulary size (at least {MIN_VOCAB}: the tokenizer's byte alphabet and special tokens)")
    p.add_argument("--samples", type=whole(1), default=128, help="calibration rows")
    p.add_argument("--seq-len", type=whole(MIN_ROW_TOKENS), default=256,
                   help=f"tokens per calibration row (at most; rows under {MIN_ROW_TOKENS} tokens are skipped)")


def split_variant(name: str) -> tuple[str, dict[str, int]]:
    """``"ours-grouped-batched+si500+cpuw4"`` -> ``("ours-grouped-batched", {"si": 500, "cpuw": 4})``;
    a ``ValueError`` names a modifier that is unknown, not a positive integer, or given twice."""
    base, *parts = name.split("+")
    modifiers: dict[str, int] = {}
    for part in parts:
        match = re.fullmatch(r"([a-z]+)(\d+)", part)
        if match is None or match[1] not in MODIFIERS or int(match[2]) < 1 or match[1] in modifiers:
            raise ValueError(f"variant {name!r}: bad modifier {part!r}; use +si<microseconds>, +cpuw<workers>, "
                             "+cudaw<workers>, +pin1, +nooff1, +gcfreeze1, +gil1 and/or +wt<threads>, each a positive integer, "
                             "each at most once")
        modifiers[match[1]] = int(match[2])
    return base, modifiers


def strip_suffixes(name: str, suffixes) -> tuple[str, list[str]]:
    """``name`` without every trailing one of ``suffixes`` (in any order, each as often as it ends the rest), and the
    suffixes taken off, last first: ``("ours-grouped-batched-layerahead-gcfreeze", parts)`` ->
    ``("ours-grouped-batched", ["-gcfreeze", "-layerahead"])``."""
    taken: list[str] = []
    stripped = True
    while stripped:
        stripped = False
        for suffix in suffixes:
            if name.endswith(suffix):
                name, stripped = name.removesuffix(suffix), True
                taken.append(suffix)
    return name, taken


def bookkeeping_setting(variant: str):
    """The ``lean_bookkeeping`` argument of an ``ours`` variant: True, False or a set of parts."""
    if variant.endswith("-stockbk"):
        return False
    from defuser_quant.integrations.gptqmodel.overhead import default_parts

    _, taken = strip_suffixes(variant, (*WITHOUT_PART, *WITH_PART))  # "-layerahead-gcfreeze": both parts added
    if not taken:
        return True
    parts = set(default_parts())  # this host's: block_finalize only with 16 cores or more
    for suffix in taken:
        if suffix in WITHOUT_PART:
            parts.discard(WITHOUT_PART[suffix])
        else:
            parts.add(WITH_PART[suffix])
    return parts


def solve_setting(variant: str):
    """The ``batched_solve`` argument of an ``ours`` variant: False, True or a ``BatchedSolve``."""
    base = variant.removesuffix("-stocksave").removesuffix("-stockbk").removesuffix("-hookhessians")
    base, _ = strip_suffixes(base, (*WITHOUT_PART, *WITH_PART))
    settings = {"-serial": {"parallel": 1}, "-parallel4": {"parallel": 4}, "-hinv4": {"inverse_threads": 4},
                "-hinv6": {"inverse_threads": 6}, "-hinv8": {"inverse_threads": 8}, "-hinv12": {"inverse_threads": 12}, "-hinv1": {"inverse_threads": 1},
                "-host": {"host_results": True}, "-device": {"host_results": False},
                "-ahead2": {"solve_ahead": 2}, "-nopack": {"pack": False}, "-pack": {"pack": True},
                "-modulerows": {"log_rows": "module"}, "-ownstreams": {"streams": "own"},
                "-callerstreams": {"streams": "caller"}, "-noahead": {"inverses_ahead": False},
                "-norows": {"rows_kernel": False}, "-packahead": {"pack_ahead": True},
                "-invgraphs": {"inverse_graphs": True}, "-noinvgraphs": {"inverse_graphs": False},
                "-loopgraphs": {"loop_graphs": True}, "-solvehigh": {"solve_priority": "high"},
                "-chunk1g5": {"chunk_bytes": 3 << 29}, "-chunk2g": {"chunk_bytes": 2 << 30},
                "-inplace": {"inplace_update": True},
                "-graphs": {"inverse_graphs": True, "loop_graphs": True}}
    base, taken = strip_suffixes(base, settings)
    kwargs: dict = {}
    for suffix in taken:
        kwargs.update(settings[suffix])
    if kwargs:
        from defuser_quant.integrations.gptqmodel.batched import BatchedSolve

        return BatchedSolve(**kwargs)
    return base.endswith("-batched")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from _args import check_shape, whole  # beside this script, on sys.path when it runs (or is imported by the tests)

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="tiny shape for a CPU smoke run: " + json.dumps(TINY))
    p.add_argument("--layers", type=whole(1), default=1, help="decoder layers (each one a full Qwen3-30B-A3B layer)")
    add_shape_args(p)
    p.add_argument("--batch-size", type=whole(1), default=8)
    p.add_argument("--variants", default=None,
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default {','.join(DEFAULT_VARIANTS)}; all three with --tiny)")
    p.add_argument("--backend", default="gptq_triton",
                   help="GPTQModel kernel for quantize() packing and reload (a BACKEND value; 'auto' may pick Machete "
                        "on Hopper, which downloads CUTLASS and JIT-builds; default gptq_triton; on CPU use auto)")
    p.add_argument("--no-reload", action="store_true", help="skip the reload + logits step")
    p.add_argument("--stages", action="store_true", help="time the stages (synchronizes CUDA around each: a profile)")
    p.add_argument("--deterministic", action="store_true", help="deterministic algorithms in every variant")
    p.add_argument("--cold", action="store_true",
                   help="drop the source checkpoint's pages from the page cache before every variant (posix_fadvise), "
                        "so each one reads its layers from disk, as a model larger than the page cache would")
    p.add_argument("--gil-probe", action="store_true",
                   help="sample the interpreter lock's hand-back delay through quantize() (gil_probe in every row)")
    p.add_argument("--hessian-prints", action="store_true",
                   help="digests of each module's Hessian and weight at its solve in every row, compared with stock's (a diagnostic)")
    p.add_argument("--timeline", action="store_true",
                   help="record when each subset stage, GPTQModel region and batched chunk solve ran (_timeline.py)")
    p.add_argument("--warmup", action="store_true",
                   help="run the first variant once, untimed, before the timed runs (Triton compiles its kernels then)")
    p.add_argument("--allow-fallback", action="store_true",
                   help="report a CUDA run in which GPTQ solves fell back to GPTQModel's torch path (the table says so)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temp dir, removed)")
    p.add_argument("--timeout", type=whole(1), default=420, help="seconds per variant")
    p.add_argument("--deadline", type=float, default=None,
                   help="seconds since the script started after which no run starts that would end later (each "
                        "variant's longest run so far, else the longest of any, as its estimate); the skipped runs are "
                        "listed in the JSON's 'skipped' (a device call's limit then leaves a whole JSON)")
    p.add_argument("--repeat", type=whole(1), default=1,
                   help="run the variant list this many times, one round after another (runs <variant>#2, ...); "
                        "ratios_vs_stock then holds each variant's ratio against every stock run of the call")
    p.add_argument("--gpus", type=int, default=None,
                   help="variants run at once, one GPU each (default: every visible GPU, 1 on CPU)")
    p.add_argument("--gpu-counts", default=None,
                   help="comma-separated GPU counts, e.g. 1,2: every variant once per count (first N GPUs visible), "
                        "one run at a time; checkpoints compared with the same variant's run at the first count")
    p.add_argument("--output", type=Path, default=None, help="JSON path (default benchmarks/results/gptqmodel_<device>[_tiny].json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--run-id", default=None, help=argparse.SUPPRESS)
    p.add_argument("--warm-extension", default=None, choices=sorted(WARMERS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.variants is None and args.tiny:
        args.variants = "stock,ours,ours-all"
    if args.tiny:
        for key, value in TINY.items():
            setattr(args, key, value)
    if args.variants is None:
        args.variants = ",".join(VARIANTS if args.tiny else DEFAULT_VARIANTS)
    check_shape(p, args)
    if args.device == "cpu" and args.backend == "gptq_triton":
        args.backend = "auto"
    if args.gpu_counts is not None:
        try:
            args.gpu_counts = [int(n) for n in args.gpu_counts.split(",") if n]
        except ValueError:
            p.error(f"--gpu-counts takes comma-separated integers, got {args.gpu_counts!r}")
        if not args.gpu_counts or min(args.gpu_counts) < 1 or args.device != "cuda":
            p.error("--gpu-counts needs --device cuda and counts >= 1")
        if args.repeat > 1:
            p.error("--repeat runs the variant list again; with --gpu-counts each variant already runs once per count")
        if args.deadline is not None:
            p.error("--deadline is for the variant list; with --gpu-counts every count of a variant runs")
    if args.deadline is not None and not args.deadline > 0:
        p.error(f"--deadline takes seconds > 0, got {args.deadline}")
    return args


def runs_of(variants: list[str], repeat: int) -> list[tuple[str, str]]:
    """``(variant, run id)`` for every run: the list once per round, ``<variant>#<round>`` from the second."""
    return [(v, v if k == 1 else f"{v}#{k}") for k in range(1, repeat + 1) for v in variants]


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": round(min(values), 2), "median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def gil_sampled(variant: str) -> bool:
    """Whether ``variant`` runs under py-spy (``+gil1``): its times are not a clean measurement."""
    return "gil" in split_variant(variant)[1]


def is_stock(variant: str) -> bool:
    """Whether ``variant`` runs stock GPTQModel + Defuser (``stock``, ``stock-again``, ``stock+si500``...)."""
    return variant.startswith("stock")


def checkpoint_reference(rows: list[dict]) -> dict | None:
    """The run every other run's checkpoint is compared with: the first plain ``stock`` run that
    finished, else the first stock run of another setting (``stock+cpuw4``...); None without one."""
    done = [r for r in rows if "error" not in r]
    return next((r for r in done if r["variant"] == "stock"), None) or next(
        (r for r in done if is_stock(r["variant"])), None)


def ratios_vs_stock(rows: list[dict]) -> dict[str, dict]:
    """Per variant that is not stock: its runs' ratios against every stock run of the call (stock's
    seconds / its seconds, end to end and quantize), min / median / max over all those pairs. Runs under py-spy
    (``+gil1``) are left out on both sides."""
    done = [r for r in rows if "error" not in r and not gil_sampled(r["variant"])]
    stock = [r for r in done if is_stock(r["variant"])]
    if not stock:
        return {}
    out: dict[str, dict] = {}
    for variant in dict.fromkeys(r["variant"] for r in done if not is_stock(r["variant"])):
        mine = [r for r in done if r["variant"] == variant]
        out[variant] = {
            "runs": len(mine), "stock_runs": len(stock),
            "end_to_end": _spread([s["total_s"] / r["total_s"] for s in stock for r in mine]),
            "quantize": _spread([s["quantize_s"] / r["quantize_s"] for s in stock for r in mine]),
        }
    return out


def _env(device: str, gpu: int | str | None = None) -> dict[str, str]:
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    if (os.cpu_count() or 1) <= 4:
        env.setdefault("GPTQMODEL_CPU_WORKERS", "2")  # GPTQModel's pools need it on tiny machines
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


# ----- parent: build the model, run the variants, compare -----------------------------------
def build_source(args: argparse.Namespace, src: Path) -> list[dict]:
    """Tokenizer + random bf16 model saved to ``src``; returns the calibration rows."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen3MoeConfig, Qwen3MoeForCausalLM

    text = CORPUS.read_text(encoding="utf-8")
    paragraphs = [p for p in re.split(r"\n\s*\n", text) if len(p) > 200]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=min(args.vocab, 4096), special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(paragraphs, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>", bos_token="<|endoftext|>")
    fast.save_pretrained(src)
    rows = []  # before the model is built: a request the corpus cannot meet is refused at once
    for start in range(0, len(paragraphs) - 3, 4):
        enc = fast(" ".join(paragraphs[start:start + 4]), truncation=True, max_length=args.seq_len)
        if len(enc["input_ids"]) >= MIN_ROW_TOKENS:
            rows.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
            if len(rows) == args.samples:
                break
    else:
        raise SystemExit(f"--samples {args.samples}: the bundled corpus ({CORPUS.name}) gives only {len(rows)} "
                         f"calibration rows of at least {MIN_ROW_TOKENS} tokens; ask for at most {len(rows)}")
    config = Qwen3MoeConfig(
        vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate * 4,
        moe_intermediate_size=args.intermediate, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, head_dim=args.head_dim, num_experts=args.experts,
        num_experts_per_tok=args.top_k, max_position_embeddings=4096, tie_word_embeddings=False,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
    )
    device = "cuda" if args.device == "cuda" and torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(src)
    del model
    return rows


def _warm(label: str, load: Callable[[], object]) -> tuple[float | None, bool | None]:
    """Seconds to build or load one of GPTQModel's JIT extensions, and whether it is available
    (None, None without GPTQModel)."""
    t0 = time.perf_counter()
    try:
        available = bool(load())
    except ImportError as exc:
        print(f"{label}: not loaded ({exc})", flush=True)
        return None, None
    print(f"{label} available: {available}", flush=True)
    return round(time.perf_counter() - t0, 2), available


def warm_gptq_extension() -> tuple[float | None, bool | None]:
    """Build GPTQModel's CUDA block-update extension once (a JIT build the first user pays for)."""

    def load() -> object:
        from gptqmodel.quantization.gptq_cuda import block_update_available

        return block_update_available()

    return _warm("GPTQ block-update extension", load)


def map_source_checkout() -> None:
    """Make ``defuser_quant.integrations``/``calibration`` importable from a plain checkout (``_source``)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    from _source import use_source_checkout

    use_source_checkout()


def warm_rows_kernel() -> tuple[float | None, bool | None]:
    """Build defuser-quant's one-launch block kernel once (``rows_kernel``; torch caches the build,
    so the variants' processes load it instead of each paying the build)."""

    def load() -> object:
        map_source_checkout()  # the parent process of a plain checkout, as each variant's worker does
        from defuser_quant.integrations.gptqmodel import rows_kernel

        ok = rows_kernel.available()
        if not ok:
            print(f"rows kernel unavailable: {rows_kernel.why_unavailable()}", flush=True)
        return ok

    return _warm("one-launch GPTQ block kernel", load)


def warm_pack_extension() -> tuple[float | None, bool | None]:
    """Build (or load) GPTQModel's CPU packing extension once: GPTQModel builds it on first use and
    caches it on disk, so without this the first variant's packing stage would hold the build."""

    def load() -> object:
        from gptqmodel.utils.cpp import load_pack_block_extension

        return load_pack_block_extension()

    return _warm("GPTQModel pack_block_cpu extension", load)


def warm_row_pack_kernel() -> tuple[float | None, bool | None]:
    """Build defuser-quant's row-wise CPU pack kernel once (``pack_kernel``, for ``-rowpack`` variants: torch caches
    the build, so the variants' processes load it instead of the first one timing the build)."""

    def load() -> object:
        map_source_checkout()
        from defuser_quant.integrations.gptqmodel import pack_kernel

        return pack_kernel.load() is not None

    return _warm("row-wise pack kernel", load)


#: The extensions the parent builds before the runs, each in a child process of its own (``--warm-extension``).
WARMERS: dict[str, Callable[[], tuple[float | None, bool | None]]] = {
    "gptq": warm_gptq_extension, "rows": warm_rows_kernel, "pack": warm_pack_extension,
    "rowpack": warm_row_pack_kernel}


def run_variants(runs: list[tuple[str, str]], args: argparse.Namespace, work: Path, slots: int,
                 partial: Path | None = None, finished: Callable[[dict], None] | None = None) -> list[dict]:
    """Each ``(variant, run id)`` in its own process; ``slots`` of them at a time, slot i on GPU i.

    Every finished row is appended to ``partial`` (JSON lines) at once, so a run cut short by a
    time limit keeps what it measured; ``finished`` is then called with it (one call at a time).
    """
    free = list(range(slots))
    import threading

    lock = threading.Lock()
    deadline = getattr(args, "deadline", None)
    longest: dict[str, float] = {}  # variant -> its longest run so far (seconds), the estimate of its next

    def one(run: tuple[str, str]) -> dict:
        variant, run_id = run
        if deadline is not None:
            with lock:
                estimate = longest.get(variant, max(longest.values(), default=0.0))
            if time.perf_counter() - STARTED + estimate > deadline:
                print(f"skipping {run_id}: it would end after the {deadline:.0f} s deadline", flush=True)
                return {"variant": variant, "run": run_id, "skipped": f"would end after the {deadline:.0f} s deadline"}
        gpu = free.pop(0) if slots > 1 else None
        try:
            print(f"running {run_id}" + ("" if gpu is None else f" on GPU {gpu}") + " ...", flush=True)
            t0 = time.perf_counter()
            row = run_variant(variant, args, work, gpu, run_id=run_id, alone=slots == 1)
            with lock:
                longest[variant] = max(longest.get(variant, 0.0), time.perf_counter() - t0)
            row["gpu_index"] = gpu
            line = json.dumps({k: v for k, v in row.items() if k != "log_tail"})
            print(line, flush=True)
            if partial is not None:
                with lock, partial.open("a") as f:
                    f.write(line + "\n")
            if "log_tail" in row:
                print(row["log_tail"], flush=True)
            if finished is not None:
                with lock:
                    finished(row)
            return row
        finally:
            if gpu is not None:
                free.append(gpu)

    with concurrent.futures.ThreadPoolExecutor(max_workers=slots) as pool:
        return list(pool.map(one, runs))


def evict_page_cache(folder: Path) -> int:
    """Drop the pages of every ``*.safetensors`` file under ``folder`` from the page cache (written
    back first); returns how many files the OS took the advice for."""
    from _page_cache import evict  # beside this script, on sys.path when it runs (or is imported by the tests)

    return sum(evict(path) for path in sorted(folder.glob("*.safetensors")))


def run_variant(variant: str, args: argparse.Namespace, work: Path, gpu: int | str | None = None,
                run_id: str | None = None, alone: bool = True) -> dict:
    """One variant in a fresh process; ``gpu``: its ``CUDA_VISIBLE_DEVICES``; files under ``run_id``.

    ``alone`` (no other run going on): the earlier runs' checkpoints are written back first, untimed
    (``sync_before_s``), so that this run's save does not wait on their dirty pages; beside a concurrent
    run that write-back would slow the other run instead, so it is left out (``sync_before_s`` None)."""
    from _host_load import host_load  # beside this script, on sys.path when it runs (or is imported by the tests)
    from _page_cache import write_back

    run_id = run_id or variant
    result = work / f"{run_id}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", variant, "--run-id", run_id, "--workdir", str(work),
           "--device", args.device, "--batch-size", str(args.batch_size), "--backend", args.backend] + [
        flag for flag, on in (("--no-reload", args.no_reload), ("--stages", args.stages), ("--deterministic", args.deterministic),
                              ("--gil-probe", args.gil_probe), ("--hessian-prints", args.hessian_prints),
                              ("--timeline", getattr(args, "timeline", False))) if on
    ]
    evicted = evict_page_cache(work / "src") if getattr(args, "cold", False) else None
    synced = write_back() if alone else None
    env = _env(args.device, gpu)
    workers = split_variant(variant)[1].get("cpuw")
    if workers is not None:
        env["GPTQMODEL_CPU_WORKERS"] = str(workers)  # read when gptqmodel is imported
    env.pop("DQ_GIL_DIR", None)
    if gil_sampled(variant):
        env["DQ_GIL_DIR"] = str(work / f"{run_id}.gil")  # _gil_sampler.py: quantize's and the save's samples
    if args.deterministic:
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before CUDA starts in the worker
    host: dict = {}  # host_load: how busy the machine was beside this run (concurrent runs count as each other's load)
    t0 = time.perf_counter()
    try:
        with host_load(host):
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired as exc:
        text = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "") for x in (exc.stdout, exc.stderr))
        (work / f"{run_id}.log").write_text(text)
        return {"variant": variant, "run": run_id, "error": f"timeout after {args.timeout}s", "log_tail": text[-3000:],
                "process_s": args.timeout, "sync_before_s": synced, **host}
    (work / f"{run_id}.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode != 0 or not result.exists():
        tail = (proc.stdout + proc.stderr)[-3000:]
        return {"variant": variant, "run": run_id, "error": f"exit {proc.returncode}", "log_tail": tail,
                "process_s": time.perf_counter() - t0, "sync_before_s": synced, **host}
    data = json.loads(result.read_text())
    data["process_s"] = round(time.perf_counter() - t0, 2)
    data["cold_files_evicted"] = evicted  # None: the page cache was left as it was (warm)
    data["sync_before_s"] = synced  # None: not written back first (a concurrent run)
    data.update(host)
    return data


def run_scaling(variants: list[str], args: argparse.Namespace, work: Path, partial: Path | None = None) -> list[dict]:
    """Every variant once per GPU count (the first N GPUs visible), one run at a time.

    Each row gets ``gpus``, ``speedup`` (quantize time at the fewest GPUs over this one's) and the
    checkpoint against the same variant's run at the fewest GPUs (``checkpoint_vs_fewest_gpus``).
    """
    rows = []
    counts = sorted(set(args.gpu_counts))
    for variant in variants:
        runs = []
        for n in counts:
            run_id = f"{variant}@{n}gpu"
            print(f"running {run_id} ...", flush=True)
            row = run_variant(variant, args, work, ",".join(str(i) for i in range(n)), run_id=run_id)
            row.update(run=run_id, gpus=n)
            line = json.dumps({k: v for k, v in row.items() if k != "log_tail"})
            print(line, flush=True)
            if partial is not None:
                with partial.open("a") as f:
                    f.write(line + "\n")
            if "log_tail" in row:
                print(row["log_tail"], flush=True)
            runs.append(row)
        base = runs[0]
        if "error" not in base:
            _compare_rows(runs, work, base, "checkpoint_vs_fewest_gpus_detail", "checkpoint_vs_fewest_gpus")
            for r in runs:
                if "error" not in r:
                    r["speedup"] = f"{base['quantize_s'] / r['quantize_s']:.2f}x"
        rows += runs
    return rows


#: Packed quantized weights and their scales: GPTQModel's names, then compressed-tensors' (llm-compressor).
PACKED_SUFFIXES = (".qweight", ".weight_packed")
SCALE_SUFFIXES = (".scales", ".weight_scale")


def _plain(name: str) -> str:
    """``name`` as a plain file name: ``#``, ``+`` and every other character but letters, digits, ``.``, ``_`` and
    ``-`` made ``_``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def gil_stacks_path(out: Path, name: str) -> Path:
    """Where a ``+gil1`` run's py-spy stacks (``name``: ``gptqmodel-<run>[-save].gil.txt``) are kept beside the JSON
    ``out``, gzipped (a plain file name)."""
    return out.with_name(f"{out.stem}.{_plain(name)}.gz")


def timeline_path(out: Path, run: str) -> Path:
    """Where ``--timeline`` keeps a run's spans beside the JSON ``out`` (a plain file name)."""
    return out.with_name(f"{out.stem}.{_plain(run)}.timeline.jsonl")


def region_totals(model: object) -> dict[str, dict] | None:
    """GPTQModel's own region timer (``quant_region_timer``) after load and ``quantize()``: seconds
    and calls per region it timed (summed over its threads, so regions overlap and may exceed the
    wall time); None where the model has no such timer."""
    stats = getattr(getattr(model, "quant_region_timer", None), "_stats", None)
    if not stats:
        return None
    return {region: {"seconds": round(float(stat.get("total") or 0.0), 3), "calls": int(stat.get("count") or 0)}
            for region, stat in stats.items() if stat.get("count")}


def compare_checkpoints(a: Path, b: Path) -> dict:
    """Tensor by tensor (one pair in memory at a time): how many are identical, how many of the packed
    weights, and the largest scale difference (GPTQModel or compressed-tensors names)."""
    from safetensors import safe_open

    def index(d: Path) -> dict[str, Path]:
        return {k: f for f in sorted(d.glob("*.safetensors")) for k in safe_open(str(f), "pt").keys()}

    ia, ib = index(a), index(b)
    common = sorted(set(ia) & set(ib))
    equal = qweights = qweights_equal = 0
    scale_diff = 0.0
    by_group: dict[str, list[int]] = {}  # "model.layers.0.mlp.experts.*.gate_proj" -> [equal, packed weights]
    with contextlib.ExitStack() as stack:  # each file opened once (not once per tensor)
        handles = {f: stack.enter_context(safe_open(str(f), "pt")) for f in {*ia.values(), *ib.values()}}
        for key in common:
            ta, tb = handles[ia[key]].get_tensor(key), handles[ib[key]].get_tensor(key)
            same = ta.dtype == tb.dtype and ta.shape == tb.shape and bool((ta == tb).all())
            equal += int(same)
            if key.endswith(PACKED_SUFFIXES):
                qweights += 1
                qweights_equal += int(same)
                group = by_group.setdefault(re.sub(r"\.experts\.\d+\.", ".experts.*.", key.rsplit(".", 1)[0]), [0, 0])
                group[0] += int(same)
                group[1] += 1
            elif key.endswith(SCALE_SUFFIXES) and ta.shape == tb.shape:
                scale_diff = max(scale_diff, float((ta.float() - tb.float()).abs().max()))
    return {"keys_a": len(ia), "keys_b": len(ib), "common": len(common), "equal": equal,
            "qweights": qweights, "qweights_equal": qweights_equal, "max_scale_diff": scale_diff,
            "qweights_equal_by_group": {g: f"{e}/{n}" for g, (e, n) in sorted(by_group.items())}}


STAGE_COLUMNS = ("forward", "hessian", "solve", "finalize", "pack", "save", "framework_overhead", "materialize", "offload", "log")


def stage_breakdown(kernels: dict, quantize_s: float, save_s: float) -> dict:
    """Wall seconds per stage from the kernel recorder (``--stages``), plus save and the overhead.

    ``forward`` contains ``hessian`` (the capture hooks run inside it) and ``finalize`` contains
    ``pack``; ``framework_overhead`` is quantize time in none of forward, solve or finalize; the
    host stages ``materialize``, ``offload`` and ``log`` (GPTQModel's per-module machinery) may
    overlap any of them; ``outside_every_stage`` is quantize time in no stage at all.
    """
    wall = kernels.get("stage_wall_seconds") or {}
    out = {k: round(wall.get(k, 0.0), 2) for k in ("forward", "hessian", "experts_forward", "solve", "finalize", "pack",
                                                   "materialize", "offload", "log")}
    out["save"] = round(save_s, 2)
    out["framework_overhead"] = round(quantize_s - kernels.get("busy_wall_seconds", 0.0), 2)
    if "any_stage_wall_seconds" in kernels:
        out["outside_every_stage"] = round(quantize_s - kernels["any_stage_wall_seconds"], 2)
    out["thread_seconds"] = {k: round(v, 2) for k, v in (kernels.get("stage_seconds") or {}).items()}
    return out


def _gib(value: int | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def triton_note(row: dict) -> str:
    """`` (Triton compiled N kernels in this run)`` when ``row``'s timed load + quantize + save compiled any, else ``""``."""
    n = row.get("triton_compiles")
    return f" (Triton compiled {n} kernels in this run)" if n else ""


def ratios_markdown(ratios: dict[str, dict]) -> str:
    """``ratios_vs_stock`` as a table (empty without stock runs or other variants)."""
    if not ratios:
        return ""
    lines = ["", "", "Ratios against every stock run of this call (stock's seconds / the variant's; min / median / max):", "",
             "| variant | runs | stock runs | end to end | quantize |", "|---|---:|---:|---|---|"]
    for variant, r in ratios.items():
        e, q = r["end_to_end"], r["quantize"]
        lines.append(f"| {variant} | {r['runs']} | {r['stock_runs']} | {e['min']:.2f}x / {e['median']:.2f}x / {e['max']:.2f}x | "
                     f"{q['min']:.2f}x / {q['median']:.2f}x / {q['max']:.2f}x |")
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    """The rows as markdown tables; a run whose timed region compiled Triton kernels says so."""
    cols = ["run", "load_s", "quantize_s", "tail_s", "save_s", "total_s", "peak_gpu_gib", "peak_rss_gib", "experts_quantized",
            "min_expert_rows", "gptq_solve_path", "batched_modules", "same_ckpt_as_stock", "qweights_equal", "max_scale_diff",
            "logits_vs_stock"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        name = r.get("run", r["variant"])
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} |" + " |" * (len(cols) - 2))
            continue
        peaks = r.get("peak_gpu_bytes_per_device") or [r.get("peak_gpu_bytes")]
        solve = r.get("solve") or {}
        cells = [
            name + triton_note(r), f"{r['load_s']:.1f}", f"{r['quantize_s']:.1f}",
            "-" if r.get("tail_s") is None else f"{r['tail_s']:.1f}", f"{r['save_s']:.1f}", f"{r['total_s']:.1f}",
            " / ".join(_gib(v) for v in peaks), f"{r['peak_rss_bytes'] / 2**30:.2f}", f"{r['experts_quantized']}/{r['expert_projections']}",
            str(r.get("min_expert_samples", "-")), r.get("kernels_label", "-"),
            f"{solve['batched_modules']}/{solve['batched_modules'] + sum(solve['per_module'].values())}" if solve else "per module",
            r.get("same_ckpt_as_stock", "-"), r.get("qweights_equal", "-"), r.get("max_scale_diff", "-"), r.get("logits_vs_stock", "-"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    staged = [r for r in rows if r.get("stages")]
    if staged:
        lines += ["", "Stages (wall seconds; forward contains hessian, finalize contains pack):", "",
                  "| run | quantize | " + " | ".join(STAGE_COLUMNS) + " |", "|---|" + "---:|" * (len(STAGE_COLUMNS) + 1)]
        for r in staged:
            st = r["stages"]
            lines.append(f"| {r.get('run', r['variant'])}{triton_note(r)} | {r['quantize_s']:.1f} | " + " | ".join((f"{st[c]:.2f}" if c in st else "-") for c in STAGE_COLUMNS) + " |")
    probed = [r for r in rows if r.get("gil_probe") and "error" not in r]
    if probed:
        lines += ["", "Interpreter lock during quantize() (--gil-probe: delay of a 2 ms sleep's wake-up):", "",
                  "| run | switch interval (ms) | mean (ms) | p90 (ms) | over 1 ms | lock waits (s) | second copies skipped | "
                  "results on host |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for r in probed:
            g, bk, solve = r["gil_probe"], r.get("bookkeeping") or {}, r.get("solve") or {}
            lines.append(f"| {r.get('run', r['variant'])} | {g['switch_interval_ms']} | {g['mean_ms']} | {g['p90_ms']} | "
                         f"{g['over_1ms']} | {g['waited_s']} | {bk.get('recopy_skipped', '-')} | {solve.get('host_results', '-')} |")
    lines += gil_markdown(rows)
    scaled = [r for r in rows if r.get("gpus") and "error" not in r]
    if len({r["gpus"] for r in scaled}) > 1:
        lines += ["", "| variant | GPUs | quantize (s) | total (s) | speed-up | peak GPU GiB per device | checkpoint vs fewest GPUs |",
                  "|---|---:|---:|---:|---:|---|---|"]
        for r in scaled:
            lines.append(f"| {r['variant']}{triton_note(r)} | {r['gpus']} | {r['quantize_s']:.1f} | {r['total_s']:.1f} | {r.get('speedup', '-')} | "
                         + " / ".join(_gib(v) for v in r.get("peak_gpu_bytes_per_device") or []) + f" | {r.get('checkpoint_vs_fewest_gpus', '-')} |")
    return "\n".join(lines)


def gil_markdown(rows: list[dict], top: int = 6) -> list[str]:
    """The ``+gil1`` runs' interpreter lock: held seconds of quantize() against its wall time, per thread pool and the
    functions that held it longest (innermost frame); lines to add to the report (none without such a run)."""
    sampled = [r for r in rows if (r.get("gil_sample") or {}).get("samples") is not None and "error" not in r]
    failed = [f"{r.get('run', r['variant'])}: {r['gil_sample']['error']}" for r in rows if (r.get("gil_sample") or {}).get("error")]
    lines = [""] + [f"py-spy did not sample {x}" for x in failed] if failed else []
    if not sampled:
        return lines
    lines += ["", "Interpreter lock held during quantize() (+gil1 runs, py-spy --gil; seconds):", "",
              "| run | wall | held | by thread | longest held (innermost function) |", "|---|---:|---:|---|---|"]
    for r in sampled:
        g = r["gil_sample"]
        threads = ", ".join(f"{name} {sec:.2f}" for name, sec in list(g["by_thread"].items())[:4])
        own = ", ".join(f"{name.split(' (')[0]} {sec:.2f}" for name, sec in g["own"][:top])
        lines.append(f"| {r.get('run', r['variant'])} | {g['wall_seconds']:.2f} | {g['gil_seconds']:.2f} | {threads} | {own} |")
    return lines


def compare_hessian_prints(rows: list[dict], stock: dict) -> None:
    """``hessians_vs_stock`` (and ``weights_vs_stock``, ``inverses_vs_stock``) in every other row that has prints
    (``--hessian-prints``)."""
    if stock.get("hessian_prints") is None:
        return
    from _hessian_prints import compare, compare_inverses  # beside this script, on sys.path when it runs

    for r in rows:
        if r is not stock and "error" not in r and r.get("hessian_prints") is not None:
            r["hessians_vs_stock"] = compare(stock["hessian_prints"], r["hessian_prints"])
            if stock.get("weight_prints") is not None and r.get("weight_prints") is not None:
                r["weights_vs_stock"] = compare(stock["weight_prints"], r["weight_prints"])
            if stock.get("inverse_prints") is not None and r.get("inverse_prints") is not None:
                r["inverses_vs_stock"] = compare_inverses(stock["inverse_prints"], r["inverse_prints"],
                                                          stock.get("inverse_modules"))


class EarlyComparisons:
    """Each finished run's checkpoint compared with the reference (:func:`checkpoint_reference`)
    as soon as both are on disk, each comparison a JSON line in ``partial``, so a call cut short
    after its runs keeps them; :func:`_compare_rows` takes them from :attr:`done` at the end. Call
    it with each row as it finishes (``run_variants(finished=...)``); runs one after another only,
    so that no comparison reads the disk during a timed run."""

    def __init__(self, work: Path, partial: Path | None):
        self.work, self.partial = work, partial
        self.rows: list[dict] = []
        self.done: dict[tuple[str, str], dict] = {}  # (reference run, run) -> compare_checkpoints

    def __call__(self, row: dict) -> None:
        self.rows.append(row)
        reference = checkpoint_reference(self.rows)
        if reference is None:
            return
        for r in self.rows:
            pair = (reference["run"], r["run"])
            if r is reference or "error" in r or pair in self.done:
                continue
            self.done[pair] = cmp = compare_checkpoints(self.work / f"{pair[0]}.out", self.work / f"{pair[1]}.out")
            print(f"{pair[1]} vs {pair[0]}: {cmp['qweights_equal']}/{cmp['qweights']} qweights equal", flush=True)
            if self.partial is not None:
                with self.partial.open("a") as f:
                    f.write(json.dumps({"compared": pair[1], "reference": pair[0], "checkpoint": cmp}) + "\n")


def identical(cmp: dict) -> bool:
    """Whether a :func:`compare_checkpoints` result is two checkpoints with the same tensors, all equal."""
    return cmp["common"] == cmp["keys_a"] == cmp["keys_b"] == cmp["equal"]


def checkpoint_groups(rows: list[dict], work: Path, reference: dict,
                      done: dict[tuple[str, str], dict] | None = None) -> list[list[str]]:
    """The finished runs grouped by identical checkpoints, the reference's group first (``_groups.py``:
    stock's own runs can disagree on CUDA, so a comparison with the reference alone cannot tell a run that
    differs from stock from a reference that differs from the other stock runs). Comparisons in ``done``
    are reused and new ones added to it (with the reference first, a call whose runs all agree needs none)."""
    from _groups import group_identical

    done = done if done is not None else {}

    def compare(a: str, b: str) -> bool:
        done[(a, b)] = cmp = compare_checkpoints(work / f"{a}.out", work / f"{b}.out")
        return identical(cmp)

    names = [r["run"] for r in [reference, *(r for r in rows if r is not reference)] if "error" not in r]
    groups, _ = group_identical(names, {pair: identical(cmp) for pair, cmp in done.items()}, compare)
    return groups


def groups_markdown(groups: list[list[str]]) -> str:
    """One line naming the runs whose checkpoints are identical, group by group."""
    return "\n\nIdentical checkpoints (every tensor equal): " + " | ".join("{" + ", ".join(g) + "}" for g in groups)


def _compare_rows(rows: list[dict], work: Path, base: dict, key: str, label: str,
                  done: dict[tuple[str, str], dict] | None = None) -> None:
    """Checkpoint and logits of every other row against ``base``'s, into ``row[key]`` and ``row[label]``
    (checkpoint comparisons already in ``done`` are taken from there, new ones are added to it)."""
    import torch as _torch

    base_logits = work / f"{base['run']}.logits.pt"
    for r in rows:
        if r is base or "error" in r:
            continue
        pair = (base["run"], r["run"])
        cmp = (done or {}).get(pair) or compare_checkpoints(work / f"{pair[0]}.out", work / f"{pair[1]}.out")
        if done is not None:
            done[pair] = cmp
        same = identical(cmp)
        mine = work / f"{r['run']}.logits.pt"
        logits = None
        if base_logits.exists() and mine.exists():
            logits = f"{(_torch.load(mine) - _torch.load(base_logits)).abs().max().item():.3g}"
        r[key] = {**cmp, "logits_max_diff": logits}
        r[label] = "yes" if same else f"{cmp['equal']}/{cmp['keys_a']} tensors, {cmp['qweights_equal']}/{cmp['qweights']} qweights, " \
                                      f"max scale diff {cmp['max_scale_diff']:.3g}, logits {logits}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker(args)
    if args.warm_extension:  # a child of the parent's warm-up (_parallel_warm.py)
        from _parallel_warm import report

        return report(WARMERS[args.warm_extension]())
    import shutil
    import tempfile

    import torch

    variants = [v for v in args.variants.split(",") if v]
    try:
        unknown = {v for v in variants if split_variant(v)[0] not in VARIANTS}
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {VARIANTS} (each may take +si<N>/+cpuw<N>/+cudaw<N>/+pin1/+wt<N>...)")
    parsed = {v: split_variant(v) for v in variants}
    unwritten = [v for v, (base, modifiers) in parsed.items()
                 if "wt" in modifiers and (is_stock(base) or base.endswith("-stocksave"))]
    if unwritten:
        raise SystemExit(f"variants {unwritten}: +wt<threads> sets the plugin's shard writer, which a stock run and "
                         "-stocksave do not use; put it on another ours variant")
    if len(set(variants)) != len(variants):
        raise SystemExit(f"--variants names a variant twice: {args.variants} (their files would collide; "
                         "--repeat N runs the list again)")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but CUDA is not available (use --device cpu --tiny)")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="gptqmodel_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        return _call(args, variants, work, argv)
    finally:  # also on Ctrl-C or a failure: a scratch folder of its own holds every run's checkpoint
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


def _call(args: argparse.Namespace, variants: list[str], work: Path, argv: list[str] | None) -> int:
    """The call's runs in ``work``: the source model, the variants, the comparisons and the JSON."""
    import shutil

    import torch

    from _parallel_warm import timed_wait, warming  # beside this script, on sys.path when it runs
    from _report import write_gzipped

    # the extensions build in child processes of their own while this one builds the source model
    names = [n for n in WARMERS if n != "rowpack"] if args.device == "cuda" else ["pack"]  # no CUDA ones on the CPU
    if any("-rowpack" in v for v in variants):
        names.append("rowpack")
    with warming(Path(__file__).resolve(), names, _env(args.device)) as wait:
        t0 = time.perf_counter()
        calibration = build_source(args, work / "src")
        (work / "calibration.json").write_text(json.dumps(calibration))
        build_s = time.perf_counter() - t0
        print(f"built source model in {build_s:.1f}s under {work}", flush=True)
        warmed, waited_s = timed_wait(wait)
    jit_s, jit_ok = warmed.get("gptq", (None, None))
    rows_s, rows_ok = warmed.get("rows", (None, None))
    pack_s, pack_ok = warmed["pack"]
    row_pack_s, row_pack_ok = warmed.get("rowpack", (None, None))
    slots = 1 if args.device == "cpu" else max(1, min(args.gpus or torch.cuda.device_count(), len(variants)))
    if args.gpu_counts:
        if max(args.gpu_counts) > torch.cuda.device_count():
            raise SystemExit(f"--gpu-counts {args.gpu_counts} but only {torch.cuda.device_count()} GPU(s) are visible")
        slots = 1
    out = args.output or HERE / "results" / f"gptqmodel_{args.device}{'_tiny' if args.tiny else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.stem + ".partial.jsonl")
    partial.write_text(json.dumps({"command": "python benchmarks/gptqmodel_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])}) + "\n")
    warmup = None
    if args.warmup:
        # Triton compiles GPTQModel's packing/inference kernels on first use and caches them on
        # disk; an untimed run first keeps that compilation out of whichever variant runs first.
        t_w = time.perf_counter()
        first = run_variant(variants[0], args, work)
        shutil.rmtree(work / f"{variants[0]}.out", ignore_errors=True)
        for leftover in work.glob(f"{variants[0]}.*"):
            if leftover.is_file():
                leftover.unlink()
        warmup = {"variant": variants[0], "seconds": round(time.perf_counter() - t_w, 2), "error": first.get("error"),
                  "triton_compiles": first.get("triton_compiles")}
        print(f"warm-up run of {variants[0]}: {warmup}", flush=True)
    early = EarlyComparisons(work, partial) if slots == 1 and not args.gpu_counts else None
    if args.gpu_counts:
        rows = run_scaling(variants, args, work, partial)
    else:
        rows = run_variants(runs_of(variants, args.repeat), args, work, slots, partial, finished=early)
    skipped = [r["run"] for r in rows if "skipped" in r]
    rows = [r for r in rows if "skipped" not in r]
    for r in rows:
        r.setdefault("run", r["variant"])
    stock = checkpoint_reference(rows)
    if stock is not None:
        # every comparison made so far, so that the grouping below reads no checkpoint pair twice
        comparisons = dict(early.done) if early is not None else {}
        _compare_rows(rows, work, stock, "checkpoint_vs_stock", "same_ckpt_as_stock", done=comparisons)
        for r in rows:
            cmp = r.get("checkpoint_vs_stock")
            if cmp:
                r["same_ckpt_as_stock"] = r["same_ckpt_as_stock"] if r["same_ckpt_as_stock"] == "yes" else f"{cmp['equal']}/{cmp['keys_a']}"
                r["qweights_equal"] = f"{cmp['qweights_equal']}/{cmp['qweights']}"
                r["max_scale_diff"] = f"{cmp['max_scale_diff']:.3g}"
                r["logits_vs_stock"] = cmp["logits_max_diff"] or "-"
        compare_hessian_prints(rows, stock)
        groups = checkpoint_groups(rows, work, stock, done=comparisons)
    else:
        groups = None
    refused = None
    if args.device == "cuda":
        fell_back = [f"{r['run']}: {r['fallback']}" for r in rows if r.get("fallback")]
        if fell_back and not args.allow_fallback:
            refused = "GPTQModel fell back to a slower path, so these timings are not comparable: " + "; ".join(fell_back) + \
                      ". Fix the build (see docs/performance.md) or pass --allow-fallback to report it as such."
    from _host_load import host_markdown  # beside this script, on sys.path when it runs

    ratios = ratios_vs_stock(rows)
    table = markdown(rows) + ratios_markdown(ratios) + (groups_markdown(groups) if groups else "") + host_markdown(rows)
    print(table)
    meta = {
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "worker"},
        "build_source_s": round(build_s, 2),
        "gptq_extension_warmup_s": jit_s,
        "gptq_extension_available": jit_ok,
        "rows_kernel_warmup_s": rows_s,
        "rows_kernel_available": rows_ok,
        "pack_extension_warmup_s": pack_s,
        "pack_extension_available": pack_ok,
        "row_pack_kernel_warmup_s": row_pack_s,
        "row_pack_kernel_available": row_pack_ok,
        "extensions_built_beside_source": names,
        "extensions_waited_s": waited_s,
        "warmup": warmup,
        "concurrent_variants": slots,
        "checkpoint_reference": stock["run"] if stock is not None else None,
        "checkpoint_groups": groups,  # runs with identical checkpoints, the reference's group first
        "early_comparisons": len(early.done) if early is not None else None,  # made as the runs finished
        "platform": platform.platform(),
        # the cores this process may run on: lean_bookkeeping's defaults depend on them (overhead.default_parts)
        "cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
        "gpus_visible": torch.cuda.device_count() if args.device == "cuda" else 0,
    }
    command = "python benchmarks/gptqmodel_gpu.py " + " ".join(argv if argv is not None else sys.argv[1:])
    payload = {"meta": {**meta, "command": command}, "rows": rows, "ratios_vs_stock": ratios, "markdown": table}
    if refused:
        payload["refused"] = refused
    if args.deadline is not None:
        payload["skipped"] = skipped
    out.write_text(json.dumps(payload, indent=1) + "\n")
    for r in rows:  # --timeline: every span of each run, kept beside the JSON; +gil1: py-spy's stacks too
        spans = work / f"{r['run']}.timeline.jsonl"
        if spans.exists():
            shutil.copyfile(spans, timeline_path(out, r["run"]))
        for stacks in sorted((work / f"{r['run']}.gil").glob("*.gil.txt")):
            write_gzipped(stacks, gil_stacks_path(out, stacks.name))
    partial.unlink(missing_ok=True)
    if skipped:
        print(f"skipped by the {args.deadline:.0f} s deadline: {', '.join(skipped)}")
    print(f"wrote {out}")
    if refused:
        print(f"REFUSED: {refused}", file=sys.stderr)
        return 3
    return 0 if all("error" not in r for r in rows) else 1


# ----- worker: one variant in its own process ------------------------------------------------
def set_cuda_workers(count: int) -> None:
    """GPTQModel's device pool, when it is built, gets ``count`` workers per CUDA device (7.6 hard-codes
    ``"cuda:per": 4`` in ``gptqmodel._build_device_thread_pool``); refused once the pool exists."""
    import gptqmodel

    if gptqmodel._DEVICE_THREAD_POOL is not None:
        raise SystemExit("+cudaw: GPTQModel's device pool is already built; the modifier must act before it")
    base = gptqmodel.DeviceThreadPool

    class CudaWorkers(base):
        def __init__(self, *a, workers: dict | None = None, **kw):
            super().__init__(*a, workers={**(workers or {}), "cuda:per": count}, **kw)

    gptqmodel.DeviceThreadPool = CudaWorkers


def cuda_workers() -> dict[str, int] | None:
    """Workers per CUDA device of GPTQModel's built device pool (what ran), None when not built."""
    import gptqmodel

    pool = gptqmodel._DEVICE_THREAD_POOL
    if pool is None:
        return None
    return {k: len(g) for k, g in pool._worker_groups.items() if k.startswith("cuda")}


def worker(args: argparse.Namespace) -> int:
    import resource

    import torch

    name, work = args.worker, args.workdir
    run_id = args.run_id or name
    variant, modifiers = split_variant(name)
    if "si" in modifiers:
        sys.setswitchinterval(modifiers["si"] / 1e6)
    cuda = args.device == "cuda" and torch.cuda.is_available()
    t_import = time.perf_counter()
    from gptqmodel import BACKEND, GPTQModel, QuantizeConfig
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    if "cudaw" in modifiers:
        set_cuda_workers(modifiers["cudaw"])
    backend = BACKEND(args.backend)
    map_source_checkout()
    from _triton_compiles import TritonCompiles

    from defuser_quant.calibration.grouped import deterministic_mode
    from defuser_quant.integrations.gptqmodel.kernels import quant_linear_classes, record_gptq_kernels

    if "pin" in modifiers:
        from defuser_quant.integrations.gptqmodel import layer_reads

        layer_reads.PIN = True
    if not is_stock(variant):
        from defuser_quant.integrations.gptqmodel import install, quantize_with_defuser

        install(fast_save=not variant.endswith("-stocksave"), write_threads=modifiers.get("wt", 1))
    import_s = time.perf_counter() - t_import
    calibration = json.loads((work / "calibration.json").read_text())
    devices = torch.cuda.device_count() if cuda else 0
    if devices:
        torch.cuda.init()  # the allocator's stats raise "Invalid device argument" before CUDA is initialised
    for index in range(devices):
        torch.cuda.reset_peak_memory_stats(index)
    compiles = TritonCompiles.start()  # the timed load + quantize + save; its cache scans outside it
    t0 = time.perf_counter()
    offload = {"offload_to_disk": False} if "nooff" in modifiers else {}
    model = GPTQModel.load(str(work / "src"), QuantizeConfig(bits=4, group_size=128, **offload))
    t1 = time.perf_counter()
    extra: dict = {}
    from _gil_probe import GilProbe
    from _profile import maybe_profile

    probe = GilProbe() if args.gil_probe else None
    from _hessian_prints import HessianPrints

    prints = HessianPrints() if args.hessian_prints else contextlib.nullcontext()
    from _timeline import Timeline

    timeline = Timeline() if args.timeline else None
    from defuser_quant.integrations.gptqmodel.gc_freeze import frozen_heap

    # +gcfreeze1: the model and everything loaded so far left out of full collections, as the gc_freeze part does
    frozen = frozen_heap() if "gcfreeze" in modifiers else contextlib.nullcontext()
    with frozen as freeze, maybe_profile(f"gptqmodel-{run_id}") as sampler, record_gptq_kernels(stages=args.stages, model=model.model) as kernels, \
            deterministic_mode(args.deterministic), probe or contextlib.nullcontext(), prints, \
            timeline or contextlib.nullcontext():
        if is_stock(variant):
            log = model.quantize(calibration, batch_size=args.batch_size, backend=backend)
        else:
            routing = "all" if variant.startswith("ours-all") else "routed"
            batched = solve_setting(variant)
            if timeline is not None:  # the plugin's set-up before GPTQModel's quantize, a phase of the start's gap
                timeline.time_until_called(model, "quantize", SET_UP_PHASE)
            result = quantize_with_defuser(model, calibration, routing=routing, policy="warn", batch_size=args.batch_size,
                                           backend=backend, coverage_report=work / f"{run_id}.coverage.json",
                                           grouped="-grouped" in variant, batched_solve=batched,
                                           lean_bookkeeping=bookkeeping_setting(variant),
                                           batched_hessians=not variant.endswith("-hookhessians"))
            log = result.log
            extra["solve"] = result.solve.as_dict() if result.solve is not None else None
            extra["bookkeeping"] = result.bookkeeping.as_dict() if result.bookkeeping is not None else None
            extra["hessians"] = result.hessians.as_dict() if result.hessians is not None else None
            extra["coverage_totals"] = result.coverage.totals.model_dump()
        if sampler is not None:  # DQ_SAMPLE_DIR: the tail after the last GPTQ solve also reported alone
            sampler.since = kernels.last_solve_at
    t2 = time.perf_counter()
    if getattr(sampler, "summary", None) is not None:  # DQ_GIL_DIR: the interpreter lock's holders, sampled by py-spy
        extra["gil_sample"] = sampler.summary
    if freeze is not None:
        extra["gc_freeze"] = freeze.as_dict()
    if probe is not None:
        extra["gil_probe"] = probe.summary()
        if timeline is not None:  # each long wait for the interpreter lock, where it happened in the run
            for a, b in probe.stalls:
                timeline.add_span("gil_stall", f"{(b - a) * 1e3:.0f} ms", "DQGilProbe", a, b)
    if timeline is not None:
        extra["timeline"] = timeline.summary()
        timeline.write(work / f"{run_id}.timeline.jsonl")
    if args.hessian_prints:
        extra["hessian_prints"] = prints.digests
        extra["weight_prints"] = prints.weights
        extra["inverse_prints"] = prints.inverses
        extra["inverse_modules"] = prints.inverse_modules
    tail = kernels.seconds_after_last_solve(t2)
    extra["tail_s"] = None if tail is None else round(tail, 2)
    extra["regions"] = region_totals(model)
    extra["kernels"] = kernels.as_dict()
    extra["kernels_label"] = kernels.label()
    extra["fallback"] = kernels.fallback_reason() if cuda else None
    extra["quant_linear_after_quantize"] = quant_linear_classes(model.model)
    expert = re.compile(r"\.experts\.\d+\.")
    projections = [m for n, m in model.model.named_modules() if expert.search(f"{n}.") and n.rsplit(".", 1)[-1].endswith("proj")]
    quantized = sum(isinstance(m, BaseQuantLinear) for m in projections)
    samples = [int(r["samples"]) for rows in (log or {}).values() for r in rows if ".experts." in str(r.get("module")) and str(r.get("samples", "")).isdigit()]
    with maybe_profile(f"gptqmodel-{run_id}-save") as save_sampler:
        model.save(str(work / f"{run_id}.out"))
    if getattr(save_sampler, "summary", None) is not None:
        extra["gil_sample_save"] = save_sampler.summary
    t3 = time.perf_counter()
    if extra.get("bookkeeping") and result.bookkeeping.gc_freeze is not None:  # the save's frozen collections too
        extra["bookkeeping"]["gc_freeze"] = result.bookkeeping.gc_freeze.as_dict()
    if not is_stock(variant):
        from defuser_quant.integrations.gptqmodel import last_save

        extra["save_path"] = last_save()  # mapped source weights and bytes by how written (None: GPTQModel's own)
    compiles.stop()
    peaks = [torch.cuda.max_memory_allocated(index) for index in range(devices)]
    peak_gpu = max(peaks) if peaks else None
    if args.stages:
        extra["stages"] = stage_breakdown(extra["kernels"], t2 - t1, t3 - t2)
    reload_s = None
    if not args.no_reload:
        del model
        reload_compiles = TritonCompiles.start()
        t4 = time.perf_counter()
        device = "cuda:0" if cuda else "cpu"
        reloaded = GPTQModel.load(str(work / f"{run_id}.out"), device=device, backend=backend)
        extra["quant_linear_after_reload"] = quant_linear_classes(reloaded.model)
        ids = torch.tensor([calibration[0]["input_ids"][:64]], device=device)
        with torch.inference_mode():
            logits = reloaded.model(input_ids=ids).logits.float().cpu()
        torch.save(logits, work / f"{run_id}.logits.pt")
        reload_s = time.perf_counter() - t4
        extra["triton_compiles_reload"] = reload_compiles.stop()
    out = {
        "variant": name,
        "run": run_id,
        "modifiers": {"switch_interval_s": sys.getswitchinterval(),
                      "gptqmodel_cpu_workers": os.environ.get("GPTQMODEL_CPU_WORKERS"),
                      "gptqmodel_cuda_workers": cuda_workers(),
                      "offload_to_disk": "nooff" not in modifiers,
                      "gc_freeze": "gcfreeze" in modifiers,
                      "write_threads": modifiers.get("wt", 1),
                      "gil_sampled": "gil" in modifiers} if modifiers else None,
        "gpus_visible": devices,
        "backend": args.backend,
        "import_s": round(import_s, 2),
        "load_s": round(t1 - t0, 2),
        "quantize_s": round(t2 - t1, 2),
        "save_s": round(t3 - t2, 2),
        "total_s": round(t3 - t0, 2),
        "reload_logits_s": None if reload_s is None else round(reload_s, 2),
        "peak_gpu_bytes": peak_gpu,
        "peak_gpu_bytes_per_device": peaks or None,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "expert_projections": len(projections),
        "experts_quantized": quantized,
        "min_expert_samples": min(samples) if samples else None,
        "triton_compiles": compiles.kernels,
        "checkpoint_bytes": sum(f.stat().st_size for f in (work / f"{run_id}.out").glob("*.safetensors")),
        **extra,
    }
    (work / f"{run_id}.json").write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
