"""Exceptions raised by the offline checkpoint converter."""

from __future__ import annotations

from ..core.errors import DefuserQuantError


class CheckpointError(DefuserQuantError):
    """A checkpoint cannot be converted as asked (bad input, unsafe destination, failed check)."""


class DestinationError(CheckpointError):
    """The destination directory is unsafe to write (SRC itself, inside SRC, or not empty)."""
