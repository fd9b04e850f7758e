"""The ``line_redraw`` part of :func:`~.overhead.lean_bookkeeping`: LogBar draws its progress bars again
after a burst of log lines at most once per interval, instead of after every line.

Every LogBar log line (``LogBar._emit_log_line_locked``) clears the progress-bar stack, prints the line
and then draws the whole stack again (``_render_progress_stack_locked``). At the end of ``quantize()``
GPTQModel 7.6 logs every module's record once more, 776 lines at the two-layer Qwen3-30B-A3B shape,
with its finalize bar on screen: the redraws are about two thirds of those lines' time
(``benchmarks/log_lines.py``; 0.3-0.5 s of an H200 run's tail, docs/performance.md round 27).

Inside :func:`throttled_line_redraws` the redraw after a line is skipped when the stack was drawn less
than ``interval`` seconds before; the stack is then drawn by whatever draws next (a bar's own draw, the
next line after the interval) and at the latest ``interval`` seconds later by a one-shot timer, and once
more when the block ends if one is still owed. The same lines in the same order; the bars are the same,
drawn less often while lines stream. Everything happens under LogBar's own render lock, as its redraws do.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from .compat import parameter_names, patched

logger = logging.getLogger(__name__)

__all__ = ["LineRedrawStats", "internals_refusal", "throttled_line_redraws"]

@dataclass
class LineRedrawStats:
    """What :func:`throttled_line_redraws` did."""

    rendered: int = 0  # stack redraws after a log line passed on
    skipped: int = 0  # ... skipped: the stack was drawn less than the interval before
    trailing: int = 0  # owed redraws made by the timer or when the block ended

    def as_dict(self) -> dict[str, int]:
        return {"rendered": self.rendered, "skipped": self.skipped, "trailing": self.trailing}


def internals_refusal() -> str | None:
    """Why LogBar does not look like what this relies on (None: it does)."""
    try:
        from logbar import logbar as logbar_module
    except ImportError:
        return "logbar is not importable"
    render = getattr(logbar_module, "_render_progress_stack_locked", None)
    emit = getattr(getattr(logbar_module, "LogBar", None), "_emit_log_line_locked", None)
    lock = getattr(logbar_module, "_RENDER_LOCK", None)
    if render is None or emit is None or lock is None:
        return "expected logbar.logbar._render_progress_stack_locked, LogBar._emit_log_line_locked and _RENDER_LOCK"
    if not {"precomputed", "columns_hint", "backend_state"} <= parameter_names(render):
        return "expected _render_progress_stack_locked(precomputed, columns_hint, backend_state)"
    names = set(getattr(getattr(emit, "__code__", None), "co_names", ()))
    if not {"_clear_progress_stack_locked", "_render_progress_stack_locked"} <= names:
        return "expected LogBar._emit_log_line_locked to clear the stack, print, and call _render_progress_stack_locked"
    if not hasattr(lock, "acquire") or not hasattr(lock, "_is_owned"):
        return "expected logbar.logbar._RENDER_LOCK to be a reentrant lock"
    return None


class _Throttle:
    """The replacement render and line wrappers; its state is read and written under LogBar's render lock."""

    def __init__(self, render: Callable, lock: Any, interval: float, stats: LineRedrawStats):
        self.render, self.lock, self.interval, self.stats = render, lock, interval, stats
        self.local = threading.local()  # .in_line: this thread is inside a log line
        self.last: float | None = None  # when the stack was last drawn (monotonic)
        self.owed = False  # a redraw after a line was skipped and nothing has drawn since
        self.timer: threading.Timer | None = None
        self.closed = False

    def render_stack(self, *args, **kwargs):
        now = time.monotonic()
        if getattr(self.local, "in_line", False):
            if self.last is not None and now - self.last < self.interval:
                self.stats.skipped += 1
                self.owed = True
                self._arm()
                return None
            self.stats.rendered += 1
        self.last, self.owed = now, False
        return self.render(*args, **kwargs)

    def emit(self, original: Callable) -> Callable:
        @functools.wraps(original)
        def emit_log_line(logger, *args, **kwargs):
            outer = getattr(self.local, "in_line", False)
            self.local.in_line = True
            try:
                return original(logger, *args, **kwargs)
            finally:
                self.local.in_line = outer
        return emit_log_line

    def _arm(self) -> None:
        if self.timer is None and not self.closed:
            self.timer = threading.Timer(self.interval, self._pay)
            self.timer.daemon = True
            self.timer.name = "defuser-quant-line-redraw"
            self.timer.start()

    def _pay(self) -> None:
        """Draw the stack if a redraw is still owed (the timer's, and the block end's)."""
        with self.lock:
            self.timer = None
            if self.owed:
                self.stats.trailing += 1
                self.last, self.owed = time.monotonic(), False
                try:
                    self.render()
                except Exception:  # noqa: BLE001 - a missed frame of the bars, as LogBar's own refresh treats it
                    logger.debug("LogBar's owed stack redraw failed", exc_info=True)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            timer, self.timer = self.timer, None
        if timer is not None:
            timer.cancel()
            timer.join(timeout=1.0)  # a timer already paying finishes under the lock; none outlives the block
        self._pay()


@contextmanager
def throttled_line_redraws(*, interval: float, stats: LineRedrawStats | None = None) -> Iterator[LineRedrawStats]:
    """Inside the block, LogBar's stack redraw after a log line runs at most once per ``interval`` seconds
    (the lean bookkeeping passes its ``DRAW_INTERVAL``; see the module docstring); restored on exit, with an
    owed redraw made then. The caller has checked :func:`internals_refusal`."""
    from logbar import logbar as logbar_module

    stats = stats if stats is not None else LineRedrawStats()
    throttle = _Throttle(logbar_module._render_progress_stack_locked, logbar_module._RENDER_LOCK, interval, stats)
    with ExitStack() as stack:
        stack.callback(throttle.close)  # runs after both are restored: the owed redraw is a plain one
        stack.enter_context(patched(logbar_module, "_render_progress_stack_locked", throttle.render_stack))
        stack.enter_context(patched(logbar_module.LogBar, "_emit_log_line_locked",
                                    throttle.emit(logbar_module.LogBar._emit_log_line_locked)))
        yield stats
