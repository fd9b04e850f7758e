"""Reading a model's config: the text model's part of a config that nests one."""

from __future__ import annotations

from typing import Any

__all__ = ["text_config"]


def text_config(config: Any) -> Any:
    """The text model's config of ``config`` (Transformers' ``get_text_config()``; itself where there is none)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config
