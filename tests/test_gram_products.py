"""Gram products of equal spans from one ``bmm`` (``calibration.gram.gram_products``), kept only where exact.

The GPU is the device it is meant for (``STACKED_DEVICES``); these tests let the CPU in, and stand a
``bmm`` that rounds differently in for one that runs another kernel.
"""

from __future__ import annotations

import pytest
import torch

from defuser_quant.calibration import gram


@pytest.fixture
def cpu_stacked(monkeypatch):
    """The CPU counted as a stacked device, with no shape checked yet; yields the ``bmm`` calls made."""
    monkeypatch.setattr(gram, "STACKED_DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(gram, "_STACKED_EXACT", {})
    calls = []
    real = torch.bmm

    def counting(a, b):
        calls.append(tuple(a.shape))
        return real(a, b)

    monkeypatch.setattr(gram.torch, "bmm", counting)
    yield calls


def _rows(experts: int = 8, size: int = 24, features: int = 40) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(experts * size, features, generator=gen)
    return rows, [(e * size, size) for e in range(experts)]


def _mm_products(rows: torch.Tensor, spans: list[tuple[int, int]]) -> list[torch.Tensor]:
    return [torch.mm(rows[a:a + n].t(), rows[a:a + n]) for a, n in spans]


@pytest.mark.parametrize("budget", [40 * 40 * 4 * 2, 40 * 40 * 4 * 3, gram.PRODUCT_BUDGET])
def test_equal_spans_take_their_products_from_one_bmm_bit_for_bit(cpu_stacked, budget):
    rows, spans = _rows()
    got = list(gram.gram_products(rows, spans, budget))
    want = _mm_products(rows, spans)
    assert len(got) == len(want) == 8 and all(torch.equal(g, w) for g, w in zip(got, want))
    per_call = budget // (40 * 40 * 4)
    assert [shape[0] for shape in cpu_stacked] == [min(per_call, 8 - lo) for lo in range(0, 8, per_call)]
    assert all(gram.stacked_checks().values()) and gram.stacked_checks()


@pytest.mark.parametrize("budget", [1, 40 * 40 * 4, 40 * 40 * 4 * 2 - 1])
def test_a_budget_under_two_products_takes_an_mm_each(cpu_stacked, budget):
    rows, spans = _rows()
    got = list(gram.gram_products(rows, spans, budget))
    assert not cpu_stacked and not gram.stacked_checks()
    assert all(torch.equal(g, w) for g, w in zip(got, _mm_products(rows, spans), strict=True))


def test_a_shape_checked_once_is_not_checked_again(cpu_stacked, monkeypatch):
    rows, spans = _rows()
    list(gram.gram_products(rows, spans))
    stacks = []
    real_stack = torch.stack
    monkeypatch.setattr(gram.torch, "stack", lambda ts: stacks.append(len(ts)) or real_stack(ts))
    got = list(gram.gram_products(rows * 2, spans))
    assert not stacks and len(cpu_stacked) == 2  # the second call: the bmm alone, no comparison
    assert all(torch.equal(g, w) for g, w in zip(got, _mm_products(rows * 2, spans)))


def test_a_bmm_that_rounds_otherwise_is_dropped_for_its_shape(cpu_stacked, monkeypatch):
    """A bmm that differs from the mm's in the last bit (another kernel) is caught on the shape's first call: the
    mm products are used, and the shape keeps the mm per expert from then on (no bmm at all)."""
    real = torch.ops.aten.bmm  # torch.bmm is the fixture's counter already
    monkeypatch.setattr(gram.torch, "bmm", lambda a, b: cpu_stacked.append(tuple(a.shape)) or torch.nextafter(
        real(a, b), torch.tensor(float("inf"))))
    rows, spans = _rows()
    for scale in (1.0, 3.0):
        got = list(gram.gram_products(rows * scale, spans))
        assert all(torch.equal(g, w) for g, w in zip(got, _mm_products(rows * scale, spans), strict=True))
    assert len(cpu_stacked) == 1 and list(gram.stacked_checks().values()) == [False]
    # another shape is checked on its own
    rows3, spans3 = _rows(experts=3)
    list(gram.gram_products(rows3, spans3))
    assert len(cpu_stacked) == 2 and sorted(gram.stacked_checks().values()) == [False, False]


@pytest.mark.parametrize("spans", [
    [(0, 24), (24, 24)],  # equal but the device is not a stacked one (checked with STACKED_DEVICES left as is)
])
def test_the_cpu_is_not_a_stacked_device_by_default(monkeypatch, spans):
    monkeypatch.setattr(gram, "_STACKED_EXACT", {})
    called = []
    monkeypatch.setattr(gram.torch, "bmm", lambda *a: called.append(a))
    rows = torch.randn(48, 16)
    got = list(gram.gram_products(rows, spans))
    assert not called and all(torch.equal(g, w) for g, w in zip(got, _mm_products(rows, spans)))
    assert "cuda" in gram.STACKED_DEVICES and "cpu" not in gram.STACKED_DEVICES


@pytest.mark.parametrize("spans", [
    [(0, 24), (24, 23)],          # unequal sizes (routed calls)
    [(0, 24), (25, 23)],          # a gap
    [(0, 48)],                    # one span
    [(0, 24), (24, 24), (0, 24)],  # not in order
])
def test_spans_that_are_not_equal_tiles_take_an_mm_each(cpu_stacked, spans):
    rows = torch.randn(48, 16)
    got = list(gram.gram_products(rows, spans))
    assert not cpu_stacked and len(got) == len(spans)
    assert all(torch.equal(g, w) for g, w in zip(got, _mm_products(rows, spans)))


def test_a_check_holds_under_its_own_matmul_settings(cpu_stacked):
    """A shape checked with TF32 off is checked again with it on (and with deterministic algorithms): the kernels may differ."""
    rows, spans = _rows()
    list(gram.gram_products(rows, spans))
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("high")
        list(gram.gram_products(rows, spans))
    finally:
        torch.set_float32_matmul_precision(before)
    with_det = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        list(gram.gram_products(rows, spans))
    finally:
        torch.use_deterministic_algorithms(with_det)
    assert len(gram.stacked_checks()) == 3 and len(cpu_stacked) == 3
    list(gram.gram_products(rows, spans))  # back under the first settings: no new check
    assert len(gram.stacked_checks()) == 3


def test_shapes_past_the_check_limit_take_an_mm_each(cpu_stacked, monkeypatch):
    """Rows of many lengths: the first shapes are checked and stacked, the ones past the limit are not checked."""
    monkeypatch.setattr(gram, "MAX_STACKED_CHECKS", 2)
    for size in (24, 20, 16, 24):
        rows, spans = _rows(size=size)
        got = list(gram.gram_products(rows, spans))
        assert all(torch.equal(g, w) for g, w in zip(got, _mm_products(rows, spans), strict=True))
    assert len(gram.stacked_checks()) == 2
    assert [shape[1] for shape in cpu_stacked] == [40, 40, 40]  # 24 and 20 checked, 16 past the limit, 24 again
    assert [shape[2] for shape in cpu_stacked] == [24, 20, 24]
