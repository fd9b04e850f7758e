"""Copy what is not a weight file (config, tokenizer, generation config, README, ...)."""

from __future__ import annotations

import fnmatch
import logging
import shutil
from pathlib import Path

logger = logging.getLogger(__name__)

# Weight files and their indexes: written anew (safetensors) or dropped (other formats).
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")


def is_weight_file(name: str) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in WEIGHT_PATTERNS)


def copy_side_files(src: Path, dst: Path, shards: list[str]) -> list[str]:
    """Copy every file of ``src`` except weight files and hidden directories (``.git``,
    ``.cache``) into ``dst``, keeping sub-directories. Returns the copied relative paths."""
    copied = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if any(part.startswith(".") for part in rel.parts[:-1]) or (path.is_dir() and rel.name.startswith(".")):
            continue
        if path.is_dir():
            continue
        if is_weight_file(rel.name):
            if rel.as_posix() not in shards and rel.name.endswith(".safetensors"):
                logger.warning("not copying %s: a safetensors file outside the model's index", rel)
            elif not rel.name.endswith((".safetensors", ".index.json")):
                logger.warning("not copying %s: convert writes safetensors only", rel)
            continue
        target = dst / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, target)
        copied.append(rel.as_posix())
    return copied
