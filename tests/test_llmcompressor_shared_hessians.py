"""Shared gate/up Hessian accumulation in ``routing: all`` (``integrations.llmcompressor.hessians``).

Every gate and up projection of a block sees the same rows there, so one accumulator takes each
call's product and the Hessians are written from it before they are read. The references below are
GPTQModifier's own hooks, called one module at a time by the per-expert loop.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("llmcompressor")

from llmcompressor.modifiers.gptq import GPTQModifier  # noqa: E402

from defuser_quant.calibration.routing import whole_batch_forward  # noqa: E402
from defuser_quant.integrations.llmcompressor import hessians  # noqa: E402
from defuser_quant.integrations.llmcompressor.hessians import (  # noqa: E402
    SharedHessianError,
    batched_gptq_hessians,
    last_batching,
    settle_shared_hessians,
)
from test_llmcompressor_grouped import _gptq_hooked_block, _hessians  # noqa: E402

CALLS = 4


def _batches(x: torch.Tensor) -> list[torch.Tensor]:
    return [x * (1 + 0.25 * i) for i in range(CALLS)]


def _reference(looped, m_loop, x, index, weights, upto: int = CALLS, tamper=None) -> list[tuple[torch.Tensor, float]]:
    """The hooks' own Hessians: every call through the per-expert loop, outside any batched block."""
    with torch.no_grad():
        for i, batch in enumerate(_batches(x)[:upto]):
            whole_batch_forward(looped, batch, index, weights, grouped=False)
            if tamper is not None and i == 0:
                tamper(m_loop, looped)
    return _hessians(looped, m_loop)


def _gate(modifier, block, expert: int = 0) -> torch.Tensor:
    return modifier._hessians[block[expert].gate_proj]


def _assert_same(got, want) -> None:
    assert len(got) == len(want) > 0
    for (h, n), (h_ref, n_ref) in zip(got, want, strict=True):
        assert n == n_ref and torch.equal(h, h_ref)


def test_the_gate_and_up_hessians_share_one_accumulator_and_settle_to_the_hooks_bit_for_bit():
    (grouped, looped), (m_grouped, m_loop), (x, index, weights) = _gptq_hooked_block()
    want = _reference(looped, m_loop, x, index, weights)
    with torch.no_grad(), batched_gptq_hessians() as recognised:
        assert recognised
        for batch in _batches(x):
            whole_batch_forward(grouped, batch, index, weights, grouped=True)
        stats = last_batching()
        pending = hessians._SHARING.groups
        assert stats.shared_groups == 1 and len(pending) == 1 and stats.settles == 0
        experts = len(grouped)
        assert stats.shared_adds == 2 * experts * (CALLS - 1)  # every call after the first (the hooks allocate)
        # the Hessians themselves still hold the first call only: the adds went to the accumulator
        (group,) = pending.values()
        assert not torch.equal(_gate(m_grouped, grouped), _gate(m_loop, looped))
        assert torch.equal(group.acc, _gate(m_loop, looped))
        settle_shared_hessians()
        assert not hessians._SHARING.groups and last_batching().settles == 1
        _assert_same(_hessians(grouped, m_grouped), want)
    assert hessians._SHARING is None


def test_the_block_end_settles_what_is_pending_and_restores_compress_modules():
    original = GPTQModifier.__dict__["compress_modules"]
    (grouped, looped), (m_grouped, m_loop), (x, index, weights) = _gptq_hooked_block()
    want = _reference(looped, m_loop, x, index, weights)
    with torch.no_grad(), batched_gptq_hessians():
        assert GPTQModifier.__dict__["compress_modules"] is not original
        for batch in _batches(x):
            whole_batch_forward(grouped, batch, index, weights, grouped=True)
        assert hessians._SHARING.groups
    assert GPTQModifier.__dict__["compress_modules"] is original
    _assert_same(_hessians(grouped, m_grouped), want)


