"""Per-expert Gram products of one grouped call, for the quantizers' batched Hessian hooks.

A GPTQ Hessian hook adds ``X.T @ X`` of its module's input rows ``X`` to the module's Hessian.
In the grouped calibration forward every expert's rows are a consecutive span of the role's
input, so a batched hook converts that input once and takes each expert's product from views of
it: the same operands, strides and summation order as the per-expert hook's ``matmul``.

Where every expert saw as many rows (``routing: all``'s whole-batch calls), :func:`gram_products`
takes the products of a GPU input from one ``bmm`` over ``[experts, rows, features]`` instead of one
``mm`` launch per expert, for each problem shape on which the ``bmm`` gave the ``mm`` products bit
for bit: both are computed on the shape's first call and compared, and a shape where they differ
keeps the ``mm`` per expert from then on. A ``bmm`` that ran the ``mm``'s kernel with its tiling and
reduction order gives its bits for every input; one that ran another could match on a first call's
hundreds of thousands of real products only by chance, so one check per shape decides.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from typing import NamedTuple

import torch

logger = logging.getLogger(__name__)

__all__ = ["PRODUCT_BUDGET", "STACKED_DEVICES", "QueuedAdds", "StackedShape", "gram_operands", "gram_products",
           "stacked_checks"]

#: Products kept alive at once before their adds run as one multi-tensor kernel (bytes).
PRODUCT_BUDGET = 256 << 20
#: Device types whose equal spans may take their products from one ``bmm`` (once checked per shape): the
#: GPU, where it saves a launch per expert. On the 2-core CPU a ``bmm`` inside a run was slower than the
#: ``mm`` calls it replaced (docs/performance.md, round 39).
STACKED_DEVICES = frozenset({"cuda"})


class StackedShape(NamedTuple):
    """One problem shape a ``bmm`` was checked on: ``[batch, rows, features]``, its strides, dtype, device and the
    process's matmul settings (float32 precision, TF32, deterministic algorithms) at the check."""

    shape: tuple[int, ...]
    strides: tuple[int, ...]
    dtype: torch.dtype
    device: str
    matmul_settings: tuple


#: Per problem shape: whether its ``bmm`` gave the ``mm`` bits.
_STACKED_EXACT: dict[StackedShape, bool] = {}
#: Shapes checked at most per process: calibration rows of many lengths (each a shape) would otherwise pay a check
#: (the ``bmm`` beside the ``mm`` calls, a comparison, a host sync) on most calls; shapes past it take an ``mm`` each.
MAX_STACKED_CHECKS = 128


class QueuedAdds:
    """``target += product`` for many pairs, queued and run as one ``_foreach_add_`` per budget's
    worth of products: the same elementwise adds, far fewer kernel launches."""

    def __init__(self, budget: int = PRODUCT_BUDGET) -> None:
        self.budget, self.held = budget, 0
        self.targets: list[torch.Tensor] = []
        self.products: list[torch.Tensor] = []

    def add(self, targets: list[torch.Tensor], product: torch.Tensor) -> None:
        self.targets += targets
        self.products += [product] * len(targets)
        self.held += product.numel() * product.element_size()
        if self.held >= self.budget:
            self.flush()

    def flush(self) -> None:
        if self.targets:
            torch._foreach_add_(self.targets, self.products)
        self.targets, self.products, self.held = [], [], 0


def _tiles(spans: list[tuple[int, int]], total: int) -> bool:
    """Whether the ``(start, size)`` spans cut ``total`` rows into consecutive pieces, in order."""
    starts = [start for start, _ in spans]
    ends = list(itertools.accumulate((size for _, size in spans), initial=0))
    return starts == ends[:-1] and ends[-1] == total


def gram_operands(rows: torch.Tensor, spans: list[tuple[int, int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(X.T, X)`` for the rows ``X = rows[start:start + size]`` of every ``(start, size)`` span, in
    order: views of the 2-D ``rows`` (two splits when the spans tile it, else a slice per span).
    ``torch.mm(*pair)`` is then the hook's ``matmul(X.T, X)`` on a contiguous ``X``."""
    if _tiles(spans, rows.shape[0]):
        sizes = [size for _, size in spans]
        return zip(rows.t().split(sizes, dim=1), rows.split(sizes))
    return ((rows[start:start + size].t(), rows[start:start + size]) for start, size in spans)


def _equal_tiles(spans: list[tuple[int, int]], total: int) -> int | None:
    """The common size of the spans when they cut ``total`` rows into equal consecutive pieces, in order."""
    if len(spans) < 2 or not _tiles(spans, total):
        return None
    size = spans[0][1]
    return size if size and all(s == size for _, s in spans) else None


def gram_products(rows: torch.Tensor, spans: list[tuple[int, int]],
                  budget: int = PRODUCT_BUDGET) -> Iterator[torch.Tensor]:
    """``X.T @ X`` (``torch.mm`` of :func:`gram_operands`' pair) for the rows ``X`` of every ``(start, size)``
    span of the 2-D ``rows``, in order. Spans that cut a :data:`STACKED_DEVICES` input into equal pieces take
    theirs from ``torch.bmm`` over ``[spans, size, features]``, ``budget`` bytes of products a call (two at
    least, else an ``mm`` each), on shapes where it gave the ``mm`` products bit for bit (module docstring)."""
    size = _equal_tiles(spans, rows.shape[0])
    per_call = budget // max(1, rows.shape[1] ** 2 * rows.element_size())  # products a bmm may hold
    if size is None or rows.device.type not in STACKED_DEVICES or per_call < 2:
        for inp, inp_t in gram_operands(rows, spans):
            yield torch.mm(inp, inp_t)
        return
    stacked = rows.unflatten(0, (len(spans), size))
    for lo in range(0, len(spans), per_call):
        yield from _stacked(stacked[lo:lo + per_call])


def _stacked(chunk: torch.Tensor) -> Iterator[torch.Tensor]:
    """Each ``[size, features]`` matrix ``x`` of ``chunk``: ``x.T @ x`` from one ``bmm`` where that is exact on this shape."""
    key = StackedShape(tuple(chunk.shape), chunk.stride(), chunk.dtype, str(chunk.device), _matmul_settings())
    exact = _STACKED_EXACT.get(key)
    if exact is False or (exact is None and len(_STACKED_EXACT) >= MAX_STACKED_CHECKS):
        for x in chunk:
            yield torch.mm(x.t(), x)
        return
    products = torch.bmm(chunk.transpose(1, 2), chunk)
    if exact is None:
        singles = [torch.mm(x.t(), x) for x in chunk]
        differs = torch.stack([torch.ne(a, b).any() for a, b in zip(products, singles)]).any()
        exact = _STACKED_EXACT[key] = not bool(differs)  # one host sync per shape
        logger.debug("Gram products of %d x %s on %s: one bmm %s the mm per expert", chunk.shape[0],
                     tuple(chunk.shape[1:]), chunk.device, "gives" if exact else "does not give; keeping")
        if not exact:
            yield from singles
            return
    yield from products.unbind(0)


def _matmul_settings() -> tuple:
    """The process settings that choose a float matmul's kernel (TF32, determinism): a check holds under its own."""
    return (torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
            torch.are_deterministic_algorithms_enabled())


def stacked_checks() -> dict[StackedShape, bool]:
    """The shapes checked so far and whether their ``bmm`` gave the ``mm`` products (a copy)."""
    return dict(_STACKED_EXACT)
