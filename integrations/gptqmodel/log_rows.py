"""The ``log_rows`` part of :func:`~.overhead.lean_bookkeeping`: GPTQModel's per-module quant log
rows drawn by one background thread instead of by the device workers under the processor's lock.

GPTQModel 7.6's ``LoopProcessor.log_new_row`` draws each module's row of the quant log table
(LogBar columns: a border, the row, a border, each followed by a redraw of the progress bars)
while it holds the processor's lock, the lock every device worker's ``GPTQProcessor.process``
takes several times per module. At Qwen3-30B-A3B shape a row took 0.4-0.6 ms of an H200 host,
and the other workers waited on the lock meanwhile: 1.1-1.5 s of each worker's ``process`` in
round 12's sampled profile (``sampled_gptqmodel_ours_cuda_round12a.txt``).

Here the worker does under the lock what GPTQModel does there except the drawing: it counts the
row, builds or extends the columns, decides on a header and formats the row's cells, and queues
them, in that order, for one drawing thread; then it hands the record to GPTQModel's asynchronous
log file writer as before. The drawing thread draws the rows in the order the workers queued
them, with the columns object each was formatted for, whenever the interpreter lock is free (the
workers mostly wait on the GPU). The table's content and the quant log file are GPTQModel's; a row
may appear on the terminal a moment after the worker finished its module. Every queued row is
drawn before the lean block exits. With ``GPTQMODEL_LOG_QUANT_STATS`` set (a plain-text summary
per row, for debugging) GPTQModel's own ``log_new_row`` runs.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["LogRows", "internals_refusal"]

logger = logging.getLogger(__name__)

#: sha256[:16] of GPTQModel 7.6.0's ``LoopProcessor.log_new_row`` source, the steps copied here.
_LOG_NEW_ROW_SOURCE = "e3008a308a178cbc"


def internals_refusal() -> str | None:
    """What differs from the GPTQModel 7.6 internals the part relies on (None: nothing)."""
    from gptqmodel.looper.gptq_processor import GPTQProcessor
    from gptqmodel.looper.loop_processor import LoopProcessor

    from .overhead import _source_digest

    log_new_row = getattr(LoopProcessor, "log_new_row", None)
    if log_new_row is None or _source_digest(log_new_row) != _LOG_NEW_ROW_SOURCE:
        return "LoopProcessor.log_new_row differs from GPTQModel 7.6.0's source"
    if GPTQProcessor.log_new_row is not log_new_row:
        return "GPTQProcessor overrides log_new_row"
    missing = [name for name in ("_ensure_log_columns", "_format_log_value", "log_save_async")
               if not callable(getattr(LoopProcessor, name, None))]
    if missing:
        return f"LoopProcessor has no {', '.join(missing)}"
    return None


class LogRows:
    """The patched ``LoopProcessor.log_new_row`` of one lean block, and its drawing thread.

    ``count``: ``(stats field, n)`` adds n. :meth:`close` draws what is queued and ends the thread.
    """

    def __init__(self, count: Callable[[str, int], None]) -> None:
        self.count = count
        self.rows: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.start_lock = threading.Lock()
        self.failures = 0

    def patch(self, original: Callable) -> Callable:
        from gptqmodel.looper.gptq_processor import GPTQProcessor

        rows = self

        @functools.wraps(original)
        def log_new_row(self, stat):
            if not isinstance(self, GPTQProcessor) or os.getenv("GPTQMODEL_LOG_QUANT_STATS", "0") not in ("", "0", "false", "False"):
                return original(self, stat)
            with self.lock:
                self.log_call_count += 1
                columns_rebuilt = self._ensure_log_columns(stat)
                columns = self._log_columns
                if columns is None:
                    return None  # GPTQModel returns here too (no row, no file record)
                header = bool(columns_rebuilt or self.log_call_count % self._log_header_interval == 1)
                values = [self._format_log_value(column, stat.get(column, ""), stat) for column in self._log_column_labels]
                rows.put(columns, header, values)  # under the lock: the queue keeps GPTQModel's row order
            self.log_save_async(stat)
            return None

        return log_new_row

    def put(self, columns: Any, header: bool, values: list[str]) -> None:
        with self.start_lock:
            if self.thread is None:
                self.thread = threading.Thread(target=self._draw, name="defuser-quant-log-rows", daemon=True)
                self.thread.start()
        self.rows.put((columns, header, values))

    def _draw(self) -> None:
        while (row := self.rows.get()) is not None:
            columns, header, values = row
            try:
                if header:
                    columns.info.header()
                columns.info(*values)
            except Exception:  # a row that cannot be drawn must not stop the quantization
                self.failures += 1
                if self.failures == 1:
                    logger.warning("GPTQModel's quant log row could not be drawn", exc_info=True)
            self.count("log_rows_drawn", 1)

    def close(self) -> None:
        """Draw every queued row, then end the drawing thread."""
        with self.start_lock:
            thread, self.thread = self.thread, None
        if thread is not None:
            self.rows.put(None)
            thread.join()
