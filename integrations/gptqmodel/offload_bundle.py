"""One disk-offload bundle per experts block instead of one per expert projection.

With ``offload_to_disk`` (GPTQModel's default) every finalized module is written on its own
(``gptqmodel.utils.offload._offload_disk_locked``): a temporary directory, a safetensors file,
its header read back, an ``index.json``, two renames, then accelerate's ``disk_offload`` (which
reads that ``index.json`` again) puts the module's tensors on ``meta`` behind an
``AlignDevicesHook``. At save, GPTQModel's writer finds each meta tensor through the nearest
``index.json`` under the offload folder (the module's own folder, then its parents', keys tried
from the leaf up: ``qweight``, ``gate_proj.qweight``, ``3.gate_proj.qweight``, ...) and reads it at
its ``data_offsets``. On an H200 that per-module offload cost ~5 s of a two-layer run
(``gptqmodel_cuda_2layers_round19a_h200x1.json``: 17.4 s with it, 12.1 s without).

Inside :func:`bundled_offload` the expert projections of one experts block (``...mlp.experts``)
are offloaded together: each module asking to be offloaded is kept (its tensors stay where they
are) until every expert projection of its block has asked; then one safetensors file holds all
their tensors (keys ``<expert>.<projection>.<tensor>``), one ``index.json`` in the block's folder
maps them with GPTQModel's fields (``dtype``, ``shape``, ``safetensors_file``, ``weight_name``,
``data_offsets``), written under a temporary name and renamed into place, and each module then gets
what ``disk_offload`` gives it: its tensors on ``meta`` behind the same accelerate hooks, reading
from the bundle. Modules of a block that had not all asked when the block ends are bundled then
(before ``quantize()`` returns, so before any save).

Anything else takes GPTQModel's own offload: modules outside our blocks, a module whose path does
not resolve to it, one already on ``meta``, one on an accelerator, one without tensors, and a block
whose folder already exists (it is never overwritten). A bundle that fails to write leaves its
modules as they were (their tensors in memory) and hands them to GPTQModel's offload one by one.

With ``keep_last`` (the ``keep_last_block`` part of :func:`~.overhead.lean_bookkeeping`), the last
experts block to complete, once every other block has been bundled, is not written at all: its
modules keep their quantized tensors in memory, where GPTQModel's save takes them (it reads only
``meta`` tensors from the offload folder). Writing it would put that block on disk only for the
save to read it back a few seconds later, and its write sat alone at the end of ``quantize()``
(0.3 s of an H200 run's tail, ``docs/performance.md`` round 27). The cost is that block's quantized
tensors held in host memory until the save (one layer's experts; 0.3 GB at Qwen3-30B-A3B shape).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from defuser_quant.checkpoint.source import raw_header

from . import kernels

logger = logging.getLogger(__name__)

__all__ = ["BundleStats", "bundled_offload", "block_of"]


@dataclass
class BundleStats:
    """What :func:`bundled_offload` did in one run."""

    bundles: int = 0  # bundle files written
    modules: int = 0  # modules offloaded through a bundle
    tensors: int = 0
    bytes: int = 0
    seconds: float = 0.0  # summed over the bundles (write, index, hooks)
    at_end: int = 0  # bundles written when the block ended (not every module had asked)
    kept_in_memory: int = 0  # modules of the last block left in memory (keep_last)
    stock: Counter = field(default_factory=Counter)  # reason -> offload calls left to GPTQModel

    def as_dict(self) -> dict[str, Any]:
        return {"bundles": self.bundles, "modules": self.modules, "tensors": self.tensors, "bytes": self.bytes,
                "seconds": round(self.seconds, 3), "at_end": self.at_end, "kept_in_memory": self.kept_in_memory,
                "stock": dict(self.stock)}


def block_of(path: str) -> tuple[str, str]:
    """``model.layers.0.mlp.experts.3.gate_proj`` -> (``model.layers.0.mlp.experts``, ``3.gate_proj``)."""
    parts = path.split(".")
    return ".".join(parts[:-2]), ".".join(parts[-2:])


class _Bundler:
    def __init__(self, model: nn.Module, expert_paths: frozenset[str], stats: BundleStats, original: Callable,
                 keep_last: bool = False):
        self.model = model
        self.keep_last = keep_last
        self.bundled: set[str] = set()  # blocks written whole
        self.original = original
        self.stats = stats
        self.expected = Counter(block_of(p)[0] for p in expert_paths)
        self.paths = expert_paths
        self.pending: dict[tuple[str, str], list[tuple[str, nn.Module]]] = {}  # (disk_path, block) -> modules
        self.lock = threading.Lock()

    def _stock(self, reason: str, module: Any, model: Any, disk_path: str, force: bool) -> None:
        with self.lock:
            self.stats.stock[reason] += 1
        self.original(module=module, model=model, disk_path=disk_path, force=force)

    def _why_not(self, module: Any, model: Any, disk_path: str) -> str | None:
        name = getattr(module, "name", None)
        if model is not self.model or not isinstance(module, nn.Module):
            return "another model or a module list"
        if not isinstance(name, str) or name not in self.paths:
            return "not an expert projection of our blocks"
        try:
            if self.model.get_submodule(name) is not module:
                return "its path names another module"
        except AttributeError:
            return "its path names another module"
        tensors = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
        if not tensors or not any(t.numel() for t in tensors):
            return "no tensors"
        if any(t.device.type != "cpu" for t in tensors):
            return "tensors not on the CPU"
        if os.path.exists(os.path.join(disk_path, name)):
            return "its own offload folder exists"
        return None

    def offload(self, module: Any = None, model: Any = None, disk_path: str = ".", force: bool = False) -> None:
        """GPTQModel's ``offload_to_disk(module, model, disk_path, force)``, bundled where it can be
        (timed as the ``offload`` stage, like GPTQModel's own)."""
        with kernels.stage("offload"):
            self._offload(module, model, disk_path, force)

    def _offload(self, module: Any, model: Any, disk_path: str, force: bool) -> None:
        why = self._why_not(module, model, disk_path)
        if why is not None:
            return self._stock(why, module, model, disk_path, force)
        block, _ = block_of(module.name)
        key = (disk_path, block)
        # looked at before the lock (a file system call gives up the interpreter lock, and the other members' asks
        # would wait on this lock meanwhile); only this block's own bundle, written once all its members have asked,
        # makes it appear during the run
        folder_exists = os.path.exists(os.path.join(disk_path, block))
        with self.lock:
            if folder_exists and key not in self.pending:
                why = "the block's offload folder exists"
            else:
                members = self.pending.setdefault(key, [])
                members.append((module.name, module))
                ready = len(members) >= self.expected[block]
                if ready:
                    del self.pending[key]
                keep = ready and self.keep_last and self.bundled == set(self.expected) - {block}
                if keep:
                    self.stats.kept_in_memory += len(members)
        if why is not None:
            return self._stock(why, module, model, disk_path, force)
        if keep:
            logger.debug("%s is the last experts block: its %d modules stay in memory for the save", block, len(members))
        elif ready:
            self._write(disk_path, block, members, force)

    def _write(self, disk_path: str, block: str, members: list[tuple[str, nn.Module]], force: bool) -> None:
        """One bundle for ``members``; on failure each goes to GPTQModel's own offload."""
        t0 = time.perf_counter()
        try:
            index, nbytes = _write_bundle(disk_path, block, members)
        except Exception as exc:  # noqa: BLE001 - nothing was changed on the modules: GPTQModel offloads them
            logger.warning("offload bundle of %s failed (%s: %s); GPTQModel offloads its %d modules one by one",
                           block, type(exc).__name__, exc, len(members), exc_info=logger.isEnabledFor(logging.DEBUG))
            for _, module in members:
                self._stock("the bundle failed to write", module, self.model, disk_path, force)
            return
        bundled = 0
        entries = entries_by_member(index)
        for name, module in members:
            try:
                _attach(os.path.abspath(os.path.join(disk_path, block)), module, entries[block_of(name)[1]])
                bundled += 1
            except Exception as exc:  # noqa: BLE001 - its tensors are where they were: GPTQModel offloads it
                logger.warning("offloading %s from its bundle failed (%s: %s); GPTQModel offloads it",
                               name, type(exc).__name__, exc)
                self._stock("its hooks failed to attach", module, self.model, disk_path, force)
        with self.lock:
            self.bundled.add(block)
            self.stats.bundles += 1
            self.stats.modules += bundled
            self.stats.tensors += len(index)
            self.stats.bytes += nbytes
            self.stats.seconds += time.perf_counter() - t0

    def flush(self) -> None:
        """Bundle the blocks whose modules did not all ask (at the block's end)."""
        with self.lock:
            left, self.pending = self.pending, {}
        for (disk_path, block), members in left.items():
            self._write(disk_path, block, members, True)
            with self.lock:
                self.stats.at_end += 1


def _write_bundle(disk_path: str, block: str, members: list[tuple[str, nn.Module]]) -> tuple[dict[str, dict], int]:
    """Write ``members``' tensors as one bundle (a safetensors file and its ``index.json``) in
    ``disk_path/block``, complete or not at all. Returns (the index, bytes); the modules are untouched."""
    from safetensors.torch import save_file

    final_dir = os.path.abspath(os.path.join(disk_path, block))
    tmp_dir = f"{final_dir}.tmp-{os.getpid()}-{threading.get_ident()}"
    bundle_path = os.path.join(final_dir, "experts.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    index: dict[str, dict] = {}
    with torch.inference_mode():
        for name, module in members:
            _, local = block_of(name)
            for key, tensor in module.state_dict().items():
                full = f"{local}.{key}"
                tensors[full] = tensor.detach().contiguous()  # on the CPU (_why_not)
                index[full] = {"dtype": str(tensor.dtype).replace("torch.", ""), "shape": list(tensor.shape),
                               "safetensors_file": bundle_path, "weight_name": full}
    if os.path.exists(final_dir):
        raise FileExistsError(f"{final_dir} exists (never overwritten)")
    os.makedirs(tmp_dir)
    try:
        tmp_bundle = os.path.join(tmp_dir, "experts.safetensors")
        save_file(tensors, tmp_bundle)
        header, base = raw_header(tmp_bundle)
        for key, meta in header.items():
            if key != "__metadata__":
                start, end = meta["data_offsets"]
                index[key]["data_offsets"] = [base + int(start), base + int(end)]
        with open(os.path.join(tmp_dir, "index.json"), "w", encoding="utf-8") as fp:
            json.dump(index, fp)
        os.rename(tmp_dir, final_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return index, sum(t.numel() * t.element_size() for t in tensors.values())


def entries_by_member(index: dict[str, dict]) -> dict[str, dict[str, dict]]:
    """A bundle's index split per member, in one pass: ``{"3.gate_proj": {"qweight": entry, ...}}``.

    Every key is ``<local>.<state_dict key>`` with ``local`` the member's last two name parts
    (:func:`block_of`); a per-member scan of the whole index made attaching a block quadratic
    in its expert count."""
    entries: dict[str, dict[str, dict]] = {}
    for key, entry in index.items():
        expert, role, rest = key.split(".", 2)
        entries.setdefault(f"{expert}.{role}", {})[rest] = dict(entry)
    return entries


def _attach(folder: str, module: nn.Module, own: dict[str, dict]) -> None:
    """What accelerate's ``disk_offload`` does to a module (as GPTQModel calls it), with the
    module's entries of the bundle (``own``) as its weights map: its tensors on ``meta`` behind the hooks."""
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, attach_align_device_hook
    from accelerate.utils import OffloadedWeightsLoader

    device = next(iter([*module.parameters(recurse=False), *module.buffers(recurse=False)])).device
    weights_map = OffloadedWeightsLoader(index=own, save_folder=folder)
    add_hook_to_module(module, AlignDevicesHook(io_same_device=True), append=True)
    attach_align_device_hook(module, execution_device=device, offload=True, offload_buffers=True, weights_map=weights_map)


@contextmanager
def bundled_offload(model: nn.Module, expert_paths: frozenset[str], keep_last: bool = False) -> Iterator[BundleStats]:
    """Inside the block, GPTQModel's finalize offloads each experts block as one bundle (see the
    module docstring; ``keep_last``: the last block to complete stays in memory); restored after,
    with unfinished blocks bundled first (on a normal exit; after an error or Ctrl-C their modules
    keep their tensors in memory)."""
    from gptqmodel.looper import stage_layer

    stats = BundleStats()
    original = stage_layer.offload_to_disk
    bundler = _Bundler(model, expert_paths, stats, original, keep_last)
    stage_layer.offload_to_disk = bundler.offload
    try:
        yield stats
    except BaseException:  # an error or Ctrl-C ends the run: unbundled modules stay as they are
        stage_layer.offload_to_disk = original
        raise
    stage_layer.offload_to_disk = original
    bundler.flush()
