"""Per-expert Gram products of one grouped call, for the quantizers' batched Hessian hooks.

A GPTQ Hessian hook adds ``X.T @ X`` of its module's input rows ``X`` to the module's Hessian.
In the grouped calibration forward every expert's rows are a consecutive span of the role's
input, so a batched hook converts that input once and takes each expert's product from views of
it: the same operands, strides and summation order as the per-expert hook's ``matmul``.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import torch

__all__ = ["PRODUCT_BUDGET", "QueuedAdds", "gram_operands"]

#: Products kept alive at once before their adds run as one multi-tensor kernel (bytes).
PRODUCT_BUDGET = 256 << 20


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
