"""Cheaper GPTQModel per-module host bookkeeping for defused expert projections.

GPTQModel 7.6 does a few things once per quantized module whose cost grows with the size of the
model, not of the module. With a few hundred expert projections per layer they dominate a run
(two Qwen3-30B-A3B layers: 776 modules). Inside :func:`lean_bookkeeping` (entered by
``quantize_with_defuser``; everything restored on exit, also on an exception or Ctrl-C), for the
expert projections of our ``DefusedExperts`` blocks only:

* **materialize** (``BaseQModel.shell_module_materialize``, role ``forward``, from the lazy
  checkpoint source ``LazyTurtle``): GPTQModel finds the module's path with a scan of
  ``model.named_modules()`` twice per module (``_get_qualified_name``). Here the path GPTQModel
  already knows (``NamedModule.full_name``) is handed over, after checking that it names exactly
  that module. ``tie_weights()`` of the whole model after each module is skipped when the model
  has no tied weights at all (the tying mapping is empty: the call would do nothing), and the
  one-module "Loading checkpoint tensors" progress bar is not drawn.
* **offload** (``offload_to_disk`` of each finalized module): the module's path comes from the
  quantized module's own ``name`` (its full path) after the same identity check, instead of a
  ``named_modules()`` scan. The bundle written to disk is GPTQModel's, unchanged.
* **progress** (LogBar, GPTQModel's progress/log renderer, for every row and bar): each render
  asks ``_running_in_notebook_environment()``, which tries ``from IPython import get_ipython``;
  without IPython installed that failed import searches ``sys.path`` again every time (tens of
  thousands of ``stat`` calls per run). When IPython is not installed, the answer is computed once
  per value of the environment variables it reads and reused: the same answer, nothing drawn
  differently.
* **draw rate** (LogBar's ``ProgressBar.draw``, called for every module and checkpoint tensor:
  layer loads tick a bar per tensor, the finalize loop per module): each call renders the whole
  bar stack, about a millisecond of the host. A bar now renders at most once per
  :data:`DRAW_INTERVAL` (0.1 s, tqdm's default); a draw asked sooner after its last render is
  dropped and the next render (or LogBar's background refresh) shows the newer state. The first
  draw of a bar and forced draws always render. The same bars and texts, fewer frames.
* **line redraw** (LogBar's redraw of the progress-bar stack after every log line; GPTQModel logs every
  module's record once more at the end of ``quantize()``): after a line the stack is drawn again at most
  once per :data:`DRAW_INTERVAL`, and at the latest that long after the last line (:mod:`.line_redraw`).
  The same lines in the same order, fewer frames of the bars.
* **headless** (LogBar's ``terminal._is_headless_environment``, asked on every render): it scans
  every environment variable name for agent/CI prefixes each time (hundreds of thousands of
  generator steps per run). Its answer is kept per ``notebook`` flag while the environment
  (compared as a whole, ``os.environ``'s own dict), ``sys.argv[0]`` and the LogBar globals it reads
  are the same; any change asks LogBar again.
* **checkpoint index** (``LazyTurtle``'s per-module checkpoint lookups): loading one module's
  tensors scans the whole checkpoint weight map (every tensor name of the model) twice, once to
  resolve the module's checkpoint path and once to collect its direct tensors. A one-pass index of
  the weight map (tensor-name prefixes; direct tensors per module, in weight-map order) answers
  both; the same tensors are read from the same shards in the same order. Only where GPTQModel's
  functions are exactly the 7.6 source this was checked against (else stock, with a warning).
* **shard handles** (``safe_open`` of a checkpoint shard, inside the lean materialize of an expert
  projection): GPTQModel opens the module's shard twice per module (the forward check's tensors, then
  the copy into the module), and every open parses the whole shard header. Here the opened shards
  are kept (see :class:`_ShardHandles`) and a read is served by a kept handle that has never handed
  out that tensor name: ``get_tensor`` returns a view of the handle's private (copy-on-write) file
  mapping, so a tensor read twice from one handle would share memory and see writes made through
  the first copy; a handle that serves each name at most once gives what a fresh open gives. A
  shard whose ``os.stat`` (device, inode, size, mtime) changed is opened again; anything but
  ``get_tensor`` on the handle goes to a freshly opened one. At most two shards (two handles each)
  are kept; all are closed when the block ends (also on an exception or Ctrl-C). Kept handles keep
  their touched pages mapped (the page cache's pages: counted in RSS, not allocated again) until
  their shard is left or the block ends.

* **recopy** (the forward preparation of an expert projection, ``role="forward"``): GPTQModel has
  just copied the whole layer from the checkpoint, experts included, and copies each module's
  tensors again before its subset's forward replay. When that module's tensors are still the ones
  the layer load put there (same objects, address, dtype, shape, device), the second copy is
  skipped: it would write the same bytes. Plain GPTQ configs only (:mod:`.recopy`).

* **layer reads** (the layer load of a layer holding our experts, to CUDA): the layer's checkpoint
  tensors were read into host memory on background threads while the previous layer was
  quantized, and the load copies from there instead of faulting in the shard's file mapping
  (:mod:`.layer_reads`); the same bytes, dtypes and shapes.

* **layer offload** (``BaseQModel.post_quantize`` of a layer holding our experts, on CUDA): the
  quantized layer goes back to the CPU through two reused pinned staging buffers, a few large
  copies instead of one synchronous pageable copy per tensor (:mod:`.layer_offload`); the same CPU
  tensors ``module.to("cpu")`` gives.

* **layer onload** (``BaseQModel.pre_quantize``'s move of a layer holding our experts from the CPU to
  a CUDA quantize device: layer 0, loaded on the CPU for the input capture): the same two pinned
  staging buffers the other way, a few large copies instead of one pageable copy per tensor
  (:mod:`.layer_offload`); the same device tensors ``module.to`` gives.

* **layer ahead** (opt-in, :data:`OPT_IN`; ``BaseQModel.pre_quantize`` of the next lazy layer holding our
  experts, to CUDA): once the current layer's last subset forward has run, a background thread makes
  GPTQModel's own ``pre_quantize`` call for the next layer while the current one finishes; GPTQModel's call
  later waits for it and finds the layer loaded (:mod:`.layer_ahead`); the same tensors, copied earlier.

* **offload bundle** (``offload_to_disk`` of the finalized expert projections, with GPTQModel's
  ``offload_to_disk`` config on): one safetensors bundle and one ``index.json`` per experts block
  instead of a folder per module, read back by GPTQModel's save through its parents' lookup
  (:mod:`.offload_bundle`); the same tensors in the checkpoint.

* **keep last block** (with the offload bundle): the last experts block to complete is not written
  to the offload folder at all; its quantized modules stay in host memory, where GPTQModel's save
  takes them (:mod:`.offload_bundle`); the same tensors in the checkpoint, one layer's quantized
  experts more in host memory until the save.

* **gc freeze** (the interpreter's full garbage collections): the objects alive when the run starts (the model,
  the libraries) are left out of full collections until it ends (``gc.freeze()`` / ``gc.unfreeze()``), so the
  couple of full collections a run triggers walk only what the run allocated; the model's later saves through the
  plugin run the same way (:mod:`.gc_freeze`); nothing is computed differently.

* **disk probe** (GPTQModel's disk write-speed probe, ``io_write_performance``, which writes and fsyncs 100 MB once a
  process only to log the throughput): it runs on a background thread from the block's start instead of inside
  ``ModuleLooper.__init__`` before the first layer, and its figure is logged when it finishes
  (:mod:`.disk_probe`); nothing computed or written changes.

* **rehome** (``ForwardExecutor.run_single``'s ``rehome_module_to_device`` of the layer before every calibration
  batch, which walks the layer's ~525 modules three times): for a layer holding our experts, one walk checks that
  GPTQModel's call would move and retarget nothing (every tensor already on the device, no accelerate hook) and
  then the call returns; anything else runs GPTQModel's function (:mod:`.rehome`). Nothing moves differently.

* **base in memory** (``ModuleLooper.loop``'s offload of the base modules after the input capture, with GPTQModel's
  ``offload_to_disk`` config on): the embedding, final norm and rotary embedding are not written to the offload folder
  (for Qwen3-30B-A3B the 622 MB embedding); they stay as the capture loaded them (views of the source checkpoint's
  file where its dtype is the model's), where the save takes them (:mod:`.base_in_memory`); the same checkpoint, the
  save copying the same bytes from the source file.

* **capture lazy** (opt-in, :data:`OPT_IN`; the input capture's load of the first decoder layer holding our experts):
  the layer stays lazy through the capture, which only hooks it, and ``pre_quantize`` loads it once, onto the quantize
  device, like every later layer, instead of into host memory first and then again to the device
  (:mod:`.capture_lazy`); the same checkpoint tensors in the layer. With ``layer_reads`` on too, that layer is read
  into host memory in the background from the block's start (``layer_reads.first``), so its load copies from there.

* **tail workers** (opt-in, :data:`OPT_IN`; GPTQModel's CPU worker group during the last layer): when the last decoder
  layer holding our experts starts, the group grows to the process's cores, so the run's last finalizes (packing)
  spread over them; the added workers stop at the block's end (:mod:`.tail_workers`). The same finalizes.

* **block finalize** (on by default where the process has 16 cores or more, :data:`MANY_CORE_PARTS`; GPTQModel's
  per-module finalize of our expert projections): the first
  finalize task of a layer's projections of one role in one experts block finalizes its own module with GPTQModel's
  function, checks that its tensor step reproduces that module's buffers, then makes every other member itself
  (GPTQModel's ``create_quant_module``, ``pack_block``'s buffers, the pack extension on a pool of threads), while the
  members' own tasks wait and return (:mod:`.block_finalize`). The same modules and buffers.

* **device words** (opt-in, :data:`OPT_IN`, with ``block_finalize``; ``BaseQModel.post_quantize`` of a layer holding
  our experts, on CUDA): before the layer leaves the GPU, each of its groups is packed there (``packing.pack_words``,
  the extension's float32 steps), and the members take those words instead of running the extension, where their
  finalize's inputs are the ones packed (the reference checks its group's words against GPTQModel's buffers first).

* **steal groups** (opt-in, :data:`OPT_IN`, with ``block_finalize``; GPTQModel's finalize tasks of a layer's expert
  projections): GPTQModel hands a layer's finalize tasks out in module order, so its groups (gate, up, down) are made
  one after another while the other workers wait in members' tasks. With this part a member's task whose group another
  worker has taken first takes every group of its layer that no task has reached yet (its first member the
  reference, GPTQModel's finalize of it checked as ever; what that finalize raises is raised by the reference's own
  task), then waits for its own module (:mod:`.block_finalize`). The same modules and buffers.

* **load priority** (opt-in, :data:`OPT_IN`, with ``block_finalize``; GPTQModel's load of a decoder layer holding our
  experts, ``_copy_checkpoint_tensors_into_submodule``): while it runs, the finalize tasks (before they start) and
  ``block_finalize``'s group workers and extension threads (before each member) wait instead of competing with the
  load's per-tensor calls for the interpreter lock; a wait ends after :data:`~.load_priority.MAX_WAIT` seconds at most (:mod:`.load_priority`). The same modules
  and buffers, made later.

* **load switch** (opt-in, :data:`OPT_IN`; GPTQModel's load of a decoder layer holding our experts,
  ``_copy_checkpoint_tensors_into_submodule``): while it runs, the interpreter's switch interval is
  :data:`~.load_switch.LOAD_SWITCH_INTERVAL` (0.5 ms) instead of Python's 5 ms, so the load's per-tensor torch calls get
  the interpreter lock back sooner from the finalize threads beside it; put back when the last load ends
  (:mod:`.load_switch`). Nothing waits, nothing is computed differently.

* **layer stage** (opt-in, :data:`OPT_IN`, with ``layer_reads``; GPTQModel's subset events and the load of the next
  decoder layer holding our experts): after a layer's last subset forward, the next layer's read-ahead pieces are
  copied to the device the layer was loaded to, on a background thread and a stream of their own, when the device
  has room; that layer's load then copies its tensors device to device from views of them (:mod:`.layer_stage`).
  With ``capture_lazy``, the first layer's read from the block's start is copied to the quantize device at once.
  The same bytes, dtypes and shapes; GPTQModel's own load.

* **solve warm-up** (GPTQModel's CUDA workers of the quantize device): each is handed one rehearsal of the steps a
  GPTQ solve runs before its Hessian inverse (quantizer parameters, dead columns, permutations) on small tensors,
  and the first one a call of the model's attention function and products of its projections' shapes, so those
  kernels' first use in the process comes while the inputs are captured instead of inside layer 0's first solves
  and forwards (:mod:`.solve_warmup`). Nothing it computes is kept.

* **worker warm-up** (GPTQModel's device pool): when the block is entered, each worker of the quantize
  device's CUDA group and of the CPU group is handed one empty task, so GPTQModel's per-worker
  linear-algebra warm-up runs while the inputs are captured instead of before the first subset's
  solves and the first finalizes (:mod:`.worker_warmup`).

With GPTQModel's own checkpointing (``quantize(..., checkpoint=...)``, which resumes from the
offload folder), the offload bundle, keep-last-block and base-in-memory parts stay stock.

GPTQModel computes and writes exactly what it does without this (same tensors loaded, same
checkpoint). Anything that does not match (another role, a module outside our blocks, a path
that names another module, no lazy source) takes GPTQModel's own path. Before patching, the
GPTQModel internals this relies on are checked (signatures and the globals the functions look
up); when they differ, a warning names what differs and that part stays stock.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import threading
import time
import types
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from defuser_quant.calibration.capture import defused_blocks
from defuser_quant.core.defused import DefusedExperts

from . import layer_reads as layer_reads_module
from .base_in_memory import BaseModuleStats, keep_base_modules
from .base_in_memory import internals_refusal as _base_in_memory_mismatch
from .block_finalize import BlockFinalizeStats, block_finalize
from .block_finalize import internals_refusal as _block_finalize_mismatch
from .capture_lazy import CaptureLazyStats, lazy_capture
from .capture_lazy import internals_refusal as _capture_lazy_mismatch
from .compat import all_code_names as _all_names
from .compat import code_names as _names
from .compat import parameter_names as _params
from .compat import patched, source_digest
from .disk_probe import DiskProbeStats, probe_behind
from .disk_probe import internals_refusal as _disk_probe_mismatch
from .gc_freeze import RunFreezeStats, freeze_saves_of, frozen_heap
from .load_priority import LoadPriority, LoadPriorityStats
from .load_switch import LoadSwitch, LoadSwitchStats
from .layer_ahead import LayerAhead, LayerAheadStats
from .layer_ahead import internals_refusal as _layer_ahead_mismatch
from .layer_ahead import subset_event_refusal
from .layer_offload import OffloadStats, Staging, lean_post_quantize, lean_pre_quantize
from .layer_reads import LayerLoadScope, LayerReads, LayerReadStats
from .layer_stage import LayerStage, LayerStageStats
from .line_redraw import LineRedrawStats, throttled_line_redraws
from .line_redraw import internals_refusal as _line_redraw_mismatch
from .offload_bundle import BundleStats, bundled_offload
from .recopy import Recopy, config_refusal, pre_quantize_refusal
from .recopy import internals_refusal as _recopy_mismatch
from .rehome import RehomeStats, lean_rehome
from .rehome import internals_refusal as _rehome_mismatch
from .shard_view import DelegatingShard
from .shard_view import file_id as _file_id
from .solve_warmup import SolveWarmupStats, rehearse_on_workers
from .solve_warmup import internals_refusal as _solve_warmup_mismatch
from .tail_workers import TailWorkerStats, cores, tail_workers
from .tail_workers import internals_refusal as _tail_workers_mismatch
from .worker_warmup import WarmupStats, cuda_key, warm_workers
from .worker_warmup import internals_refusal as _worker_warmup_mismatch

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_PARTS", "LOGBAR_PARTS", "MANY_CORE_PARTS", "OPT_IN", "PARTS", "BookkeepingStats", "default_parts",
           "expert_projection_paths", "internals_mismatch", "lean_bookkeeping", "lean_logbar", "logbar_mismatch"]


@dataclass
class BookkeepingStats:
    """What :func:`lean_bookkeeping` did in one run."""

    materialize_fast: int = 0
    offload_fast: int = 0
    tie_weights_skipped: int = 0
    headless_memo_hits: int = 0  # LogBar headless checks answered from the memo
    headless_memo_misses: int = 0  # ... asked of LogBar (first call, or the environment changed)
    checkpoint_path_indexed: int = 0  # LazyTurtle checkpoint-path resolutions answered by the index
    checkpoint_loads_indexed: int = 0  # LazyTurtle per-module tensor loads whose names came from the index
    shard_opens: int = 0  # checkpoint shards opened (and kept) by the shard-handle part
    shard_reads_kept: int = 0  # tensors read through a kept shard handle
    shard_reads_fresh: int = 0  # ... through the caller's own handle (no kept handle left for the name), as stock
    shard_closed: int = 0  # kept handles closed (on leaving a shard, a changed file, or the block's end)
    draws_rendered: int = 0  # LogBar progress-bar draws passed on (first, forced, or DRAW_INTERVAL after the last)
    draws_skipped: int = 0  # ... not rendered: the bar drew less than DRAW_INTERVAL ago
    recopy_recorded: int = 0  # expert projections a layer load filled (the recopy part)
    recopy_skipped: int = 0  # ... whose forward preparation skipped the second copy
    recopy_changed: int = 0  # ... copied again: a tensor was replaced or moved since the layer load
    recopy_copied: int = 0  # forward preparations copied as GPTQModel does: no layer load recorded first
    recopy_moved: int = 0  # records taken again after GPTQModel's pre_quantize moved their layer (layer 0)
    layer_offload: OffloadStats = field(default_factory=OffloadStats)  # the layer_offload part (post_quantize)
    layer_onload: OffloadStats = field(default_factory=OffloadStats)  # the layer_onload part (pre_quantize's move)
    layer_reads: LayerReadStats = field(default_factory=LayerReadStats)  # the layer_reads part (layer loads)
    layer_ahead: LayerAheadStats = field(default_factory=LayerAheadStats)  # the layer_ahead part (next layer's load)
    offload_bundle: BundleStats | None = None  # the offload_bundle part (None: not used)
    worker_warmup: WarmupStats | None = None  # the worker_warmup part (None: not used)
    line_redraw: LineRedrawStats | None = None  # the line_redraw part (None: not used)
    gc_freeze: RunFreezeStats | None = None  # the gc_freeze part (None: not used)
    disk_probe: DiskProbeStats | None = None  # the disk_probe part (None: not used)
    rehome: RehomeStats | None = None  # the rehome part (None: not used)
    capture_lazy: CaptureLazyStats | None = None  # the capture_lazy part (None: not used)
    base_in_memory: BaseModuleStats | None = None  # the base_in_memory part (None: not used)
    tail_workers: TailWorkerStats | None = None  # the tail_workers part (None: not used)
    solve_warmup: SolveWarmupStats | None = None  # the solve_warmup part (None: not used)
    block_finalize: BlockFinalizeStats | None = None  # the block_finalize part (None: not used)
    load_priority: LoadPriorityStats | None = None  # the load_priority part (None: not used)
    load_switch: LoadSwitchStats | None = None  # the load_switch part (None: not used)
    layer_stage: LayerStageStats | None = None  # the layer_stage part (None: not used)
    stock: Counter = field(default_factory=Counter)  # "materialize: <reason>" / "offload: <reason>" -> calls
    disabled: dict[str, str] = field(default_factory=dict)  # part -> why it stayed stock
    parts: list[str] = field(default_factory=list)  # the parts that ran (asked for, less the disabled ones), sorted

    def as_dict(self) -> dict[str, Any]:
        return {
            "materialize_fast": self.materialize_fast,
            "offload_fast": self.offload_fast,
            "tie_weights_skipped": self.tie_weights_skipped,
            "headless_memo_hits": self.headless_memo_hits,
            "headless_memo_misses": self.headless_memo_misses,
            "checkpoint_path_indexed": self.checkpoint_path_indexed,
            "checkpoint_loads_indexed": self.checkpoint_loads_indexed,
            "shard_opens": self.shard_opens,
            "shard_reads_kept": self.shard_reads_kept,
            "shard_reads_fresh": self.shard_reads_fresh,
            "shard_closed": self.shard_closed,
            "draws_rendered": self.draws_rendered,
            "draws_skipped": self.draws_skipped,
            "recopy_recorded": self.recopy_recorded,
            "recopy_skipped": self.recopy_skipped,
            "recopy_changed": self.recopy_changed,
            "recopy_copied": self.recopy_copied,
            "recopy_moved": self.recopy_moved,
            "layer_offload": asdict(self.layer_offload),
            "layer_onload": asdict(self.layer_onload),
            "layer_reads": asdict(self.layer_reads),
            "layer_ahead": self.layer_ahead.as_dict(),
            "offload_bundle": self.offload_bundle.as_dict() if self.offload_bundle is not None else None,
            "worker_warmup": self.worker_warmup.as_dict() if self.worker_warmup is not None else None,
            "line_redraw": self.line_redraw.as_dict() if self.line_redraw is not None else None,
            "gc_freeze": self.gc_freeze.as_dict() if self.gc_freeze is not None else None,
            "disk_probe": self.disk_probe.as_dict() if self.disk_probe is not None else None,
            "rehome": self.rehome.as_dict() if self.rehome is not None else None,
            "capture_lazy": self.capture_lazy.as_dict() if self.capture_lazy is not None else None,
            "base_in_memory": self.base_in_memory.as_dict() if self.base_in_memory is not None else None,
            "tail_workers": self.tail_workers.as_dict() if self.tail_workers is not None else None,
            "solve_warmup": self.solve_warmup.as_dict() if self.solve_warmup is not None else None,
            "block_finalize": self.block_finalize.as_dict() if self.block_finalize is not None else None,
            "load_priority": self.load_priority.as_dict() if self.load_priority is not None else None,
            "load_switch": self.load_switch.as_dict() if self.load_switch is not None else None,
            "layer_stage": self.layer_stage.as_dict() if self.layer_stage is not None else None,
            "stock": dict(self.stock),
            "disabled": dict(self.disabled),
            "parts": list(self.parts),
        }


def expert_projection_paths(model: nn.Module) -> frozenset[str]:
    """Full module paths of every expert projection of the ``DefusedExperts`` blocks of ``model``."""
    paths = set()
    for path, block in defused_blocks(model):
        for e, expert in enumerate(block):
            for name in expert.names.as_tuple():
                paths.add(f"{path}.{e}.{name}")
    return frozenset(paths)


# ----- what the patches rely on ----------------------------------------------------------------
#: sha256[:16] of the GPTQModel 7.6.0 sources the checkpoint index stands in for.
_CHECKPOINT_SOURCES = {
    "_resolve_checkpoint_module_path": "9324df07f071d073",
    "_runtime_to_checkpoint_alias_candidates": "0bbe8dbdd59a97c2",
    "_load_checkpoint_tensors_for_module_path": "c0ebd16528007333",
}
#: Everything LogBar 0.4's headless check (and the pytest check it calls) may look up.
_HEADLESS_NAMES = frozenset({"_HEADLESS_ENV_PREFIXES", "_HEADLESS_ENV_VARS", "_running_under_pytest", "any", "environ",
                             "get", "lower", "os", "startswith", "strip"})
_PYTEST_NAMES = frozenset({"_PYTEST_XDIST_WORKER", "argv", "environ", "lower", "os", "str", "sys"})


def _headless_mismatch() -> str | None:
    try:
        from logbar import terminal
    except ImportError:
        return "logbar.terminal is not importable"
    check = getattr(terminal, "_is_headless_environment", None)
    pytest_check = getattr(terminal, "_running_under_pytest", None)
    if check is None or pytest_check is None or not all(hasattr(terminal, g) for g in ("_HEADLESS_ENV_VARS", "_HEADLESS_ENV_PREFIXES", "_PYTEST_XDIST_WORKER")):
        return "logbar.terminal._is_headless_environment, _running_under_pytest or their globals are missing"
    if _params(check) != {"notebook"}:
        return "expected _is_headless_environment(*, notebook)"
    if not _all_names(check) <= _HEADLESS_NAMES or not _all_names(pytest_check) <= _PYTEST_NAMES:
        return "expected LogBar's headless check to read only os.environ, sys.argv and its own globals"
    if not isinstance(getattr(os.environ, "_data", None), dict):
        return "os.environ keeps no plain dict (_data) to compare"
    return None


def _checkpoint_mismatch() -> str | None:
    from gptqmodel.utils import structure

    turtle = getattr(structure, "LazyTurtle", None)
    if turtle is None or not hasattr(structure, "safe_open") or getattr(structure, "os", None) is not os:
        return "gptqmodel.utils.structure.LazyTurtle, safe_open or os is missing"
    differ = [name for name, digest in _CHECKPOINT_SOURCES.items()
              if source_digest(getattr(turtle, name, None) or (lambda: None)) != digest]
    if differ:
        return "LazyTurtle." + ", ".join(differ) + " differ from GPTQModel 7.6.0's source"
    return None


def _shard_handles_mismatch() -> str | None:
    from gptqmodel.utils import structure

    try:
        import safetensors
    except ImportError:
        return "safetensors is not importable"
    if getattr(structure, "safe_open", None) is not getattr(safetensors, "safe_open", None):
        return "gptqmodel.utils.structure.safe_open is not safetensors.safe_open"
    return None


def _post_quantize_mismatch() -> str | None:
    from gptqmodel.models.base import BaseQModel
    from gptqmodel.utils import model as model_utils

    post = getattr(BaseQModel, "post_quantize", None)
    if post is None or _params(post) != {"self", "module"}:
        return "expected BaseQModel.post_quantize(self, module)"
    if not {"move_to", "activation_mode"} <= _names(post) or not all(
            callable(getattr(model_utils, name, None)) for name in ("get_device", "_module_has_meta_tensors")):
        return ("expected post_quantize to call move_to (and read activation_mode), and utils.model.get_device "
                "and _module_has_meta_tensors")
    return None


def _offload_bundle_mismatch() -> str | None:
    """What the bundled offload relies on: finalize's ``offload_to_disk`` looked up in
    ``stage_layer``, and the save's lookup of a meta tensor in its parents' ``index.json``."""
    from gptqmodel.looper import stage_layer
    from gptqmodel.utils import model as model_utils

    offload = getattr(stage_layer, "offload_to_disk", None)
    if offload is None or not {"module", "model", "disk_path", "force"} <= _params(offload):
        return "expected gptqmodel.looper.stage_layer.offload_to_disk(module, model, disk_path, force)"
    search = getattr(model_utils, "_generate_offload_search_paths", None)
    keys = getattr(model_utils, "_generate_entry_keys", None)
    if search is None or keys is None:
        return "expected the save's offload lookup (_generate_offload_search_paths, _generate_entry_keys)"
    paths = search("root", "a.b.c")
    if os.path.join("root", "a.b") not in paths or "b.c.leaf" not in keys("a.b.c", "leaf"):
        return "the save's offload lookup does not search the parents' index.json by key suffix"
    return None


def internals_mismatch() -> dict[str, str]:
    """Part (``materialize``/``offload``/``progress``/``headless``/``checkpoint_index``/``shard_handles``/
    ``draw_rate``/``layer_offload``/``layer_onload``/``recopy``/``layer_reads``/``offload_bundle``/``worker_warmup``/
    ``line_redraw``/``layer_ahead``/``gc_freeze``/``disk_probe``/``rehome``/``capture_lazy``/``base_in_memory``/``tail_workers``/
    ``solve_warmup``/``block_finalize``) -> what differs
    from the GPTQModel 7.6 / LogBar 0.4 internals it patches."""
    from gptqmodel.models.base import BaseQModel
    from gptqmodel.utils import offload, structure

    problems: dict[str, str] = {}
    turtle = getattr(structure, "LazyTurtle", None)
    shell = getattr(BaseQModel, "shell_module_materialize", None)
    qualified = getattr(structure, "_get_qualified_name", None)
    if turtle is None or shell is None or qualified is None:
        problems["materialize"] = "LazyTurtle, BaseQModel.shell_module_materialize or structure._get_qualified_name is missing"
    else:
        need_shell = {"target_submodule", "device", "non_blocking", "role", "named_module", "module_path"}
        need_turtle = {"target_model", "target_submodule", "module_path", "tie_weights", "show_progress"}
        checks = [
            (need_shell <= _params(shell), f"shell_module_materialize parameters {sorted(need_shell)}"),
            ({"_turtle_lock", "turtle_materialize_tie_weights", "alias_from_turtle_for_submodule"} <= _names(shell),
             "shell_module_materialize uses _turtle_lock, turtle_materialize_tie_weights, alias_from_turtle_for_submodule"),
            (need_turtle <= _params(turtle.materialize_submodule), f"LazyTurtle.materialize_submodule parameters {sorted(need_turtle)}"),
            ({"_get_qualified_name", "tie_weights"} <= _names(turtle.materialize_submodule),
             "LazyTurtle.materialize_submodule looks up _get_qualified_name and calls tie_weights"),
            ("_get_qualified_name" in _names(getattr(turtle, "checkpoint_tensors_for_submodule", lambda: None)),
             "LazyTurtle.checkpoint_tensors_for_submodule looks up _get_qualified_name"),
            (_params(qualified) == {"root", "obj"}, "structure._get_qualified_name(root, obj)"),
        ]
        failed = [what for ok, what in checks if not ok]
        if failed:
            problems["materialize"] = "expected " + "; ".join(failed)
    fullname = getattr(offload, "get_module_fullname", None)
    impl = getattr(offload, "_offload_to_disk_impl", None)
    if fullname is None or impl is None:
        problems["offload"] = "gptqmodel.utils.offload.get_module_fullname or _offload_to_disk_impl is missing"
    elif _params(fullname) != {"model", "module"} or "get_module_fullname" not in _names(impl):
        problems["offload"] = "expected offload.get_module_fullname(model, module), looked up by _offload_to_disk_impl"
    if "materialize" in problems:
        problems["shard_handles"] = "needs the lean materialize, which is stock: " + problems["materialize"]
        problems["recopy"] = problems["shard_handles"]
    recopy, shard_handles = _recopy_mismatch(), _shard_handles_mismatch()  # layer_reads patches both seams
    block_finalize = _block_finalize_mismatch()  # device_words and steal_groups stand on the same reproduced finalize
    for part, why in (("layer_offload", _post_quantize_mismatch()),
                      ("layer_onload", pre_quantize_refusal()),  # the layer move it stages is 7.6's move_to branch
                      ("offload_bundle", _offload_bundle_mismatch()), ("worker_warmup", _worker_warmup_mismatch()),
                      ("line_redraw", _line_redraw_mismatch()), ("layer_ahead", _layer_ahead_mismatch()),
                      ("disk_probe", _disk_probe_mismatch()), ("rehome", _rehome_mismatch()),
                      ("capture_lazy", _capture_lazy_mismatch()), ("base_in_memory", _base_in_memory_mismatch()),
                      ("tail_workers", _tail_workers_mismatch()), ("solve_warmup", _solve_warmup_mismatch()),
                      ("block_finalize", block_finalize), ("device_words", block_finalize),
                      ("steal_groups", block_finalize), ("row_pack", block_finalize),
                      ("checkpoint_index", _checkpoint_mismatch()),
                      ("shard_handles", shard_handles), ("recopy", recopy), ("layer_reads", recopy or shard_handles),
                      ("layer_stage", subset_event_refusal())):
        if why is not None:
            problems[part] = why
    problems.update(logbar_mismatch())
    return problems


#: The parts of :func:`lean_logbar` that act on any LogBar bar (``line_redraw`` acts on log lines).
LOGBAR_PARTS = frozenset({"progress", "draw_rate", "headless"})


def logbar_mismatch() -> dict[str, str]:
    """Part of :data:`LOGBAR_PARTS` -> what differs from the LogBar 0.4 internals it patches."""
    problems: dict[str, str] = {}
    headless = _headless_mismatch()
    if headless is not None:
        problems["headless"] = headless
    try:
        from logbar import logbar as logbar_module
        from logbar import progress as logbar_progress
    except ImportError:
        problems["progress"] = problems["draw_rate"] = "logbar is not importable"
        return problems
    draw = getattr(getattr(logbar_progress, "ProgressBar", None), "draw", None)
    if draw is None or _params(draw) != {"self", "force"}:
        problems["draw_rate"] = "expected logbar.progress.ProgressBar.draw(self, force)"
    check = getattr(logbar_module, "_running_in_notebook_environment", None)
    if check is None or getattr(logbar_progress, "_running_in_notebook_environment", None) is not check or _params(check):
        problems["progress"] = "expected logbar.logbar._running_in_notebook_environment(), imported by logbar.progress"
    elif "IPython" not in _names(check):
        problems["progress"] = "expected logbar's notebook check to import IPython"
    return problems


#: Environment variables LogBar's notebook check reads (logbar 0.4).
_NOTEBOOK_ENV = ("LOGBAR_DISABLE_NOTEBOOK_DETECTION", "LOGBAR_FORCE_NOTEBOOK_MODE", "JPY_PARENT_PID", "IPYKERNEL_PARENT_PID")


def _ipython_missing() -> bool:
    import importlib.util
    import sys

    if "IPython" in sys.modules:
        return False
    try:
        return importlib.util.find_spec("IPython") is None
    except (ImportError, ValueError):
        return False


def _memo_notebook_check(original: Callable) -> Callable:
    """``original()`` once per value of the variables it reads (valid while IPython is not installed)."""
    import os

    answers: dict[tuple, bool] = {}

    @functools.wraps(original)
    def _running_in_notebook_environment() -> bool:
        key = tuple(os.environ.get(k) for k in _NOTEBOOK_ENV)
        answer = answers.get(key)
        if answer is None:
            answer = answers[key] = original()
        return answer

    return _running_in_notebook_environment


class _HeadlessMemo:
    """LogBar's ``_is_headless_environment`` answered once per ``notebook`` flag while everything it reads is
    unchanged: the whole environment (``os.environ``'s dict, compared in C), ``sys.argv[0]`` and the
    ``logbar.terminal`` globals it looks up. Anything changed: LogBar is asked again."""

    def __init__(self, original: Callable, terminal: types.ModuleType):
        self.original = original
        self.terminal = terminal
        self.lock = threading.Lock()
        self.hits = self.misses = 0
        self.state: tuple = (None, None, None, {})  # (objects, argv[0], environment copy, notebook -> answer)

    def _objects(self) -> tuple:
        t = self.terminal
        return (os.environ, t._running_under_pytest, t._HEADLESS_ENV_VARS, t._HEADLESS_ENV_PREFIXES, t._PYTEST_XDIST_WORKER)

    def __call__(self, *, notebook: bool = False) -> bool:
        objects, argv0, env, answers = self.state  # replaced whole, never edited but for answers
        now = self._objects()
        now_argv0 = sys.argv[0] if sys.argv else None
        data = getattr(os.environ, "_data", None)
        same = (objects is not None and all(a is b for a, b in zip(now, objects)) and now_argv0 == argv0
                and isinstance(data, dict) and data == env)
        if same and notebook in answers:
            with self.lock:
                self.hits += 1
            return answers[notebook]
        if not same:
            answers = {}
            self.state = (now, now_argv0, dict(data) if isinstance(data, dict) else None, answers)
        answer = answers[notebook] = self.original(notebook=notebook)
        with self.lock:
            self.misses += 1
        return answer


class _CheckpointIndex:
    """One pass over a ``LazyTurtle`` weight map: every tensor-name prefix that ends before a ``.`` (so
    "some tensor name starts with ``p.``" is ``p in prefixes``) and, per module path, its direct
    tensors (``(relative name, full name)``, in weight-map order)."""

    def __init__(self, weight_map: dict[str, str]):
        self.source = weight_map
        self.size = len(weight_map)
        self.prefixes: set[str] = set()
        self.direct: dict[str, list[tuple[str, str]]] = {}
        for full_name in weight_map:
            dot = full_name.find(".")
            while dot != -1:
                self.prefixes.add(full_name[:dot])
                dot = full_name.find(".", dot + 1)
            last = full_name.rfind(".")
            if last != -1 and last + 1 < len(full_name):
                self.direct.setdefault(full_name[:last], []).append((full_name[last + 1:], full_name))

    def current(self, weight_map: Any) -> bool:
        """Still an index of ``weight_map`` (the same dict, the same size; GPTQModel never edits it)."""
        return weight_map is self.source and len(weight_map) == self.size


class _KeptFile:
    """The kept handles of one shard, each with the tensor names it has handed out."""

    def __init__(self, file_id: tuple):
        self.file_id = file_id
        self.handles: list[tuple[Any, set[str]]] = []


class _ShardHandles:
    """Opened safetensors shards kept between ``safe_open`` calls (``framework="pt"``, ``device="cpu"``).

    ``get_tensor(name)`` hands out a view of the handle's private file mapping, so each kept handle
    serves a name at most once; a read no kept handle may serve is left to the caller's own handle.
    At most ``max_files`` shards (LRU) with ``per_file`` handles each. Every call holds ``lock``."""

    def __init__(self, opener: Callable, stats: BookkeepingStats, max_files: int = 2, per_file: int = 2):
        self.opener = opener
        self.stats = stats
        self.max_files = max_files
        self.per_file = per_file
        self.lock = threading.Lock()
        self.files: dict[str, _KeptFile] = {}  # path -> kept handles, least recently used first
        self.closed = False

    def _open(self, path: str, file_id: tuple) -> Any | None:
        """A new kept handle, or None when the file changed while it was opened."""
        handle = self.opener(path, framework="pt", device="cpu")
        if _file_id(path) != file_id:
            handle.__exit__(None, None, None)
            return None
        self.stats.shard_opens += 1
        return handle

    def _retire(self, path: str) -> None:
        kept = self.files.pop(path)
        for handle, _ in kept.handles:
            handle.__exit__(None, None, None)  # tensors already handed out keep their mapping alive
            self.stats.shard_closed += 1

    def enter(self, path: str) -> bool:
        """Make sure ``path`` has a kept handle for its current file (opening it raises as the stock
        open would); False when it cannot be kept (the pool is closed, or the file changed meanwhile)."""
        file_id = _file_id(path)
        with self.lock:
            if self.closed:
                return False
            kept = self.files.get(path)
            if kept is not None and kept.file_id != file_id:
                self._retire(path)
                kept = None
            if kept is None:
                handle = self._open(path, file_id)
                if handle is None:
                    return False
                kept = self.files[path] = _KeptFile(file_id)
                kept.handles.append((handle, set()))
                while len(self.files) > self.max_files:
                    self._retire(next(iter(self.files)))
            else:
                self.files[path] = self.files.pop(path)  # most recently used last
            return True

    def kept_tensor(self, path: str, name: str) -> tuple[bool, Any]:
        """``(True, tensor)`` read through a kept handle that had not handed out ``name``, else
        ``(False, None)``: the caller reads it through a handle of its own."""
        with self.lock:
            kept = self.files.get(path)
            if kept is not None and not self.closed:
                for handle, served in kept.handles:
                    if name not in served:
                        served.add(name)
                        self.stats.shard_reads_kept += 1
                        return True, handle.get_tensor(name)
                if len(kept.handles) < self.per_file:
                    handle = self._open(path, kept.file_id)
                    if handle is not None:
                        kept.handles.append((handle, {name}))
                        self.stats.shard_reads_kept += 1
                        return True, handle.get_tensor(name)
            self.stats.shard_reads_fresh += 1
            return False, None

    def close(self) -> None:
        with self.lock:
            self.closed = True
            for path in list(self.files):
                self._retire(path)


class _KeptShard(DelegatingShard):
    """What ``safe_open(path, framework="pt", device="cpu")`` returns inside a lean materialize:
    ``get_tensor`` through the kept handles; anything else (and a name no kept handle may serve) on a
    handle of its own, opened on first use and closed with this one, as GPTQModel's open would be."""

    def __init__(self, handles: _ShardHandles, path: str):
        super().__init__(handles.opener, path, lambda name: handles.kept_tensor(path, name))


# ----- the patches ---------------------------------------------------------------------------
class _Lean:
    """State shared by the patched functions of one :func:`lean_bookkeeping` block."""

    def __init__(self, gptq_model: Any, expert_paths: frozenset[str], skip_tie: bool, stats: BookkeepingStats):
        self.gptq_model = gptq_model
        self.model = gptq_model.model
        self.expert_paths = expert_paths
        self.skip_tie = skip_tie
        self.stats = stats
        self.lock = threading.Lock()
        self.local = threading.local()  # .hint: (root, target, path) while one materialize runs
        self.indexes: dict[int, _CheckpointIndex] = {}  # id(LazyTurtle) -> index of its weight map (checked on use)
        self.shards: _ShardHandles | None = None  # kept shard handles (the shard_handles part)

    def _stock(self, reason: str) -> None:
        with self.lock:
            self.stats.stock[reason] += 1

    def add(self, field_name: str, n: int) -> None:
        """Add ``n`` to the stats counter ``field_name``."""
        with self.lock:
            setattr(self.stats, field_name, getattr(self.stats, field_name) + n)

    def _resolves(self, path: str, module: nn.Module) -> bool:
        try:
            return self.model.get_submodule(path) is module
        except AttributeError:
            return False

    # BaseQModel.shell_module_materialize
    def materialize(self, original: Callable) -> Callable:
        from gptqmodel.utils.structure import LazyTurtle

        lean = self

        @functools.wraps(original)
        def shell_module_materialize(self, target_submodule, device, non_blocking=False, role="default",
                                     named_module=None, module_path=None):
            def stock(reason: str | None):
                if reason is not None:
                    lean._stock(f"materialize: {reason}")
                return original(self, target_submodule=target_submodule, device=device, non_blocking=non_blocking,
                                role=role, named_module=named_module, module_path=module_path)

            if self is not lean.gptq_model or role != "forward" or named_module is None:
                return stock(None)  # not an expert projection's forward preparation
            path = getattr(named_module, "full_name", None)
            if path not in lean.expert_paths:
                return stock(None)
            if not isinstance(self.turtle_model, LazyTurtle):
                return stock("no lazy checkpoint source")
            if module_path is not None and module_path != path:
                return stock("caller passed another module_path")
            if not lean._resolves(path, target_submodule):
                return stock("NamedModule.full_name does not name the module")
            with self._turtle_lock:  # GPTQModel's own (reentrant) lock: no other thread sees the hint
                lean.local.hint = (self.model, target_submodule, path)
                try:
                    result = original(self, target_submodule=target_submodule, device=device, non_blocking=non_blocking,
                                      role=role, named_module=named_module, module_path=path)
                finally:
                    lean.local.hint = None
            with lean.lock:
                lean.stats.materialize_fast += 1
            return result

        return shell_module_materialize

    # structure._get_qualified_name
    def qualified_name(self, original: Callable) -> Callable:
        lean = self

        @functools.wraps(original)
        def _get_qualified_name(root, obj):
            hint = getattr(lean.local, "hint", None)
            if hint is not None and hint[0] is root and hint[1] is obj:
                return hint[2]
            return original(root, obj)

        return _get_qualified_name

    # LazyTurtle.materialize_submodule
    def turtle_materialize(self, original: Callable) -> Callable:
        lean = self

        @functools.wraps(original)
        def materialize_submodule(self, *, target_model, target_submodule, **kwargs):
            hint = getattr(lean.local, "hint", None)
            if hint is not None and hint[0] is target_model and hint[1] is target_submodule:
                kwargs["show_progress"] = False  # a one-module bar, drawn and gone within milliseconds
                if lean.skip_tie and kwargs.get("tie_weights", True):
                    kwargs["tie_weights"] = False  # the model ties nothing: tie_weights() would do nothing
                    with lean.lock:
                        lean.stats.tie_weights_skipped += 1
            return original(self, target_model=target_model, target_submodule=target_submodule, **kwargs)

        return materialize_submodule

    # offload.get_module_fullname
    def module_fullname(self, original: Callable) -> Callable:
        lean = self

        @functools.wraps(original)
        def get_module_fullname(model, module):
            name = getattr(module, "name", None)
            if model is lean.model and isinstance(name, str) and name in lean.expert_paths and lean._resolves(name, module):
                with lean.lock:
                    lean.stats.offload_fast += 1
                return name
            return original(model, module)

        return get_module_fullname

    def _index(self, turtle: Any) -> _CheckpointIndex | None:
        weight_map = getattr(turtle, "_weight_map", None)
        if not isinstance(weight_map, dict):
            return None
        index = self.indexes.get(id(turtle))
        if index is None or not index.current(weight_map):
            index = _CheckpointIndex(weight_map)  # a rebuild by two threads at once builds the same index
            self.indexes[id(turtle)] = index
        return index

    # structure.safe_open
    def shard_open(self, original: Callable) -> Callable:
        """``safe_open`` that keeps shards open while this thread runs a lean materialize (under
        GPTQModel's ``_turtle_lock``); any other call, or other arguments: ``original``."""
        lean = self
        self.shards = _ShardHandles(original, self.stats)

        @functools.wraps(original)
        def safe_open(*args, **kwargs):
            if (getattr(lean.local, "hint", None) is not None and len(args) == 1 and isinstance(args[0], str)
                    and kwargs == {"framework": "pt", "device": "cpu"} and lean.shards.enter(args[0])):
                return _KeptShard(lean.shards, args[0])
            return original(*args, **kwargs)

        return safe_open

    # LazyTurtle._resolve_checkpoint_module_path
    def resolve_path(self, original: Callable) -> Callable:
        lean = self

        @functools.wraps(original)
        def _resolve_checkpoint_module_path(self, module_path):
            # GPTQModel tries the candidates of _runtime_to_checkpoint_alias_candidates(module_path) in
            # order, and that list starts with module_path itself: when a tensor name starts with
            # "module_path.", module_path is its answer.
            index = lean._index(self)
            if index is not None and isinstance(module_path, str) and module_path and module_path in index.prefixes:
                with lean.lock:
                    lean.stats.checkpoint_path_indexed += 1
                return module_path
            return original(self, module_path)

        return _resolve_checkpoint_module_path

    # LazyTurtle._load_checkpoint_tensors_for_module_path
    def load_tensors(self, original: Callable) -> Callable:
        from gptqmodel.utils import structure

        lean = self

        @functools.wraps(original)
        def _load_checkpoint_tensors_for_module_path(self, *, module_path, recurse):
            index = lean._index(self)
            if recurse or index is None:
                return original(self, module_path=module_path, recurse=recurse)
            resolved = self._resolve_checkpoint_module_path(module_path)
            by_shard: dict[str, list[tuple[str, str]]] = {}  # shards in first-seen order, as GPTQModel groups them
            for rel_name, full_name in index.direct.get(resolved, ()):
                by_shard.setdefault(self._weight_map[full_name], []).append((rel_name, full_name))
            tensors = {}
            for shard, names in by_shard.items():
                shard_path = structure.os.path.join(self.model_local_path, shard)
                with structure.safe_open(shard_path, framework="pt", device="cpu") as handler:
                    for rel_name, full_name in names:
                        tensors[rel_name] = handler.get_tensor(full_name)
            with lean.lock:
                lean.stats.checkpoint_loads_indexed += 1
            return tensors

        return _load_checkpoint_tensors_for_module_path


def _holds_experts(module: nn.Module) -> bool:
    return any(isinstance(m, DefusedExperts) for m in module.modules())


def _ties_nothing(model: nn.Module) -> bool:
    """True when ``model.tie_weights()`` has nothing to tie (Transformers 5: an empty tying mapping)."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    if expand is None:
        return False
    try:
        return not expand(all_submodels=True)
    except Exception:  # an unexpected model: keep GPTQModel's tie_weights()
        return False


#: Least seconds between two renders of one LogBar progress bar under the ``draw_rate`` part.
DRAW_INTERVAL = 0.1


def _rate_limited_draw(original: Callable, stats: BookkeepingStats, lock: threading.Lock, interval: float,
                       on_skip: Callable[[], None] | None = None) -> Callable:
    """``ProgressBar.draw`` that renders a bar at most once per ``interval`` seconds: a draw asked
    sooner after the bar's last render is dropped (the next render, or LogBar's background refresh,
    shows the newer state); the first draw and forced ones always render. ``on_skip``: called for a
    dropped draw (LogBar counts a throttled draw as progress activity)."""
    key = "_defuser_quant_last_draw"

    @functools.wraps(original)
    def draw(self, force: bool = False):
        now = time.monotonic()
        state = self.__dict__
        last = state.get(key)
        if not force and last is not None and now - last < interval:
            with lock:
                stats.draws_skipped += 1
            if on_skip is not None:
                on_skip()
            return None
        state[key] = now
        with lock:
            stats.draws_rendered += 1
        return original(self, force)

    return draw


#: Every part :func:`lean_bookkeeping` can patch.
PARTS = frozenset({"materialize", "offload", "progress", "headless", "checkpoint_index", "shard_handles", "draw_rate",
                   "layer_offload", "layer_onload", "recopy", "layer_reads", "offload_bundle", "keep_last_block",
                   "worker_warmup", "line_redraw", "layer_ahead", "gc_freeze", "disk_probe", "rehome", "capture_lazy",
                   "base_in_memory", "tail_workers", "solve_warmup", "block_finalize", "device_words", "steal_groups", "load_priority",
                   "load_switch", "layer_stage", "row_pack"})
#: Parts only used when named (``lean_bookkeeping=True`` leaves them out): ``layer_ahead`` measured without a
#: gain on an H200; ``gc_freeze`` moved the run's full collection into what came after it (the save; round 35, H200).
#: Together (round 36, three H200 calls) they shortened the layer change by about 1 s but the subsets around it grew
#: by as much: faster in 3 of 6 side-by-side pairs, so both stay opt-in. ``capture_lazy`` (round 39) removes one
#: host copy of layer 0 only where the quantize device is a GPU; on an H200 (round 40) the start was no shorter.
#: ``tail_workers`` (round 40) did not shorten the runs on an H100 (round 42). ``solve_warmup`` (round 43) is a
#: default since round 44 (one H100: layer 0's first subset 0.26-0.41 s against 0.64-0.75 s in all four runs).
#: ``device_words`` (round 51, one H100): the last layer's finalize window no shorter than ``block_finalize``'s alone
#: (0.78 / 0.79 s against 0.79 / 0.57 s), 0.3 s of packing added to the main thread.
#: ``steal_groups`` (round 51): on one H100 (round 52) 3.94x-4.06x against the default's 3.94x-4.10x, the tail 0.70 /
#: 0.73 s against 0.74 / 0.76 s. ``gc_freeze`` is a default since round 52: its saves run frozen too, so the
#: collection it took out of the run no longer comes in the save.
#: ``load_priority`` (round 52): on one H100 (round 53) layer 1's load 0.32-0.38 s against 0.78-0.79 s, but the
#: paused finalizes lengthened the subsets after it as much (3.83x-4.15x against the default's 3.79x-4.23x).
#: ``load_switch`` (round 53): on one H100 (round 54, one run) layer 1's load 1.00 s against the default's 0.88 s, no
#: gain. ``capture_lazy`` with ``layer_reads``' first-layer read (round 54): 16.97 / 13.82 s against the default's
#: 17.27 / 12.67 s in the same call, no gain.
#: ``layer_stage`` (round 55): on one H100 (round 57) nothing staged without ``capture_lazy`` (the layers load into host
#: memory); with it the layer change was 0.4 s shorter and layer 1's first subsets as much longer (4.07x-4.31x against the
#: default's 4.16x-4.68x in the same call).
#: ``row_pack`` (round 69): block_finalize's words from :mod:`.pack_kernel` (4.5-5.5x faster than GPTQModel's extension
#: a call on a 2-core CPU, ``pack_scaling_cpu_round69.json``); not yet run on a GPU host.
OPT_IN = frozenset({"layer_ahead", "capture_lazy", "tail_workers", "device_words", "steal_groups", "load_priority",
                    "load_switch", "layer_stage", "row_pack"})
#: Parts on by default only where the process may run on at least this many cores (:func:`default_parts`).
#: ``block_finalize`` packs a group's members on a pool of the cores less two: on two H100 hosts of 16 cores
#: (rounds 48 and 51) the quantize was shorter than without it in seven of eight pairs and as long in one, while on a
#: 2-core CPU its finalize window was twice as long (one extension thread; rounds 48-49). Core counts in between have
#: not been measured, so it waits for 16.
MANY_CORE_PARTS = types.MappingProxyType({"block_finalize": 16})
#: The parts ``lean_bookkeeping=True`` turns on on any host (:func:`default_parts` adds :data:`MANY_CORE_PARTS`).
DEFAULT_PARTS = PARTS - OPT_IN - frozenset(MANY_CORE_PARTS)


def default_parts(n_cores: int | None = None) -> frozenset[str]:
    """The parts ``lean_bookkeeping=True`` turns on in a process that may run on ``n_cores`` cores (None: this
    process's): :data:`DEFAULT_PARTS` and those of :data:`MANY_CORE_PARTS` whose core count it reaches."""
    n_cores = cores() if n_cores is None else n_cores
    return DEFAULT_PARTS | {part for part, needed in MANY_CORE_PARTS.items() if n_cores >= needed}


@contextmanager
def lean_logbar(enabled: set[str] | frozenset[str], stats: BookkeepingStats,
                lock: threading.Lock | None = None) -> Iterator[BookkeepingStats]:
    """The LogBar parts of :func:`lean_bookkeeping` among ``enabled`` (``progress``, ``draw_rate``,
    ``headless``, ``line_redraw``; see the module docstring), counted in ``stats``; restored on exit. The
    caller has checked them against LogBar (:func:`internals_mismatch`)."""
    with ExitStack() as stack:
        if "progress" in enabled and _ipython_missing():
            from logbar import logbar as logbar_module
            from logbar import progress as logbar_progress

            memo = _memo_notebook_check(logbar_module._running_in_notebook_environment)
            stack.enter_context(patched(logbar_module, "_running_in_notebook_environment", memo))
            stack.enter_context(patched(logbar_progress, "_running_in_notebook_environment", memo))
        if "draw_rate" in enabled:
            from logbar import progress as logbar_progress

            ProgressBar = logbar_progress.ProgressBar
            activity = getattr(logbar_progress, "_record_progress_activity", None)
            draw = _rate_limited_draw(ProgressBar.draw, stats, lock or threading.Lock(), DRAW_INTERVAL,
                                      activity if callable(activity) else None)
            stack.enter_context(patched(ProgressBar, "draw", draw))
        headless = None
        if "headless" in enabled:
            from logbar import terminal

            headless = _HeadlessMemo(terminal._is_headless_environment, terminal)
            stack.enter_context(patched(terminal, "_is_headless_environment", headless))
        if "line_redraw" in enabled:
            stats.line_redraw = stack.enter_context(throttled_line_redraws(interval=DRAW_INTERVAL))
        try:
            yield stats
        finally:
            if headless is not None:
                stats.headless_memo_hits, stats.headless_memo_misses = headless.hits, headless.misses


#: Parts that act only inside another part (shard handles and recopy inside the lean materialize;
#: keeping the last block in memory instead of its bundle; the device-packed words and the stolen groups inside the
#: block finalize).
_NEEDS = {"shard_handles": "materialize", "recopy": "materialize", "keep_last_block": "offload_bundle",
          "device_words": "block_finalize", "steal_groups": "block_finalize", "load_priority": "block_finalize",
          "row_pack": "block_finalize",
          "layer_stage": "layer_reads"}


@contextmanager
def lean_bookkeeping(gptq_model: Any, parts: frozenset[str] | None = None, *,
                     checkpointed: bool = False) -> Iterator[BookkeepingStats]:
    """Inside the block, GPTQModel's per-module materialize and offload bookkeeping of the expert
    projections of ``gptq_model`` (a GPTQModel model) skips its whole-model scans (see the module
    docstring). ``parts`` (default: :func:`default_parts`, every part of :data:`PARTS` but the opt-in
    :data:`OPT_IN` and the :data:`MANY_CORE_PARTS` this host has too few cores for) picks which; the rest stays stock.
    ``checkpointed``: the run uses GPTQModel's ``checkpoint=`` (the offload parts stay stock).
    Restored on exit."""
    from gptqmodel.models.base import BaseQModel
    from gptqmodel.utils import offload, structure

    parts = default_parts() if parts is None else parts
    unknown = set(parts) - PARTS
    if unknown:
        raise ValueError(f"unknown lean bookkeeping parts {sorted(unknown)}; known: {sorted(PARTS)}")
    stats = BookkeepingStats()
    problems = {part: why for part, why in internals_mismatch().items() if part in parts}
    for part, why in problems.items():
        stats.disabled[part] = why
        logger.warning(
            "GPTQModel's internals differ from what defuser-quant's lean %s bookkeeping expects (%s); "
            "GPTQModel's own per-module %s runs (same result, slower)", part, why, part,
        )
    enabled = set(parts) - set(problems)
    if checkpointed:  # GPTQModel's resume restores from its own per-module offload folders
        for part in ("offload_bundle", "keep_last_block", "base_in_memory"):
            if part in enabled:
                stats.disabled[part] = "GPTQModel's checkpoint= resumes from its own offload folders"
                enabled.discard(part)
    for part, needed in _NEEDS.items():
        if part in enabled and needed not in enabled:
            stats.disabled[part] = f"needs the {needed} part"
            enabled.discard(part)
    if "recopy" in enabled:
        why = config_refusal(gptq_model.quantize_config)
        if why is not None:
            stats.disabled["recopy"] = why
            logger.info("defuser-quant's recopy part stays stock: %s", why)
            enabled.discard("recopy")
    stats.parts = sorted(enabled)
    paths = expert_projection_paths(gptq_model.model)
    lean = _Lean(gptq_model, paths, _ties_nothing(gptq_model.model), stats)
    with ExitStack() as stack:
        if paths and "disk_probe" in enabled:  # first: the probe's thread starts as early as it can
            stats.disk_probe = stack.enter_context(probe_behind())
        if paths and "materialize" in enabled:
            stack.enter_context(patched(BaseQModel, "shell_module_materialize", lean.materialize(BaseQModel.shell_module_materialize)))
            stack.enter_context(patched(structure, "_get_qualified_name", lean.qualified_name(structure._get_qualified_name)))
            turtle = structure.LazyTurtle
            stack.enter_context(patched(turtle, "materialize_submodule", lean.turtle_materialize(turtle.materialize_submodule)))
        if paths and "offload" in enabled:
            stack.enter_context(patched(offload, "get_module_fullname", lean.module_fullname(offload.get_module_fullname)))
        if "checkpoint_index" in enabled:
            turtle = structure.LazyTurtle
            stack.enter_context(patched(turtle, "_resolve_checkpoint_module_path",
                                        lean.resolve_path(turtle._resolve_checkpoint_module_path)))
            stack.enter_context(patched(turtle, "_load_checkpoint_tensors_for_module_path",
                                        lean.load_tensors(turtle._load_checkpoint_tensors_for_module_path)))
        if paths and "layer_reads" in enabled:  # before recopy: a skipped second copy never reaches it
            reads = LayerReads(gptq_model.model, _holds_experts, stats.layer_reads,
                               pin=layer_reads_module.PIN and torch.cuda.is_available())
            turtle = structure.LazyTurtle
            stack.enter_context(patched(turtle, "_copy_checkpoint_tensors_into_submodule",
                                        reads.patch_copy(turtle._copy_checkpoint_tensors_into_submodule)))
            stack.callback(reads.close)
        staging = Staging()  # the pinned buffers of both layer moves (one at a time, on the main thread)
        stack.callback(staging.release)
        if paths and "layer_onload" in enabled:  # inside recopy's follow_moves, which re-records what it moved
            onload = lean_pre_quantize(BaseQModel.pre_quantize, gptq_model, _holds_experts, staging,
                                       stats.layer_onload, lean.lock)
            stack.enter_context(patched(BaseQModel, "pre_quantize", onload))
        if paths and "recopy" in enabled:
            recopy = Recopy(gptq_model.model, paths, lambda: getattr(lean.local, "hint", None), lean.add)
            turtle = structure.LazyTurtle
            stack.enter_context(patched(turtle, "_copy_checkpoint_tensors_into_submodule",
                                        recopy.patch(turtle._copy_checkpoint_tensors_into_submodule)))
            why = pre_quantize_refusal()
            if why is None:
                stack.enter_context(patched(BaseQModel, "pre_quantize", recopy.follow_moves(BaseQModel.pre_quantize, gptq_model)))
            else:  # layer 0 (loaded on the CPU, then moved) copies again as GPTQModel does
                stats.disabled["recopy.moves"] = why
        if paths and "shard_handles" in enabled:
            stack.enter_context(patched(structure, "safe_open", lean.shard_open(structure.safe_open)))
            stack.callback(lean.shards.close)  # runs before safe_open is restored
        if paths and "layer_reads" in enabled:
            stack.enter_context(patched(structure, "safe_open", reads.patch_open(structure.safe_open)))
        if paths and "layer_stage" in enabled:  # inside reads.close (registered before): a copy running is waited for
            from gptqmodel.looper.module_looper import ModuleLooper

            stats.layer_stage = LayerStageStats()
            stage = LayerStage(reads, gptq_model, stats.layer_stage)
            stack.enter_context(patched(ModuleLooper, "_subset_event_dispatch",
                                        stage.patch_subset_event(ModuleLooper._subset_event_dispatch)))
        stack.enter_context(lean_logbar(enabled, stats, lean.lock))
        if paths and "layer_offload" in enabled:
            post = lean_post_quantize(BaseQModel.post_quantize, gptq_model, _holds_experts, staging,
                                      stats.layer_offload, lean.lock)
            stack.enter_context(patched(BaseQModel, "post_quantize", post))
        if paths and "offload_bundle" in enabled and getattr(gptq_model.quantize_config, "offload_to_disk", False):
            stats.offload_bundle = stack.enter_context(
                bundled_offload(gptq_model.model, paths, keep_last="keep_last_block" in enabled))
        if paths and "layer_ahead" in enabled:  # outermost pre_quantize: waits before the others run
            from gptqmodel.looper.module_looper import ModuleLooper

            ahead = LayerAhead(gptq_model, _holds_experts, stats.layer_ahead)
            stack.enter_context(patched(BaseQModel, "pre_quantize", ahead.patch_pre_quantize(BaseQModel.pre_quantize)))
            stack.enter_context(patched(ModuleLooper, "_subset_event_dispatch",
                                        ahead.patch_subset_event(ModuleLooper._subset_event_dispatch)))
            stack.callback(ahead.close)  # runs first on exit: a load still running keeps every patch it uses
        if paths and "rehome" in enabled:
            stats.rehome = stack.enter_context(lean_rehome())
        if paths and "capture_lazy" in enabled:
            stats.capture_lazy = stack.enter_context(lazy_capture(gptq_model, _holds_experts))
            if "layer_reads" in enabled:  # the first layer's load comes straight to the device too: read it meanwhile
                stats.layer_reads.first = reads.read_first(getattr(gptq_model, "turtle_model", None))
                if "layer_stage" in enabled:  # ... and copy it there before the load comes
                    stage.stage_first(stats.layer_reads.first, getattr(gptq_model.quantize_config, "device", None))
        if paths and "base_in_memory" in enabled and getattr(gptq_model.quantize_config, "offload_to_disk", False):
            stats.base_in_memory = stack.enter_context(keep_base_modules(gptq_model.model))
        def around_layer_loads(scope: LayerLoadScope) -> None:  # the outermost copy patch so far: covers the whole load
            turtle = structure.LazyTurtle
            stack.enter_context(patched(turtle, "_copy_checkpoint_tensors_into_submodule",
                                        scope.patch_copy(turtle._copy_checkpoint_tensors_into_submodule,
                                                         gptq_model.model, _holds_experts)))

        priority = None
        if paths and "load_priority" in enabled:
            stats.load_priority = LoadPriorityStats()
            priority = LoadPriority(stats.load_priority)
            around_layer_loads(priority)
        if paths and "load_switch" in enabled:  # outside load_priority's gate: the shorter interval covers it too
            stats.load_switch = LoadSwitchStats()
            around_layer_loads(LoadSwitch(stats.load_switch))
        if paths and "block_finalize" in enabled:
            stats.block_finalize = stack.enter_context(block_finalize(gptq_model, paths,
                                                                      device_words="device_words" in enabled,
                                                                      steal_groups="steal_groups" in enabled,
                                                                      priority=priority,
                                                                      row_pack="row_pack" in enabled))
        if paths and "tail_workers" in enabled:
            stats.tail_workers = stack.enter_context(tail_workers(gptq_model, _holds_experts))
        quantize_device = cuda_key(getattr(gptq_model.quantize_config, "device", None))
        if paths and "worker_warmup" in enabled:  # last: everything else is in place when the workers start
            stats.worker_warmup = warm_workers(quantize_device)
        if paths and "solve_warmup" in enabled:  # after the empty tasks: each worker rehearses after its own warm-up
            stats.solve_warmup = rehearse_on_workers(quantize_device,
                                                     gptq_model.quantize_config, getattr(gptq_model.model, "config", None),
                                                     getattr(gptq_model.model, "dtype", None))
        if paths and "gc_freeze" in enabled:  # after everything the block set up: all of it is frozen too
            stats.gc_freeze = stack.enter_context(frozen_heap(RunFreezeStats()))
            freeze_saves_of(gptq_model, stats.gc_freeze)  # its saves through the plugin run frozen too
        yield stats
    if stats.stock:
        logger.debug("lean bookkeeping left to GPTQModel: %s", dict(stats.stock))
