"""Writing results safely: a hidden folder beside the target, renamed into place at the end.

Everything that could stop the final rename (a non-empty or foreign target, a mount point, no
write permission, another run on the same target) is checked before any work starts. Leftovers
of killed runs (``.<name>.partial-<pid>-*``, ``.<name>.old-<pid>``) are cleaned on the next run
(``checkpoint.staging.clean_leftovers``, shared with ``convert``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..checkpoint.staging import clean_leftovers
from ..core.errors import DefuserQuantError

logger = logging.getLogger(__name__)

#: The file that marks a folder as an earlier job's output (the only kind ``overwrite`` replaces).
JOB_MARKER = "job.json"


class OutputDirError(DefuserQuantError):
    """The output folder cannot be written as asked."""


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(target: Path, overwrite: bool, protected: list[Path] = ()) -> Path:
    """Raise ``OutputDirError`` unless the result can be renamed into ``target`` at the end.

    A symlinked ``target`` is followed: the result is written where the link points and the
    link keeps pointing at it. Returns the resolved target.
    """
    target = Path(target).resolve()
    for path in protected:
        path = Path(path).resolve()
        if target == path or path in target.parents or target in path.parents:
            raise OutputDirError(f"output folder {target} overlaps the input {path}; choose another output folder")
    cwd = Path.cwd().resolve()
    if target == cwd or target in cwd.parents:
        raise OutputDirError(
            f"output folder {target} is the current folder or contains it; choose a new folder, e.g. {target / 'run'}"
        )
    if target.exists() and not target.is_dir():
        raise OutputDirError(f"output path {target} exists and is not a folder; choose another output folder")
    if target.is_dir() and os.path.ismount(target):
        raise OutputDirError(
            f"output folder {target} is a mount point: results are written beside it and renamed into place, "
            f"which a mount point cannot take; write into a folder inside it, e.g. {target / 'run'}"
        )
    parent = _nearest_existing(target.parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputDirError(f"cannot write in {parent} (permission denied); choose an output folder you can write to")
    if target.is_dir() and any(target.iterdir()):
        is_job_output = (target / JOB_MARKER).is_file()
        if not is_job_output:
            raise OutputDirError(
                f"output folder {target} is not empty and holds no {JOB_MARKER}, so it is not an earlier job's "
                "output; only such a folder may be replaced: choose an empty or new folder"
            )
        if not overwrite:
            raise OutputDirError(
                f"output folder {target} holds an earlier job's output; pass --overwrite (or output.overwrite: true "
                "in your job file) to replace it, or choose another folder"
            )
    return target


def _apply_umask(root: Path) -> None:
    # mkdtemp-style folders are 0700 and some writers use 0600 temporary files: give the
    # result the modes a plain mkdir/open would have.
    mask = _current_umask()
    for path in (root, *root.rglob("*")):
        if path.is_symlink():
            continue
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def _rename(src: Path, dst: Path) -> None:
    try:
        src.rename(dst)
    except OSError as exc:
        if exc.errno in (errno.EBUSY, errno.EXDEV, errno.EACCES, errno.EPERM):
            raise OutputDirError(
                f"cannot move the finished result {src} to {dst}: {exc.strerror}; it is kept at {src}: "
                f"move it yourself (mv {src} {dst})"
            ) from exc
        raise


@contextlib.contextmanager
def staged_output(target: Path, overwrite: bool, protected: list[Path] = ()) -> Iterator[Path]:
    """Yield a fresh hidden folder next to ``target``; on success it replaces ``target``.

    On any failure (Ctrl-C included) the staging folder is removed and ``target`` is left as
    it was, so an interrupted job never leaves a folder that looks complete.
    """
    target = check_output_dir(target, overwrite, protected)
    clean_leftovers(target)
    target = check_output_dir(target, overwrite, protected)  # a restored earlier output counts too
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.parent / f".{target.name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging.mkdir()
    except PermissionError as exc:
        raise OutputDirError(f"cannot create a folder in {target.parent}: {exc.strerror}") from exc
    try:
        yield staging
        _apply_umask(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        _rename(target, old)
    try:
        _rename(staging, target)
    except BaseException:
        if old is not None:
            old.rename(target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("wrote %s", target)
