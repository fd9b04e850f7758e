"""Safe destinations: refuse to touch SRC, write into a hidden sibling, rename at the end.

An interrupted conversion (an exception, Ctrl-C) removes its staging directory; a killed one
leaves only ``.<DST>.partial-<pid>-*`` next to DST, never a DST that looks complete, and the next
run cleans it up (``clean_leftovers``; ``defuser-quant run`` uses the same).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from .errors import DestinationError

logger = logging.getLogger(__name__)


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.(?P<kind>partial|old)-(?P<tag>.+)$")
_PID_TAG = re.compile(r"^(?P<pid>\d+)(?:-[0-9a-f]+)?$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_leftovers(dst: Path) -> list[str]:
    """Deal with what killed runs left beside ``dst``; returns what was done, one line each.

    ``.<name>.partial-<pid>-*`` / ``.<name>.old-<pid>*`` of a dead process are removed, except an
    ``.old`` folder whose replacement never arrived: that is the earlier ``dst``, renamed back. A
    leftover of a process that still runs means another run writes ``dst``: refused. Leftovers
    without a process id (older versions) are reported with the command that removes them.
    """
    done: list[str] = []
    if not dst.parent.is_dir():
        return done
    for path in sorted(dst.parent.iterdir()):
        match = _LEFTOVER.match(path.name)
        if not match or match["name"] != dst.name or not path.is_dir() or path.is_symlink():
            continue
        tag = _PID_TAG.match(match["tag"])
        if tag is None:
            done.append(f"{path} is left from an interrupted run; remove it with: rm -rf '{path}'")
            continue
        pid = int(tag["pid"])
        if _pid_alive(pid):
            raise DestinationError(
                f"{path} belongs to process {pid}, which still runs: another run is writing {dst}; wait for it, "
                f"or if process {pid} is not a defuser-quant run, remove {path}"
            )
        if match["kind"] == "old" and not dst.exists():
            path.rename(dst)
            done.append(f"restored {dst} from {path.name} (a run was killed while replacing it)")
            continue
        shutil.rmtree(path)
        done.append(f"removed {path} (left by killed process {pid})")
    for line in done:
        logger.warning("%s", line)
    return done


def _within(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """Raise ``DestinationError`` unless writing DST can never touch SRC and DST may be replaced."""
    src_r, dst_r = src.resolve(), dst.resolve()
    if dst_r == src_r:
        raise DestinationError(f"DST is SRC ({src}); convert never writes into its source, pick another directory")
    if _within(dst_r, src_r):
        raise DestinationError(f"DST {dst} lies inside SRC {src}; pick a directory outside the source checkpoint")
    if _within(src_r, dst_r):
        raise DestinationError(f"SRC {src} lies inside DST {dst}; replacing DST would destroy the source")
    if dst.exists() and not dst.is_dir():
        raise DestinationError(f"DST {dst} exists and is not a directory")
    if dst_r.is_dir() and os.path.ismount(dst_r):
        raise DestinationError(
            f"DST {dst} is a mount point: the result is written beside it and renamed into place, which a mount "
            f"point cannot take; write into a directory inside it, e.g. {dst / 'converted'}"
        )
    parent = dst_r.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise DestinationError(f"cannot write in {parent} (permission denied); choose a DST you can write to")
    if dst.is_dir() and any(dst.iterdir()) and not overwrite:
        raise DestinationError(f"DST {dst} is not empty; pass --overwrite (overwrite=True) to replace it")


@contextlib.contextmanager
def staged_directory(dst: Path) -> Iterator[Path]:
    """Yield a fresh hidden directory next to ``dst``; on success it replaces ``dst``, on any
    exception (KeyboardInterrupt included) it is removed and ``dst`` is left as it was.

    A symlinked ``dst`` is followed: the result replaces the directory the link points to, and
    the link keeps pointing at it."""
    dst = dst.resolve()
    dst.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(dst)
    stage = dst.parent / f".{dst.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    try:
        yield stage
        _replace(stage, dst)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


def _replace(stage: Path, dst: Path) -> None:
    backup = None
    if dst.is_dir():
        backup = dst.parent / f".{dst.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        dst.rename(backup)
    try:
        stage.rename(dst)
    except BaseException:
        if backup is not None:
            backup.rename(dst)
        raise
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
    logger.debug("renamed %s -> %s", stage, dst)
