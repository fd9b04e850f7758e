"""``integrations.gptqmodel.line_redraw``: LogBar's stack redrawn after log lines at most once per interval."""

from __future__ import annotations

import io
import re
import threading
import time

import pytest

pytest.importorskip("logbar")

from logbar import logbar as logbar_module  # noqa: E402

from defuser_quant.integrations.gptqmodel import line_redraw  # noqa: E402


@pytest.fixture
def renders(monkeypatch):
    """LogBar's stack render replaced by one that records when it ran (and with what), under LogBar's lock."""
    calls: list[tuple[float, bool]] = []

    def render(precomputed=None, columns_hint=None, backend_state=None):
        assert logbar_module._RENDER_LOCK._is_owned()  # every redraw runs under LogBar's render lock
        calls.append((time.monotonic(), backend_state is not None))

    monkeypatch.setattr(logbar_module, "_render_progress_stack_locked", render)
    return calls


@pytest.fixture
def log(monkeypatch):
    """A LogBar logger whose lines go to a buffer (``log.out``) and are never deferred."""
    out = io.StringIO()
    monkeypatch.setattr(logbar_module, "_print", lambda *a, **k: print(*a, **{**k, "file": out}))
    monkeypatch.setattr(logbar_module, "_should_defer_log_output_locked", lambda rows: False)
    logger = logbar_module.LogBar.shared()
    logger.out = out
    return logger


def test_installed_logbar_is_what_the_part_expects():
    assert line_redraw.internals_refusal() is None


def test_a_burst_of_lines_redraws_once_then_once_more_after_the_interval(renders, log):
    with line_redraw.throttled_line_redraws(interval=1.0) as stats:  # wide: a loaded machine logs 50 lines well within it
        for i in range(50):
            log.info(f"record {i}")
        assert len(renders) == 1  # the first line's redraw; the next 49 came within the interval
        assert (stats.rendered, stats.skipped, stats.trailing) == (1, 49, 0)
        time.sleep(1.6)  # the timer pays the owed redraw
        assert (stats.trailing, len(renders)) == (1, 2)
        assert renders[1][0] - renders[0][0] >= 1.0
    assert [int(n) for n in re.findall(r"record (\d+)", log.out.getvalue())] == list(range(50))  # every line, in order
    assert len(renders) == 2  # nothing owed when the block ended


def test_a_redraw_owed_when_the_block_ends_is_made_then_and_the_timer_is_gone(renders, log):
    with line_redraw.throttled_line_redraws(interval=5.0) as stats:
        log.info("first")
        log.info("second")
        assert stats.as_dict() == {"rendered": 1, "skipped": 1, "trailing": 0}
    assert stats.trailing == 1 and len(renders) == 2
    assert not [t for t in threading.enumerate() if t.name == "defuser-quant-line-redraw" and t.is_alive()]
    assert logbar_module._render_progress_stack_locked.__name__ == "render"  # restored


def test_another_draw_pays_the_owed_redraw_and_lines_after_the_interval_redraw_at_once(renders, log):
    with line_redraw.throttled_line_redraws(interval=1.0) as stats:
        log.info("a")
        log.info("b")  # skipped: owed
        with logbar_module._RENDER_LOCK:
            logbar_module._render_progress_stack_locked()  # a bar's own draw (not a log line): always renders
        time.sleep(1.3)
        assert stats.trailing == 0  # that draw paid it: the timer drew nothing
        log.info("c")  # more than the interval after the last draw: redrawn at once
        assert (stats.rendered, stats.skipped, len(renders)) == (2, 1, 3)
        assert [from_line for _, from_line in renders] == [True, False, True]


def test_the_patches_are_restored_on_an_error_and_other_threads_lines_count_too(renders, log):
    render, emit = logbar_module._render_progress_stack_locked, logbar_module.LogBar.__dict__["_emit_log_line_locked"]
    with pytest.raises(KeyboardInterrupt), line_redraw.throttled_line_redraws(interval=5.0) as stats:
        assert logbar_module._render_progress_stack_locked is not render
        log.info("main")
        worker = threading.Thread(target=log.info, args=("worker",))
        worker.start()
        worker.join()
        raise KeyboardInterrupt
    assert logbar_module._render_progress_stack_locked is render
    assert logbar_module.LogBar.__dict__["_emit_log_line_locked"] is emit
    assert (stats.rendered, stats.skipped, stats.trailing) == (1, 1, 1)


@pytest.mark.parametrize("missing", ["_RENDER_LOCK", "_render_progress_stack_locked"])
def test_a_logbar_without_what_it_relies_on_is_refused(monkeypatch, missing):
    monkeypatch.delattr(logbar_module, missing)
    assert "expected logbar.logbar._render_progress_stack_locked" in line_redraw.internals_refusal()


def test_a_line_that_does_not_redraw_the_stack_is_refused(monkeypatch):
    monkeypatch.setattr(logbar_module.LogBar, "_emit_log_line_locked", lambda self, *a, **k: None)
    assert "_emit_log_line_locked" in line_redraw.internals_refusal()


def test_a_render_with_other_parameters_is_refused(monkeypatch):
    monkeypatch.setattr(logbar_module, "_render_progress_stack_locked", lambda precomputed=None: None)
    assert "expected _render_progress_stack_locked(precomputed, columns_hint, backend_state)" in line_redraw.internals_refusal()
