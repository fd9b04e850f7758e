"""Command-line value types shared by the benchmarks."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable


def counts(minimum: int) -> Callable[[str], list[int]]:
    """An argparse type: ``"2,4"`` -> [2, 4], empty -> [], each at least ``minimum``; anything
    else is refused with a message that says what was expected."""

    def parse(text: str) -> list[int]:
        try:
            values = [int(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers, got {text!r}") from None
        if any(n < minimum for n in values):
            raise argparse.ArgumentTypeError(f"counts must be >= {minimum}, got {text!r}")
        return values

    return parse


def whole(minimum: int) -> Callable[[str], int]:
    """An argparse type: one whole number, at least ``minimum``; anything else is refused with a
    message that says what was expected."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


def names(choices: Iterable[str]) -> Callable[[str], list[str]]:
    """An argparse type: ``"a, b"`` -> ["a", "b"] in the order given, each one of ``choices``; an
    unknown name, or none at all, is refused with a message that lists the choices."""
    allowed = list(choices)

    def parse(text: str) -> list[str]:
        values = [part.strip() for part in text.split(",") if part.strip()]
        unknown = [value for value in values if value not in allowed]
        if unknown or not values:
            raise argparse.ArgumentTypeError(f"unknown or none {unknown}; choose from {', '.join(allowed)}")
        return values

    return parse


def check_shape(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Refuse, through ``p.error``, MoE shape flags that each pass but do not fit together: more top-k than
    experts, and (where the script has them) attention heads that are not a multiple of the key/value heads."""
    if args.top_k > args.experts:
        p.error(f"--top-k {args.top_k} is more than --experts {args.experts}: each token picks top-k of the experts")
    if hasattr(args, "heads") and args.heads % args.kv_heads:
        p.error(f"--heads {args.heads} is not a multiple of --kv-heads {args.kv_heads} (grouped-query attention)")
