"""Exceptions raised by ``defuser_quant.load``."""

from __future__ import annotations

from ..core.errors import DefuserQuantError


class LoadError(DefuserQuantError):
    """A checkpoint cannot be loaded as asked (unknown format, missing package, experts not kept as stored)."""
