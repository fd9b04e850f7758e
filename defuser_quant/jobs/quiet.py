"""Quiet by default: the quantizers' own output goes to a log file, ours to the terminal.

GPTQModel prints thousands of lines (banner, per-module tables, config dumps) and llm-compressor's
tqdm bars and loguru lines leak when output is piped. While a job runs, file descriptors 1 and 2
point at ``<output>/logs/quantizer.log``, so whatever a third party writes (Python or C, print,
tqdm, loguru, warnings) lands there; our progress and summary use a console on the terminal,
and our own loggers keep a handler on it. With ``-v`` (``echo``) the same output goes to the log
file and to the terminal.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, TextIO

#: The log file, relative to the output folder (named in the summary).
LOG_FILE = Path("logs") / "quantizer.log"
OUR_LOGGER = "defuser_quant"


def terminal_stream() -> TextIO | None:
    """A stream on the current stdout that keeps pointing at the terminal after redirection
    (None when stdout is no file descriptor, e.g. captured in memory: nothing to redirect then)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):
        return None
    sys.stdout.flush()
    return os.fdopen(os.dup(fd), "w", buffering=1, encoding="utf-8", closefd=True)


@contextlib.contextmanager
def third_party_output(log_file: Path, terminal: TextIO | None, enabled: bool = True, echo: bool = False) -> Iterator[Path | None]:
    """Send fds 1 and 2 to ``log_file`` for the block; our loggers keep writing to ``terminal``.

    With ``echo`` (``-v``) everything written to fds 1 and 2, ours included, goes to both the log
    file and where fd 1 pointed before."""
    if not enabled:
        yield None
        return
    log_file.parent.mkdir(parents=True, exist_ok=True)
    our_logger = logging.getLogger(OUR_LOGGER)
    ours = None
    if terminal is not None and not echo:
        ours = logging.StreamHandler(terminal)
        ours.setLevel(logging.WARNING)
        ours.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    with open(log_file, "ab") as log:
        pump = None
        if echo:
            read_end, write_end = os.pipe()
            pump = threading.Thread(target=_copy_to_both, args=(read_end, log, saved[1]), daemon=True)
            pump.start()
            target = write_end
        else:
            target = log.fileno()
        try:
            os.dup2(target, 1)
            os.dup2(target, 2)
            if ours is not None:
                our_logger.addHandler(ours)
                our_logger.propagate = False
            yield log_file
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            for fd, copy in saved.items():
                os.dup2(copy, fd)
            if pump is not None:
                os.close(write_end)  # the pump sees end of file once fds 1 and 2 no longer hold the pipe
                pump.join()
            for copy in saved.values():
                os.close(copy)
            if ours is not None:
                our_logger.removeHandler(ours)
                our_logger.propagate = True


def _copy_to_both(read_end: int, log: BinaryIO, terminal_fd: int) -> None:
    with os.fdopen(read_end, "rb", buffering=0) as source:
        while chunk := source.read(65536):
            log.write(chunk)
            with contextlib.suppress(OSError):  # a closed terminal must not lose the log
                os.write(terminal_fd, chunk)
