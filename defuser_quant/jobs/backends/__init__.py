"""One module per quantizer backend; each exposes ``run(context) -> BackendResult``."""

from __future__ import annotations

import importlib
from typing import Any


def get_backend(name: str) -> Any:
    """The backend module for ``name`` (imported lazily: the quantizer may not be installed)."""
    return importlib.import_module(f"{__name__}.{name}")
