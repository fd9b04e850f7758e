"""Batchable hooks queued in bulk: a role whose modules each carry one hook of one registered kind
and owner is queued with C-level maps, and that classification is kept between calls only while
the very same hook objects sit in the same places.

Every test compares what the hooks received with the per-expert loop on the same block."""

from __future__ import annotations

import pytest
import torch

from defuser_quant.calibration import grouped
from defuser_quant.calibration.grouped import BatchedForwardHook, grouped_routed_forward
from test_grouped_plan_cache import _block, _inputs


class Recorder:
    """A hook object; its kind runs it in bulk, writing ``(expert name, rows)`` to its ``log``."""

    def __init__(self, log: list, name: str, pre: bool = False):
        self.log, self.name, self.pre = log, name, pre

    def __call__(self, module, args, output=None):  # the per-module call (the loop, or not batched)
        self.log.append((self.name, args[0].clone()))


def _kind(pre: bool) -> BatchedForwardHook:
    def match(hook):
        if type(hook) is not Recorder or hook.pre is not pre:
            return None
        return hook.log, hook.name

    def run(log, members):
        for _module, name, rows, start, size in members:
            log.append((name, rows[start:start + size].clone()))

    return BatchedForwardHook(match=match, run=run, pre=pre)


@pytest.fixture
def kinds():
    grouped.register_batched_hook("test.post", _kind(False))
    grouped.register_batched_hook("test.pre", _kind(True))
    yield
    grouped.unregister_batched_hook("test.post")
    grouped.unregister_batched_hook("test.pre")


def _hook_all(block, log: list, pre: bool, role: str = "up_proj", tag: str = "") -> list:
    handles = []
    for e, expert in enumerate(block):
        hook = Recorder(log, f"{tag}{e}", pre)
        linear = getattr(expert, role)
        handles.append(linear.register_forward_pre_hook(hook) if pre else linear.register_forward_hook(hook))
    return handles


def _by_name(log: list) -> dict:
    return {name: rows for name, rows in log}


def _check(block, x, index, weights, *logs: list) -> None:
    """Grouped call, then the loop: in every log the grouped hooks logged what the loop's did, row for row."""
    starts = [len(log) for log in logs]
    with torch.no_grad():
        got = grouped_routed_forward(block, x, index, weights)
        middle = [len(log) for log in logs]
        ref = block.routed_forward(x, index, weights)
    assert torch.equal(got, ref)
    for log, a, b in zip(logs, starts, middle):
        mine, theirs = _by_name(log[a:b]), _by_name(log[b:])
        assert sorted(mine) == sorted(theirs) and len(log[a:b]) == len(log[b:])
        for name, rows in theirs.items():
            assert torch.equal(mine[name], rows)


@pytest.mark.parametrize("pre", [False, True])
def test_bulk_hooks_see_the_loops_rows_and_follow_swapped_hooks(kinds, monkeypatch, pre):
    _, block = _block()
    x, index, weights = _inputs(block)
    first: list = []
    handles = _hook_all(block, first, pre)
    runs = []
    original = grouped._Batches.extend
    monkeypatch.setattr(grouped._Batches, "extend", lambda self, *a: runs.append(1) or original(self, *a))
    _check(block, x, index, weights, first)
    assert runs, "one hook of one kind on every module: queued in bulk"
    # the same number of hooks, new objects with another owner: the kept classification must not be reused
    for h in handles:
        h.remove()
    second: list = []
    handles = _hook_all(block, second, pre, tag="b")
    first.clear()
    _check(block, x, index, weights, second)
    assert first == [] and all(name.startswith("b") for name, _ in second)
    # one module's hook swapped for a plain function: no bulk; it is called per module with its rows
    handles[3].remove()
    plain: list = []
    linear = block[3].up_proj
    fn = (lambda m, a: plain.append(("p", a[0].clone()))) if pre else (lambda m, a, out: plain.append(("p", a[0].clone())))
    handles[3] = linear.register_forward_pre_hook(fn) if pre else linear.register_forward_hook(fn)
    runs.clear()
    second.clear()
    _check(block, x, index, weights, second, plain)
    assert not runs and plain, "one module without a batchable hook: no bulk; its plain hook is called with its rows"
    assert "b3" not in _by_name(second)
    for h in handles:
        h.remove()


