"""The save path's LogBar parts (integrations.gptqmodel.save_progress): GPTQModel's lazy-source sync
draws its bar at most once per DRAW_INTERVAL, LogBar is restored after the call (also on Ctrl-C), and
a LogBar whose internals differ keeps its own draws. The real save's checkpoint is covered by
test_gptqmodel_fast_save (the plugin's save against GPTQModel's, byte for byte)."""

from __future__ import annotations

import pytest

pytest.importorskip("gptqmodel")
logbar = pytest.importorskip("logbar")


def _sync_like_gptqmodel(modules: int):
    """What ``LazyTurtle.sync_all_meta`` does with its bar: a forced first draw, then two per module."""
    from logbar import LogBar

    def alias_all_from_turtle_if_meta(shell_model, turtle_model, **kwargs):
        bar = LogBar.shared().pb(range(modules)).manual()
        bar.draw(force=True)
        for i in range(modules):
            bar.current_iter_step = i
            bar.draw()
            bar.current_iter_step = i + 1
            bar.draw()
        bar.close()
        return modules

    return alias_all_from_turtle_if_meta


def test_the_sync_draws_at_most_once_per_interval_and_logbar_is_restored():
    from logbar.progress import ProgressBar

    from defuser_quant.integrations.gptqmodel.save_progress import throttled_sync_progress

    original, seen = ProgressBar.draw, []
    sync = throttled_sync_progress(_sync_like_gptqmodel(200), seen.append)
    assert sync("shell", "turtle", skip_module_types=()) == 200
    assert ProgressBar.draw is original
    (draws,) = seen
    assert draws.disabled == {}
    assert draws.rendered + draws.skipped >= 401  # every draw went through the rate limit (close may force one more)
    assert draws.rendered >= 1 and draws.skipped >= 200  # back-to-back draws within 0.1 s are dropped


def test_ctrl_c_inside_the_sync_restores_logbar_and_still_records():
    from logbar import logbar as logbar_module
    from logbar.progress import ProgressBar

    from defuser_quant.integrations.gptqmodel.save_progress import throttled_sync_progress

    original, check, seen = ProgressBar.draw, logbar_module._running_in_notebook_environment, []
    inner = _sync_like_gptqmodel(10)

    def interrupted(*args, **kwargs):
        inner(*args, **kwargs)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        throttled_sync_progress(interrupted, seen.append)("shell", "turtle")
    assert ProgressBar.draw is original and logbar_module._running_in_notebook_environment is check
    assert len(seen) == 1 and seen[0].rendered + seen[0].skipped >= 21


def test_a_logbar_with_another_draw_keeps_its_own(monkeypatch, caplog):
    import logging

    from logbar.progress import ProgressBar

    from defuser_quant.integrations.gptqmodel.save_progress import throttled_sync_progress

    def draw(self, force=False, extra=None):  # another signature than the one checked against
        return None

    monkeypatch.setattr(ProgressBar, "draw", draw)
    seen = []
    with caplog.at_level(logging.INFO):
        sync = throttled_sync_progress(_sync_like_gptqmodel(5), seen.append)
    assert "LogBar's own draw_rate kept" in caplog.text
    assert sync("shell", "turtle") == 5
    assert ProgressBar.draw is draw
    assert seen[0].disabled == {"draw_rate": "expected logbar.progress.ProgressBar.draw(self, force)"}
    assert seen[0].rendered == seen[0].skipped == 0  # nothing went through a rate limit
