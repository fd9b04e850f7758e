"""At save, the LogBar parts of the lean bookkeeping around GPTQModel's lazy-source sync.

GPTQModel 7.6's save first syncs every module of the model with its lazy checkpoint source
(``LazyTurtle.sync_all_meta``, reached through ``alias_all_from_turtle_if_meta``) under a progress
bar it draws twice per module: about 1,700 draws for two Qwen3-30B-A3B layers, some 25 times that
for the whole model. Every draw renders the bar stack and asks LogBar's notebook and headless checks
again (a failed ``from IPython import get_ipython`` searches ``sys.path`` each time without IPython):
0.26 s of a 0.65 s save on a 2-core CPU, 0.45 s of 1.64 s on an H200 host (round 23's sampled save).

:func:`throttled_sync_progress` runs that call inside :func:`.overhead.lean_logbar` with the parts
that act on any bar (``progress``, ``draw_rate``, ``headless``): the same bar and texts, rendered at
most once per :data:`.overhead.DRAW_INTERVAL`, and the same checkpoint. A part whose LogBar
internals differ from what it was checked against stays LogBar's own (logged once, when installed).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .overhead import LOGBAR_PARTS, BookkeepingStats, lean_logbar, logbar_mismatch

__all__ = ["SaveDraws", "throttled_sync_progress"]

logger = logging.getLogger(__name__)


@dataclass
class SaveDraws:
    """What :func:`throttled_sync_progress` did in one save."""

    rendered: int = 0  # progress-bar draws passed on to LogBar
    skipped: int = 0  # ... dropped: the bar rendered less than DRAW_INTERVAL before
    disabled: dict[str, str] = field(default_factory=dict)  # part -> why LogBar's own runs


def throttled_sync_progress(original: Callable[..., int],
                            record: Callable[[SaveDraws], None] | None = None) -> Callable[..., int]:
    """``original`` (GPTQModel's ``alias_all_from_turtle_if_meta`` as the writer calls it) inside the
    LogBar parts that LogBar's internals allow; ``record`` gets each call's :class:`SaveDraws`."""
    disabled = logbar_mismatch()
    enabled = LOGBAR_PARTS - set(disabled)
    if disabled:
        logger.info("save: LogBar's own %s kept (%s)", ", ".join(sorted(disabled)), "; ".join(disabled.values()))

    @functools.wraps(original)
    def alias_all_from_turtle_if_meta(*args: Any, **kwargs: Any) -> int:
        stats = BookkeepingStats()
        try:
            with lean_logbar(enabled, stats):
                return original(*args, **kwargs)
        finally:
            if record is not None:
                record(SaveDraws(stats.draws_rendered, stats.draws_skipped, dict(disabled)))

    alias_all_from_turtle_if_meta.__defuser_quant_original__ = original  # type: ignore[attr-defined]
    return alias_all_from_turtle_if_meta
