"""One GPTQModel log row per batched chunk instead of one per expert projection.

GPTQModel 7.6 draws a table row for every quantized module (``LoopProcessor.log_new_row``): two
terminal lines (the row and its border), each clearing and redrawing the whole progress-bar
stack, all under the processor's lock, which every device worker's ``process()`` also takes.
With hundreds of expert projections per layer that is ~1-4 ms of serialized host time per module
(a layer's 384 rows: 0.5-1.5 s), and the rows are the largest single part of the device workers'
own time (docs/performance.md, round 19).

Inside :func:`chunk_log_rows`, the modules a batched chunk solved still get everything of
``log_new_row`` but the drawing: their count (``log_call_count``) and the asynchronous log record
GPTQModel persists for each module (``log_save_async``, the same dict it would have written).
When the chunk's last module has logged, one row stands for all of them:

* module: the names with the expert index replaced by ``*`` and the count,
  e.g. ``mlp.experts.*.gate_proj|up_proj x26``;
* loss: the largest of the chunk (colored by GPTQModel's thresholds), samples: the fewest,
  damp: the largest, time: the sum; the other columns from the chunk's last row.

Modules solved by GPTQModel itself (attention, fallbacks) keep their own rows. Rows of a chunk
whose modules did not all log (a module's ``process()`` raised) are drawn when the block ends.
``BatchedSolve(log_rows="module")`` keeps GPTQModel's row per module. When the processor lacks
the members this relies on, a warning says so and every row is GPTQModel's.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from . import kernels

logger = logging.getLogger(__name__)

__all__ = ["ChunkRows", "LogRowStats", "chunk_log_rows", "mark_batched", "summary_row"]

#: The processor methods and instance attributes the chunk row uses (GPTQModel 7.6 ``LoopProcessor``).
_METHODS = ("_ensure_log_columns", "_format_log_value", "log_save_async")
_ATTRIBUTES = ("lock", "log_call_count", "_log_header_interval")
_INDEXED = re.compile(r"^(.*?\.)(\d+)(\..+)$")


@dataclass
class LogRowStats:
    """What :func:`chunk_log_rows` did in one run."""

    modules: int = 0  # batched modules whose row was folded into a chunk row
    rows: int = 0  # chunk rows drawn
    partial: int = 0  # ... of them for chunks whose modules did not all log
    stock: int = 0  # rows GPTQModel drew itself

    def as_dict(self) -> dict[str, int]:
        return {"modules": self.modules, "rows": self.rows, "partial": self.partial, "stock": self.stock}


@dataclass(eq=False)
class ChunkRows:
    """The log records of one chunk's modules, until all ``expected`` have logged."""

    expected: int
    stats: list[dict] = field(default_factory=list)
    processor: Any = None
    drawn: bool = False


_current = threading.local()  # the chunk of the module this thread's process() is logging


def mark_batched(rows: ChunkRows | None) -> None:
    """The module this thread is processing was solved in ``rows``' chunk (None: by GPTQModel)."""
    _current.rows = rows


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _pattern(names: list[str]) -> str:
    """``mlp.experts.3.gate_proj`` + ``mlp.experts.4.up_proj`` -> ``mlp.experts.*.gate_proj|up_proj``."""
    parts = [_INDEXED.match(name) for name in names]
    prefixes = {m[1] for m in parts if m}
    if len(prefixes) != 1 or not all(parts):
        return "|".join(dict.fromkeys(names))
    suffixes = "|".join(dict.fromkeys(m[3][1:] for m in parts))
    return f"{prefixes.pop()}*.{suffixes}"


def summary_row(stats: list[dict], keys: Any) -> dict:
    """One log record standing for ``stats`` (see the module docstring); ``keys`` holds
    GPTQModel's column names (``gptqmodel.looper.loop_processor``'s constants)."""
    row = dict(stats[-1])
    row[keys.PROCESS_LOG_MODULE] = f"{_pattern([str(s.get(keys.PROCESS_LOG_MODULE, '')) for s in stats])} x{len(stats)}"
    folds = ((keys.QUANT_LOG_LOSS, max, "{:.10f}"), (keys.QUANT_LOG_NSAMPLES, lambda v: int(min(v)), "{}"),
             (keys.QUANT_LOG_DAMP, max, "{:.5f}"), (keys.PROCESS_LOG_TIME, sum, "{:.3f}"))
    for column, fold, form in folds:
        values = [v for v in (_float(s.get(column)) for s in stats) if v is not None]
        if values:
            row[column] = form.format(fold(values))
    return row


def _draw(processor: Any, stats: list[dict], keys: Any) -> None:
    """GPTQModel's table row for ``stats`` (under the processor's lock, as ``log_new_row``)."""
    row = summary_row(stats, keys)
    with processor.lock:
        rebuilt = processor._ensure_log_columns(row)
        columns = getattr(processor, "_log_columns", None)
        if columns is None:
            return
        interval = max(1, int(processor._log_header_interval))
        if rebuilt or getattr(processor, "_defuser_quant_rows", 0) % interval == 0:
            columns.info.header()
        processor._defuser_quant_rows = getattr(processor, "_defuser_quant_rows", 0) + 1
        columns.info(*[processor._format_log_value(c, row.get(c, ""), row) for c in processor._log_column_labels])


def missing_members(processor_cls: type) -> list[str]:
    """The members of GPTQModel's processor the chunk rows need that ``processor_cls`` lacks."""
    return [name for name in _METHODS if not callable(getattr(processor_cls, name, None))]


@contextmanager
def chunk_log_rows() -> Iterator[LogRowStats]:
    """Inside the block, GPTQModel's ``log_new_row`` folds the rows of each batched chunk into one
    (see the module docstring); restored after, with any chunk not yet drawn drawn then."""
    from gptqmodel.looper import loop_processor as keys
    from gptqmodel.looper.loop_processor import LoopProcessor

    stats = LogRowStats()
    original = LoopProcessor.log_new_row
    missing = missing_members(LoopProcessor)
    if missing:
        logger.warning("GPTQModel's LoopProcessor lacks %s; every module keeps its own log row", ", ".join(missing))
        yield stats
        return
    lock = threading.Lock()
    pending: dict[int, ChunkRows] = {}

    def log_new_row(self, stat):
        with kernels.stage("log"):  # timed like GPTQModel's own (nested in its timing: counted once)
            _log_new_row(self, stat)

    def _log_new_row(self, stat):
        rows = getattr(_current, "rows", None)
        _current.rows = None
        if rows is None or not all(hasattr(self, name) for name in _ATTRIBUTES):
            with lock:
                stats.stock += 1
            return original(self, stat)
        with self.lock:
            self.log_call_count += 1
        self.log_save_async(stat)
        with lock:
            rows.stats.append(stat)
            rows.processor = self
            stats.modules += 1
            complete = len(rows.stats) >= rows.expected and not rows.drawn
            if complete:
                rows.drawn = True
                pending.pop(id(rows), None)
            else:
                pending[id(rows)] = rows
        if complete:
            _draw(self, rows.stats, keys)
            with lock:
                stats.rows += 1

    LoopProcessor.log_new_row = log_new_row
    try:
        yield stats
    finally:
        LoopProcessor.log_new_row = original
        with lock:
            left = [rows for rows in pending.values() if not rows.drawn and rows.stats]
            pending.clear()
            for rows in left:
                rows.drawn = True
        for rows in left:
            _draw(rows.processor, rows.stats, keys)
            stats.rows += 1
            stats.partial += 1
