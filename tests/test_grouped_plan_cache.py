"""The grouped forward's cached plan: reused while nothing changes, never used stale.

Each test runs the grouped forward once (the plan is cached), changes something a plan is built
from (hooks, modules, weights, forward wrappers, dtype), and checks the next call against the
per-expert loop run on the same changed block: hooks called with the loop's rows, outputs equal.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_calibration_routing import blocks, build_pair, make_ids
from torch import nn

from defuser_quant.calibration import grouped, routing_mode
from defuser_quant.calibration.grouped import (
    LinearAdapter,
    grouped_routed_forward,
    recording_grouped_use,
    register_linear_adapter,
    unregister_linear_adapter,
    why_not_grouped,
)

TOKENS, TOP_K = 24, 2


def _block(family: str = "qwen3_moe"):
    _, model = build_pair(family)
    return model, blocks(model)[0][1]


def _inputs(block, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, block[0].names and next(block[0].children()).in_features, generator=gen)
    scores = torch.rand(TOKENS, len(block), generator=gen)
    weights, index = scores.topk(TOP_K, dim=1)
    return x, index, weights


def _both(block, x, index, weights):
    """(grouped output, loop output) of the block as it is now."""
    with torch.no_grad():
        got = grouped_routed_forward(block, x, index, weights)
        ref = block.routed_forward(x, index, weights)
    return got, ref


def _cached(block):
    return grouped._PLANS.get(block)


def test_plan_is_built_once_and_reused(monkeypatch):
    _, block = _block()
    x, index, weights = _inputs(block)
    built = []
    original = grouped._build_plan
    monkeypatch.setattr(grouped, "_build_plan", lambda *a: built.append(1) or original(*a))
    first, ref = _both(block, x, index, weights)
    plan = _cached(block)
    for seed in (1, 2):
        got, ref = _both(block, *_inputs(block, seed))
        assert torch.equal(got, ref)
    assert len(built) == 1 and _cached(block) is plan
    assert torch.equal(first, block.routed_forward(x, index, weights))


def test_a_hook_added_after_the_first_call_is_called_with_the_loops_rows():
    _, block = _block()
    x, index, weights = _inputs(block)
    _both(block, x, index, weights)
    seen: dict[str, list] = {"grouped": [], "loop": []}
    run = {"now": "grouped"}
    handles = []
    for e, expert in enumerate(block):
        handles.append(expert.up_proj.register_forward_pre_hook(lambda m, a, e=e: seen[run["now"]].append((e, a[0].clone()))))
        handles.append(expert.down_proj.register_forward_hook(lambda m, a, out: out * 2))
    with torch.no_grad():
        got = grouped_routed_forward(block, x, index, weights)
        run["now"] = "loop"
        ref = block.routed_forward(x, index, weights)
    assert [e for e, _ in seen["grouped"]] == [e for e, _ in seen["loop"]] and seen["loop"]
    for (_, a), (_, b) in zip(seen["grouped"], seen["loop"], strict=True):
        assert torch.equal(a, b)
    assert torch.equal(got, ref)
    for h in handles:
        h.remove()
    seen["grouped"].clear()
    run["now"] = "grouped"
    got, ref = _both(block, x, index, weights)
    assert seen["grouped"] == [] and torch.equal(got, ref)  # removed hooks are not called; the doubling is gone


@pytest.mark.parametrize("kind", ["kwargs_pre_hook", "kwargs_hook", "backward_hook", "expert_hook", "instance_forward", "expert_forward"])
def test_what_makes_a_block_not_plain_after_the_first_call_falls_back(kind):
    model, block = _block()
    x, index, weights = _inputs(block)
    assert _both(block, x, index, weights)[0] is not None and _cached(block) is not None
    expert = block[3]
    calls = []
    if kind == "kwargs_pre_hook":
        expert.up_proj.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    elif kind == "kwargs_hook":
        expert.gate_proj.register_forward_hook(lambda m, a, k, o: calls.append(1), with_kwargs=True)
    elif kind == "backward_hook":
        expert.down_proj.register_full_backward_hook(lambda m, gi, go: None)
    elif kind == "expert_hook":
        expert.register_forward_hook(lambda m, a, o: calls.append(1))
    elif kind == "instance_forward":
        original = expert.gate_proj.forward
        expert.gate_proj.forward = lambda t: calls.append(1) or original(t) + 1
    else:
        original_expert = expert.forward
        expert.forward = lambda t: calls.append(1) or original_expert(t)
    reason = why_not_grouped(block, x)
    assert reason is not None and "expert 3" in reason
    assert grouped_routed_forward(block, x, index, weights) is None
    # through a routing context the loop runs, wrappers and hooks included, and equals the plain loop
    with torch.no_grad():
        ids = make_ids(4)
        ref = model(ids).logits
        calls.clear()
        with recording_grouped_use() as use, routing_mode(model, "routed", grouped=True):
            got = model(ids).logits
    assert torch.equal(got, ref)
    assert use.loop >= 1
    if kind != "backward_hook" and (index == 3).any():
        assert calls  # the hook or wrapper ran (in the loop)


@pytest.mark.parametrize("change", ["new_parameter", "repointed_data", "in_place_through_data", "in_place_no_grad"])
@pytest.mark.parametrize("storage", ["fused_views", "separate"])
def test_weight_changes_after_the_first_call_show_in_the_output(change, storage):
    _, block = _block()
    if storage == "separate":  # per-expert tensors (a loaded per-expert checkpoint): stacked by copy
        for expert in block:
            for linear in expert.children():
                linear.weight = nn.Parameter(linear.weight.detach().clone())
    x, index, weights = _inputs(block)
    before, _ = _both(block, x, index, weights)
    plan = _cached(block)
    assert (plan.views[0][0] is not None) == (storage == "fused_views")
    target = block[int(index[0, 0])].gate_proj  # an expert the batch uses
    new = torch.randn_like(target.weight)
    with torch.no_grad():
        if change == "new_parameter":
            target.weight = nn.Parameter(new)
        elif change == "repointed_data":
            target.weight.data = new
        elif change == "in_place_through_data":
            target.weight.data.copy_(new)  # no version bump on the parameter
        else:
            target.weight.copy_(new)
    got, ref = _both(block, x, index, weights)
    assert not torch.equal(ref, before)
    assert torch.equal(got, ref)


def test_a_swapped_projection_or_expert_is_used():
    _, block = _block()
    x, index, weights = _inputs(block)
    _both(block, x, index, weights)
    e = int(index[0, 0])
    old = block[e].up_proj
    block[e].up_proj = nn.Linear(old.in_features, old.out_features, bias=False)
    seen = []
    block[e].up_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[0]))
    got, ref = _both(block, x, index, weights)
    assert torch.equal(got, ref) and len(seen) == 2 and seen[0] == seen[1] > 0
    other = int(index[1, 1]) if int(index[1, 1]) != e else int(index[1, 0])
    replacement = copy.deepcopy(block[other])
    assert "own forward or names" in why_not_grouped(_swapped(block, other, replacement), x)  # a copied gate_fn
    replacement.gate_fn = block[0].gate_fn
    for p in replacement.parameters():
        p.data = torch.randn_like(p)
    _swapped(block, other, replacement)
    got, ref = _both(block, x, index, weights)
    assert torch.equal(got, ref)


def _swapped(block, e: int, expert):
    block._modules[str(e)] = expert
    return block


class _Scaled(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 3


def test_a_projection_turned_into_another_class_falls_back():
    _, block = _block()
    x, index, weights = _inputs(block)
    _both(block, x, index, weights)
    block[2].down_proj.__class__ = _Scaled
    assert "_Scaled" in why_not_grouped(block, x)
    assert grouped_routed_forward(block, x, index, weights) is None


def test_a_shadowing_weight_attribute_falls_back():
    _, block = _block()
    x, index, weights = _inputs(block)
    _both(block, x, index, weights)
    linear = block[1].gate_proj
    linear.__dict__["weight"] = linear.weight.detach() * 2  # what F.linear(x, self.weight) reads
    assert "not its parameter" in why_not_grouped(block, x)


@pytest.mark.parametrize("change", ["bias_added", "bias_removed", "weight_removed"])
def test_a_bias_or_weight_appearing_or_going_after_the_first_call_is_not_missed(change):
    _, block = _block()
    e = 4
    if change == "bias_removed":  # every up projection has a bias when planned
        for expert in block:
            expert.up_proj.bias = nn.Parameter(torch.randn(expert.up_proj.out_features))
    x, index, weights = _inputs(block)
    index[0, 0] = e  # the batch uses the changed expert
    _both(block, x, index, weights)
    assert _cached(block) is not None
    up = block[e].up_proj
    if change == "bias_added":
        up.bias = nn.Parameter(torch.randn(up.out_features))
    elif change == "bias_removed":
        up.bias = None
    else:
        up.weight = None
        assert "no weight" in why_not_grouped(block, x)  # refused, not a crash
        return
    got, ref = _both(block, x, index, weights)
    assert got is None or torch.equal(got, ref)


def test_dtype_change_replans():
    _, block = _block()
    x, index, weights = _inputs(block)
    _both(block, x, index, weights)
    block.to(torch.bfloat16)
    assert "does not match the input" in why_not_grouped(block, x)  # fp32 input, bf16 weights
    got, ref = _both(block, x.bfloat16(), index, weights.bfloat16())
    assert got.dtype == torch.bfloat16 and torch.equal(got, ref)
    block.to(torch.float64)
    assert "no torch.float64 kernel" in why_not_grouped(block, x.double())  # refused, not a crash


def test_adapter_state_is_rechecked_on_every_call():
    _, block = _block()
    x, index, weights = _inputs(block)
    for expert in block:
        expert.gate_proj.__class__ = _Scaled
    plain = {"on": True}
    register_linear_adapter(_Scaled, LinearAdapter(is_plain=lambda m, t: plain["on"]))
    try:
        assert why_not_grouped(block, x) is None
        plan = _cached(block)
        plain["on"] = False
        assert "not plain for this input" in why_not_grouped(block, x)
        plain["on"] = True
        assert why_not_grouped(block, x) is None and _cached(block) is plan  # same plan, re-checked
    finally:
        unregister_linear_adapter(_Scaled)
    assert "_Scaled" in why_not_grouped(block, x)  # the registry changed: planned afresh


class _CountingParams(dict):
    """Stands for an offload cache: every read is an onload, so the plan is not kept."""

    reads = 0

    def get(self, key, default=None):
        type(self).reads += 1
        return super().get(key, default)


def test_parameters_behind_a_dict_subclass_are_planned_every_call():
    _, block = _block()
    for expert in block:
        for linear in expert.children():
            linear._parameters = _CountingParams(linear._parameters)
    x, index, weights = _inputs(block)
    got, ref = _both(block, x, index, weights)
    assert torch.equal(got, ref) and _cached(block) is None
    reads = _CountingParams.reads
    _both(block, x, index, weights)
    assert _CountingParams.reads - reads >= 2 * 3 * len(block)  # weight and bias read again for every projection


@pytest.mark.parametrize("mode", ["routed", "all", "budgeted"])
def test_one_host_sync_per_routed_block_call(monkeypatch, mode):
    """``.tolist()`` / ``.item()`` / ``.cpu()`` are the host syncs on a GPU: routed mode reads one per block call."""
    model, _ = _block()
    calls = []
    for name in ("tolist", "item", "cpu"):
        original = getattr(torch.Tensor, name)
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, _o=original, _n=name, **k: calls.append(_n) or _o(self, *a, **k))
    ids = make_ids(5)
    with torch.no_grad(), recording_grouped_use() as use, routing_mode(model, mode, min_tokens=24, grouped=True):
        calls.clear()
        model(ids)
        syncs = list(calls)
    layers = len(blocks(model))
    assert use.fallbacks == {} and use.grouped >= layers
    if mode == "routed":
        assert syncs == ["tolist"] * layers, syncs
    else:  # counts and forced tokens are picked before the routed GEMMs are queued
        assert len(syncs) <= 4 * layers, syncs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
@pytest.mark.parametrize("mode", ["routed", "all"])
def test_cuda_syncs_per_block_call(mode):
    """CUDA's sync debug mode warns at every synchronizing call: one per routed block call, and in
    ``all`` mode none once the routed GEMMs are queued (the forced tokens are picked before)."""
    import warnings

    _, model = build_pair("qwen3_moe", torch.bfloat16)
    model = model.cuda()
    calls = []
    handles = [
        block.register_forward_pre_hook(lambda m, a, k: calls.append((m, a, k)), with_kwargs=True) for _, block in blocks(model)
    ]
    with torch.no_grad():
        model(make_ids(6).cuda(), use_cache=False)
    for h in handles:
        h.remove()
    assert len(calls) == len(blocks(model))
    with torch.no_grad(), recording_grouped_use() as use, routing_mode(model, mode, grouped=True):
        for block, args, kwargs in calls:
            block(*args, **kwargs)  # warm-up: plans cached
        torch.cuda.synchronize()
        for block, args, kwargs in calls:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                try:
                    block(*args, **kwargs)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            # the first use of the debug mode in a process also warns that it is a prototype: not a sync
            syncs = [str(w.message) for w in caught
                     if "synchroniz" in str(w.message).lower() and "prototype feature" not in str(w.message)]
            if mode == "routed":
                assert len(syncs) == 1, syncs
            else:  # routed counts (bincount), the complement (nonzero, its sizes), the grouped forward's counts
                assert 1 <= len(syncs) <= 6, syncs
    assert use.fallbacks == {} and use.grouped >= 2 * len(calls)


def test_a_kept_plan_keeps_no_module_or_tensor_alive():
    """Quantizers replace weights and modules after a layer is done: the kept plan must not hold the old ones."""
    import gc
    import weakref

    model, block = _block()
    for expert in block:
        for linear in expert.children():
            linear.weight = nn.Parameter(linear.weight.detach().clone())
    x, index, weights = _inputs(block)
    _both(block, x, index, weights)
    assert _cached(block) is not None
    old_weight = weakref.ref(block[0].gate_proj.weight)
    old_module = weakref.ref(block[1].up_proj)
    block[0].gate_proj.weight = nn.Parameter(torch.randn_like(block[0].gate_proj.weight))
    block[1].up_proj = nn.Linear(block[1].up_proj.in_features, block[1].up_proj.out_features, bias=False)
    gc.collect()
    assert old_weight() is None and old_module() is None
    got, ref = _both(block, x, index, weights)
    assert torch.equal(got, ref)
    dead = weakref.ref(block)
    del model, block
    gc.collect()
    assert dead() is None  # the plans' weak keys let the block go


def _flagged_forward(m: nn.Module) -> None:
    """A wrapper factory whose closures share one code object; plain while ``m.plain`` is true."""

    def wrapped(self, x):
        return type(self).forward(self, x) * (1 if self.plain else 2)

    m.forward = wrapped.__get__(m)


def test_a_swapped_in_module_with_a_wrapper_that_is_not_plain_falls_back():
    from defuser_quant.calibration.grouped import ForwardWrapper, register_forward_wrapper, unregister_forward_wrapper

    _, block = _block()
    for expert in block:
        expert.gate_proj.plain = True
        _flagged_forward(expert.gate_proj)
    code = block[0].gate_proj.forward.__func__.__code__
    register_forward_wrapper("test.flagged", ForwardWrapper(
        code=code, why_not_plain=lambda m, t: None if m.plain else "scales its output", inner=lambda m, f: None))
    try:
        x, index, weights = _inputs(block)
        got, ref = _both(block, x, index, weights)
        assert torch.equal(got, ref) and _cached(block) is not None
        e = int(index[0, 0])
        new = copy.copy(block[e].gate_proj)  # same parameters (same pointers), its own wrapper, not plain
        new.__dict__ = dict(new.__dict__)
        new.plain = False
        _flagged_forward(new)
        block[e].gate_proj = new
        assert why_not_grouped(block, x) == f"expert {e} gate projection scales its output"
        assert grouped_routed_forward(block, x, index, weights) is None
    finally:
        unregister_forward_wrapper("test.flagged")


# ----- parameter stores (offload caches installed as ``_parameters``) ---------------------------


class _Store(dict):
    """A ``_parameters`` mapping that is not a plain dict; ``copy_on_read`` makes reads hand back copies."""

    copy_on_read = False

    def __getitem__(self, key):
        value = super().__getitem__(key)
        return value.clone() if self.copy_on_read and value is not None else value

    def get(self, key, default=None):
        return self[key] if key in self else default


def _peek_store(store, name):
    value = dict.get(store, name)  # an absent bias reads as None either way, as in an offload cache
    return grouped.MOVED if store.copy_on_read and value is not None else value


def _use_stores(block) -> list[_Store]:
    stores = []
    for expert in block:
        for linear in expert.children():
            linear._parameters = _Store(linear._parameters)
            stores.append(linear._parameters)
    return stores


@pytest.mark.parametrize("registered", [True, False])
def test_a_registered_store_whose_reads_return_the_stored_tensors_keeps_the_plan(monkeypatch, registered):
    _, block = _block()
    _use_stores(block)
    built = []
    original = grouped._build_plan
    monkeypatch.setattr(grouped, "_build_plan", lambda *a: built.append(1) or original(*a))
    if registered:
        grouped.register_parameter_store(_Store, _peek_store)
    try:
        for seed in range(3):
            got, ref = _both(block, *_inputs(block, seed))
            assert got is not None and torch.equal(got, ref)
    finally:
        grouped.unregister_parameter_store(_Store)
    assert len(built) == (1 if registered else 3)  # unknown store: planned afresh on every call


def test_a_store_that_copies_on_read_is_planned_afresh_and_a_replaced_tensor_shows(monkeypatch):
    _, block = _block()
    stores = _use_stores(block)
    built = []
    original = grouped._build_plan
    monkeypatch.setattr(grouped, "_build_plan", lambda *a: built.append(1) or original(*a))
    grouped.register_parameter_store(_Store, _peek_store)
    try:
        x, index, weights = _inputs(block)
        _both(block, x, index, weights)
        assert len(built) == 1 and _cached(block) is not None
        # a tensor replaced inside the store (new pointer): the kept plan is not used
        store = block[2].up_proj._parameters
        dict.__setitem__(store, "weight", nn.Parameter(store["weight"].detach() * 3))
        got, ref = _both(block, x, index, weights)
        assert torch.equal(got, ref) and len(built) == 2
        # reads that copy: never kept, every call planned from what the forward reads
        for s in stores:
            s.copy_on_read = True
        for seed in (1, 2):
            got, ref = _both(block, *_inputs(block, seed))
            assert torch.equal(got, ref)
        assert len(built) == 4 and _cached(block) is None
    finally:
        grouped.unregister_parameter_store(_Store)


def test_registries_refuse_what_they_cannot_call():
    with pytest.raises(TypeError, match="callable peek"):
        grouped.register_parameter_store(_Store, None)
    with pytest.raises(TypeError, match="needs a class"):
        grouped.register_parameter_store("not a class", _peek_store)
    with pytest.raises(TypeError, match="peek_all None or a callable"):
        grouped.register_parameter_store(_Store, _peek_store, peek_all=3)
    with pytest.raises(TypeError, match="BatchedForwardHook with callable match and run"):
        grouped.register_batched_hook("x", lambda hook: None)
    with pytest.raises(TypeError, match="BatchedForwardHook with callable match and run"):
        grouped.register_batched_hook("x", grouped.BatchedForwardHook(match=None, run=lambda owner, members: None))
    assert _Store not in grouped._STORES and "x" not in grouped._BATCHED