def test_gptqs_solve_sees_the_settled_hessians(monkeypatch):
    """GPTQModifier.compress_modules is where the Hessians are read: inside the block it settles first."""
    seen = {}

    def snapshot(self):
        seen.update({m: h.clone() for m, h in self._hessians.items()})

    monkeypatch.setattr(GPTQModifier, "compress_modules", snapshot)
    (grouped, looped), (m_grouped, m_loop), (x, index, weights) = _gptq_hooked_block()
    want = _reference(looped, m_loop, x, index, weights)
    with torch.no_grad(), batched_gptq_hessians():
        for batch in _batches(x):
            whole_batch_forward(grouped, batch, index, weights, grouped=True)
        assert hessians._SHARING.groups
        m_grouped.compress_modules()
        assert not hessians._SHARING.groups
    got = [(seen[m], float(m_grouped._num_samples[m])) for e in grouped for m in e.children()]
    _assert_same(got, want)
    assert GPTQModifier.__dict__["compress_modules"] is snapshot


def test_a_per_expert_loop_settles_first_and_then_adds_as_the_hooks():
    (grouped, looped), (m_grouped, m_loop), (x, index, weights) = _gptq_hooked_block()
    want = _reference(looped, m_loop, x, index, weights)
    with torch.no_grad(), batched_gptq_hessians():
        for i, batch in enumerate(_batches(x)):
            whole_batch_forward(grouped, batch, index, weights, grouped=i != CALLS - 1)  # the last call loops
        assert last_batching().shared_groups == 1 and last_batching().settles == 1
        assert not hessians._SHARING.groups
    _assert_same(_hessians(grouped, m_grouped), want)


def test_hessians_that_differ_do_not_share():
    def tamper(modifier, block):  # one gate Hessian differs from the others after the first call
        _gate(modifier, block, 1)[0, 0] += 1.0

    (grouped, looped), (m_grouped, m_loop), (x, index, weights) = _gptq_hooked_block()
    want = _reference(looped, m_loop, x, index, weights, tamper=tamper)
    with torch.no_grad(), batched_gptq_hessians():
        for i, batch in enumerate(_batches(x)):
            whole_batch_forward(grouped, batch, index, weights, grouped=True)
            if i == 0:
                tamper(m_grouped, grouped)
        assert last_batching().shared_groups == 0 and last_batching().share_refused == 1
    _assert_same(_hessians(grouped, m_grouped), want)


def test_a_hessian_written_elsewhere_meanwhile_is_refused_loudly():
    (grouped, _), (m_grouped, _), (x, index, weights) = _gptq_hooked_block()
    with torch.no_grad(), batched_gptq_hessians():
        for batch in _batches(x)[:2]:
            whole_batch_forward(grouped, batch, index, weights, grouped=True)
        (group,) = hessians._SHARING.groups.values()
        _gate(m_grouped, grouped, 2).add_(1.0)  # e.g. another modifier calling a GPTQ hook directly
        with pytest.raises(SharedHessianError, match=r"share_hessians=False"):
            whole_batch_forward(grouped, _batches(x)[2], index, weights, grouped=True)
        assert not hessians._SHARING.groups  # the others were written, nothing is left pending
        untouched = _gate(m_grouped, grouped, 0)
        assert torch.equal(untouched, group.acc)


