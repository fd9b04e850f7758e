"""Writing a benchmark's report."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path


def write_text(path: Path, text: str) -> None:
    """``text`` to ``path`` whole or not at all: a temporary file beside it, renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_json(path: Path, data: dict) -> None:
    """``data`` to ``path`` as JSON, whole or not at all (:func:`write_text`)."""
    write_text(path, json.dumps(data, indent=2) + "\n")


def emit_json(path: Path | None, data: dict) -> None:
    """``data`` to ``path`` (:func:`write_json`, whole or not at all), or printed where no path is given."""
    if path is not None:
        write_json(path, data)
    else:
        print(json.dumps(data, indent=1))


def write_gzipped(src: Path, dst: Path) -> None:
    """``src`` gzipped into ``dst`` whole or not at all, like :func:`write_json`."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.tmp")
    with src.open("rb") as f, gzip.open(tmp, "wb") as g:
        shutil.copyfileobj(f, g)
    tmp.replace(dst)
