"""Run a call on a thread of its own, as GPTQModel's device workers run solves (not the main thread)."""

from __future__ import annotations

import threading
from typing import Any


def on_fresh_thread(fn: Any, *args: Any, name: str = "benchmark-worker") -> Any:
    """``fn(*args)`` run on a new daemon thread: its result, or what it raised, raised again here.
    A Ctrl-C at the join ends the caller at once (the daemon thread is not waited for)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = fn(*args)
        except BaseException as exc:  # noqa: BLE001 - raised again on the caller's thread
            box["error"] = exc

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return box["result"]