def test_sharing_off_and_a_compress_modules_override_keep_one_add_per_hessian():
    (grouped, looped), (m_grouped, m_loop), (x, index, weights) = _gptq_hooked_block()
    want = _reference(looped, m_loop, x, index, weights)
    with torch.no_grad(), batched_gptq_hessians(share=False):
        assert "compress_modules" in GPTQModifier.__dict__
        for batch in _batches(x):
            whole_batch_forward(grouped, batch, index, weights, grouped=True)
        assert last_batching().shared_groups == 0 and last_batching().batched > 0
    _assert_same(_hessians(grouped, m_grouped), want)

    class OwnSolve(GPTQModifier):
        def compress_modules(self):  # solves without the settle: its Hessians must never be pending
            pass

    (grouped, looped), _, (x, index, weights) = _gptq_hooked_block()
    own, reference = OwnSolve(targets="Linear", scheme="W4A16"), OwnSolve(targets="Linear", scheme="W4A16")
    for block, modifier in ((grouped, own), (looped, reference)):
        for expert in block:
            for linear in expert.children():
                linear._forward_hooks.clear()
                modifier.register_hook(linear, modifier.calibrate_module, "forward")
    want = _reference(looped, reference, x, index, weights)
    with torch.no_grad(), batched_gptq_hessians():
        for batch in _batches(x):
            whole_batch_forward(grouped, batch, index, weights, grouped=True)
        assert last_batching().shared_groups == 0 and last_batching().batched > 0
    _assert_same(_hessians(grouped, own), want)


def test_ctrl_c_mid_calibration_leaves_the_hessians_of_the_calls_that_ran():
    (grouped, looped), (m_grouped, m_loop), (x, index, weights) = _gptq_hooked_block()
    want = _reference(looped, m_loop, x, index, weights, upto=3)
    calls = []

    def interrupt_on_fourth(module, args):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt

    handle = grouped[0].gate_proj.register_forward_pre_hook(interrupt_on_fourth)
    original = GPTQModifier.__dict__["compress_modules"]
    try:
        with pytest.raises(KeyboardInterrupt), torch.no_grad(), batched_gptq_hessians():
            for batch in _batches(x):
                whole_batch_forward(grouped, batch, index, weights, grouped=True)
    finally:
        handle.remove()
    assert len(calls) == 4 and hessians._SHARING is None
    assert GPTQModifier.__dict__["compress_modules"] is original
    _assert_same(_hessians(grouped, m_grouped), want)


def test_routed_calls_never_share():
    """Routed: each expert's gate and up share a product, two Hessians, under the sharing threshold."""
    from defuser_quant.calibration.grouped import grouped_routed_forward

    (grouped, _), _, (x, index, weights) = _gptq_hooked_block()
    with torch.no_grad(), batched_gptq_hessians():
        for batch in _batches(x):
            grouped_routed_forward(grouped, batch, index, weights)
        assert last_batching().batched > 0 and last_batching().shared_groups == 0


@pytest.mark.parametrize("bmm_rounds_otherwise", [False, True])
def test_the_down_products_from_one_bmm_give_the_hooks_hessians(monkeypatch, bmm_rounds_otherwise):
    """Every expert's down projection sees the whole batch: its products come from one bmm (the CPU let in as a
    stacked device), and the Hessians are the hooks' bit for bit; a bmm that rounds otherwise is dropped at its
    first call and the Hessians are still the hooks'."""
    from defuser_quant.calibration import gram

    monkeypatch.setattr(gram, "STACKED_DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(gram, "_STACKED_EXACT", {})
    calls = []
    real = torch.ops.aten.bmm

    def bmm(a, b):
        calls.append(tuple(a.shape))
        out = real(a, b)
        return torch.nextafter(out, torch.full_like(out, float("inf"))) if bmm_rounds_otherwise else out

    monkeypatch.setattr(gram.torch, "bmm", bmm)
    (grouped, looped), (m_grouped, m_loop), (x, index, weights) = _gptq_hooked_block()
    want = _reference(looped, m_loop, x, index, weights)
    with torch.no_grad(), batched_gptq_hessians():
        for batch in _batches(x):
            whole_batch_forward(grouped, batch, index, weights, grouped=True)
    _assert_same(_hessians(grouped, m_grouped), want)
    checks = gram.stacked_checks()
    assert len(checks) == 1 and list(checks.values()) == [not bmm_rounds_otherwise]
    (shape,) = checks
    assert shape.shape[0] == len(grouped)  # the down projections of every expert in one bmm
    # the first call allocates through the hooks; every later one stacks (or, dropped, only the first of them tried)
    assert len(calls) == (CALLS - 1 if not bmm_rounds_otherwise else 1)
