"""Progress bars for long work (tqdm), quiet for short loops and non-interactive use."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TypeVar

T = TypeVar("T")


def progress(items: Sequence[T], desc: str, show: bool | None = None, threshold: int = 8) -> Iterable[T]:
    """Wrap ``items`` in a tqdm bar when ``show`` (default: more than ``threshold`` items)."""
    if show is None:
        show = len(items) > threshold
    if not show:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit="block", leave=False)
