"""Writing results safely: a temporary folder beside the target, renamed into place at the end."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..core.errors import DefuserQuantError

logger = logging.getLogger(__name__)


class OutputDirError(DefuserQuantError):
    """The output folder cannot be written as asked."""


def check_output_dir(target: Path, overwrite: bool, protected: list[Path] = ()) -> None:
    """Refuse a non-empty target (unless ``overwrite``) and any target inside a protected input."""
    target = target.resolve()
    for path in protected:
        path = Path(path).resolve()
        if target == path or path in target.parents or target in path.parents:
            raise OutputDirError(f"output folder {target} overlaps the input {path}; choose another output folder")
    if target.exists() and not target.is_dir():
        raise OutputDirError(f"output path {target} exists and is not a folder")
    if target.is_dir() and any(target.iterdir()) and not overwrite:
        raise OutputDirError(
            f"output folder {target} is not empty; pass --overwrite (or output.overwrite: true) to replace it"
        )


@contextlib.contextmanager
def staged_output(target: Path, overwrite: bool, protected: list[Path] = ()) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``target``; on success it replaces ``target``.

    On any failure the temporary folder is removed and ``target`` is left as it was, so an
    interrupted job never leaves a folder that looks complete.
    """
    target = Path(target).resolve()
    check_output_dir(target, overwrite, protected)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(old)
    staging.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    logger.info("wrote %s", target)
