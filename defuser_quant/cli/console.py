"""The console the subcommands print results to."""

from __future__ import annotations


def stdout_console():
    """A console for results: full width on a terminal, wide enough for module paths otherwise."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=200)