def test_a_pre_kind_runs_only_pre_hooks_and_a_forward_kind_only_forward_hooks(kinds):
    _, block = _block()
    log: list = []
    # Recorders flagged as pre registered as forward hooks, and the reverse: neither kind may take them
    handles = [expert.gate_proj.register_forward_hook(Recorder(log, f"g{e}", pre=True)) for e, expert in enumerate(block)]
    handles += [expert.down_proj.register_forward_pre_hook(Recorder(log, f"d{e}")) for e, expert in enumerate(block)]
    called = []
    for name in ("test.post", "test.pre"):
        kind = grouped._BATCHED[name]
        grouped.register_batched_hook(name, BatchedForwardHook(match=kind.match, run=lambda o, m: called.append(m), pre=kind.pre))
    _check(block, *_inputs(block), log)
    assert called == []  # every hook was called per module, as the loop calls it
    for h in handles:
        h.remove()


def test_registering_a_kind_drops_the_kept_classification(kinds):
    _, block = _block()
    x, index, weights = _inputs(block)
    log: list = []
    handles = _hook_all(block, log, pre=False)
    _check(block, x, index, weights, log)
    # the same hooks, now recognised by another kind: its run must be the one called
    grouped.unregister_batched_hook("test.post")
    other = _kind(False)
    runs: list = []
    grouped.register_batched_hook("test.other", BatchedForwardHook(
        match=other.match, run=lambda owner, members: runs.append(len(members)) or other.run(owner, members)))
    try:
        _check(block, x, index, weights, log)
    finally:
        grouped.unregister_batched_hook("test.other")
    assert runs and sum(runs) == len(log) // 2 // 2  # half of the two calls' entries are the grouped call's
    for h in handles:
        h.remove()


def test_a_hooks_off_call_between_two_hooked_ones_keeps_the_bulk_finding(kinds, monkeypatch):
    """``all``'s whole-batch forward alternates a hooks-off routed call with a hooked whole-batch call:
    the finding of the hooked calls survives the hooks-off one (no classification per call)."""
    from defuser_quant.calibration.routing import whole_batch_forward

    _, block = _block()
    x, index, weights = _inputs(block)
    log: list = []
    _hook_all(block, log, pre=False, role="down_proj", tag="d")
    _hook_all(block, log, pre=True, role="gate_proj", tag="g")
    found = []
    real = grouped._bulk_kind
    monkeypatch.setattr(grouped, "_bulk_kind", lambda *a: found.append(1) or real(*a))
    with torch.no_grad():
        whole_batch_forward(block, x, index, weights, grouped=True)
        first = len(found)
        assert first > 0 and len(log) == 2 * len(block)
        for _ in range(2):
            whole_batch_forward(block, x, index, weights, grouped=True)
    assert len(found) == first and len(log) == 6 * len(block)
    # every expert's hooks saw the whole batch: the gate its rows themselves, the down projection as many
    assert all(torch.equal(rows, x) for name, rows in log if name.startswith("g"))
    assert all(rows.shape[0] == x.shape[0] for name, rows in log if name.startswith("d"))


def test_the_routed_call_of_all_suspends_hooks_on_nested_expert_modules():
    """Hooks on every module of an expert, nested ones included, are off for ``all``'s routed output:
    only the whole-batch calls reach them (one call per expert and module)."""
    from defuser_quant.calibration.routing import _expert_modules, whole_batch_forward

    _, block = _block()
    x, index, weights = _inputs(block)
    block[0].down_proj.probe = torch.nn.Identity()  # a grandchild of the expert
    for expert in block:
        assert {id(m) for m in expert.modules()} <= {id(m) for m in _expert_modules(block)}
    assert len(list(_expert_modules(block))) == sum(len(list(e.modules())) for e in block)
    calls = []
    for m in _expert_modules(block):
        m.register_forward_pre_hook(lambda mod, args: calls.append(mod))
    with torch.no_grad():
        whole_batch_forward(block, x, index, weights, grouped=False)
    # the loop's whole-batch calls reach each expert and its three projections once; the routed
    # output before them ran with every hook off (else routed experts would be counted twice)
    assert len(calls) == 4 * len(block)
