"""Transformers' ``save_pretrained`` with its safetensors shards written by a pool of threads.

Transformers writes a checkpoint's shards one after the other, each through safetensors'
``save_file``. :func:`concurrent_shards` wraps one ``save_pretrained`` call so a pool of threads
writes them at once with :func:`.tensor_file.write_safetensors` (the same bytes; the copies and
file writes release Python's lock, a GPU tensor goes through a pinned buffer on a stream of its
own; a shard holding a dtype it has no name for goes through safetensors' own writer):

* each shard Transformers hands to ``safe_save_file`` goes to the pool; the call returns once
  every shard is on disk;
* no shard is copied into a bytes object (GPU tensors pass through a 64 MiB pinned buffer per
  writing thread); where Transformers loads offloaded weights back per shard, the shards being
  written at once hold at most the save's ``max_shard_size`` (or the largest shard), the most
  the one-by-one write holds, so host memory does not grow with the threads;
* when the caller gave no ``max_shard_size``, the checkpoint is split into about one shard per
  thread (at least :data:`MIN_SHARD_BYTES` each, and no larger than the wrapped save's own limit
  divided by the threads), so a model that would be one file is written in parallel pieces with
  a standard ``model.safetensors.index.json``; the tensors are the same;
* a write that fails, or an interrupt, removes every shard this call began writing and the index
  naming them, then raises: no output that looks whole is left behind; a file of an earlier save
  whose turn had not come is left as it was.

Only one ``save_pretrained`` at a time goes through the pool (a lock); Transformers' own code is
unchanged apart from the two module attributes patched for the call's duration.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .source import INDEX_NAME
from .stream import parse_size
from .tensor_file import writable, write_safetensors

__all__ = ["MIN_SHARD_BYTES", "concurrent_shards", "default_threads"]

logger = logging.getLogger(__name__)

#: the smallest shard an automatic split makes (smaller models stay one file)
MIN_SHARD_BYTES = 256 * 2**20
_SAVE_LOCK = threading.RLock()


def default_threads() -> int:
    """Writer threads when none are asked for: the CPUs, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def _nbytes(tensors: Iterable[Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


class _Writes:
    """The pool, the bytes in flight, the files started and the first failure of one save."""

    def __init__(self, threads: int, write: Callable[..., Any]):
        self.write = write
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="dq-shard")
        self.started: list[Path] = []  # every shard handed to the pool
        self.begun: list[Path] = []  # the shards whose file a thread opened (only those are removed on failure)
        self.limit: int | None = None  # bytes in flight, for offloaded weights loaded back per shard; None: no limit
        self.in_flight = 0
        self.cond = threading.Condition()
        self.error: BaseException | None = None
        self.failed: str = ""

    def _raise(self) -> None:
        raise RuntimeError(
            f"writing checkpoint shard {self.failed} failed: {self.error!r}; the shards this save had begun were removed "
            "(check the free space and permissions there, then save again)"
        ) from self.error

    def submit(self, tensors: dict[str, Any], filename: str, metadata: dict | None = None) -> None:
        size = _nbytes(tensors.values())
        _ready_on_device(tensors)
        with self.cond:
            # at least one shard always goes, so a shard larger than the limit is written alone
            while self.error is None and self.limit is not None and self.in_flight and self.in_flight + size > self.limit:
                self.cond.wait()
            if self.error is not None:
                self._raise()
            self.in_flight += size
        self.started.append(Path(filename))
        self.pool.submit(self._run, tensors, filename, metadata, size)  # failures land in self.error

    def _run(self, tensors: dict[str, Any], filename: str, metadata: dict | None, size: int) -> None:
        try:
            with self.cond:
                if self.error is not None:  # another shard failed or the save was stopped: leave this one alone
                    return
                self.begun.append(Path(filename))
            if writable(tensors):
                self.write(tensors, filename, metadata=metadata)
            else:  # a dtype our writer has no name for (e.g. packed FP4): safetensors' own, still in the pool
                from safetensors.torch import save_file

                save_file(tensors, filename, metadata=metadata)
        except BaseException as error:
            with self.cond:
                if self.error is None:
                    self.error, self.failed = error, filename
            raise
        finally:
            with self.cond:
                self.in_flight -= size
                self.cond.notify_all()

    def wait(self) -> None:
        """Every shard written, or the first failure raised."""
        self.pool.shutdown(wait=True)
        if self.error is not None:
            self._raise()

    def abandon(self) -> None:
        """Stop queued writes, wait for the running ones, remove what was started."""
        with self.cond:
            if self.error is None:
                self.error = KeyboardInterrupt()
            self.cond.notify_all()
        self.pool.shutdown(wait=True, cancel_futures=True)
        folders = {path.parent for path in self.started}
        names = {path.name for path in self.begun}
        for path in self.begun:
            path.unlink(missing_ok=True)
        for folder in folders:
            index = folder / INDEX_NAME
            if _index_names(index) & names:  # the index naming shards this save (over)wrote: it would lie
                index.unlink(missing_ok=True)
        if self.begun:
            logger.warning("checkpoint save stopped: removed the %d shard(s) it had begun in %s", len(self.begun),
                           ", ".join(sorted(str(f) for f in folders)))


def _ready_on_device(tensors: dict[str, Any]) -> None:
    """Wait for the work that made the shard's GPU tensors (the writer copies them on its own stream)."""
    import torch

    for device in {t.device for t in tensors.values() if t.device.type == "cuda"}:
        torch.cuda.current_stream(device).synchronize()


def _index_names(index: Path) -> set[str]:
    try:
        return set(json.loads(index.read_text()).get("weight_map", {}).values())
    except (OSError, ValueError, AttributeError):
        return set()


def _auto_shard_size(total: int, limit: int, threads: int) -> int:
    """About one shard per thread, each at least MIN_SHARD_BYTES and all in flight within ``limit``."""
    size = min(math.ceil(total / threads), limit // threads)
    return int(min(max(size, MIN_SHARD_BYTES), limit))


def concurrent_shards(save_pretrained: Callable[..., Any], threads: int | None = None) -> Callable[..., Any]:
    """``save_pretrained`` (a bound method, possibly already wrapped) with its shards written by ``threads`` threads.

    ``threads`` None: :func:`default_threads`; 1 or less returns ``save_pretrained`` itself.
    """
    count = default_threads() if threads is None else int(threads)
    if count <= 1:
        return save_pretrained

    @functools.wraps(save_pretrained)
    def save_with_concurrent_shards(save_directory: Any, *args: Any, **kwargs: Any) -> Any:
        from transformers import modeling_utils

        auto_split = "max_shard_size" not in kwargs
        with _SAVE_LOCK:
            writes = _Writes(count, write_safetensors)
            transformers_write = modeling_utils.safe_save_file
            split = modeling_utils.split_torch_state_dict_into_shards

            def split_for_threads(state_dict: dict, *a: Any, max_shard_size: int | str = "50GB", **kw: Any) -> Any:
                limit = parse_size(max_shard_size)
                if auto_split:
                    max_shard_size = _auto_shard_size(_nbytes(state_dict.values()), limit, count)
                result = split(state_dict, *a, max_shard_size=max_shard_size, **kw)
                if any(t.device.type == "meta" for t in state_dict.values()):  # offloaded: loaded back per shard
                    largest = max((_nbytes(state_dict[n] for n in names) for names in result.filename_to_tensors.values()),
                                  default=0)
                    writes.limit = max(limit, largest)
                return result

            modeling_utils.safe_save_file = writes.submit
            modeling_utils.split_torch_state_dict_into_shards = split_for_threads
            start = time.perf_counter()
            try:
                result = save_pretrained(save_directory, *args, **kwargs)
                writes.wait()
            except BaseException:
                writes.abandon()
                raise
            finally:
                modeling_utils.safe_save_file = transformers_write
                modeling_utils.split_torch_state_dict_into_shards = split
        if writes.started:
            logger.info("wrote %d checkpoint shard(s) with %d threads in %.2f s", len(writes.started), count,
                        time.perf_counter() - start)
        return result

    return save_with_concurrent_shards
