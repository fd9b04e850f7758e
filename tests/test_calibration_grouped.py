"""Grouped calibration forward: same hook inputs, same Hessians, same outputs as the per-expert loop."""

from __future__ import annotations

import copy
import dataclasses
from collections import defaultdict

import pytest
import tiny
import torch
from test_calibration_routing import FAMILIES, blocks, build_pair, make_ids
from torch import nn

from defuser_quant import convert_model
from defuser_quant.calibration import routing_mode
from defuser_quant.calibration.grouped import (
    LinearAdapter,
    _stacked_view,
    deterministic_mode,
    grouped_routed_forward,
    register_linear_adapter,
    unregister_linear_adapter,
    why_not_grouped,
)


class Recorder:
    """Per projection: every input it saw (in call order) and the Hessian sum x^T x in float64."""

    def __init__(self, model: nn.Module):
        self.inputs: dict[str, list[torch.Tensor]] = defaultdict(list)
        self.hessians: dict[str, torch.Tensor] = {}
        self.handles = []
        for path, block in blocks(model):
            for e, expert in enumerate(block):
                for name, linear in expert.named_children():
                    self.handles.append(linear.register_forward_pre_hook(self._hook(f"{path}.{e}.{name}")))

    def _hook(self, key: str):
        def hook(module, args):
            x = args[0].detach()
            self.inputs[key].append(x.clone())
            x64 = x.double()
            self.hessians[key] = self.hessians.get(key, 0) + x64.T @ x64

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def _forbid_loop(model: nn.Module) -> None:
    """Make the per-expert loop raise: proves the grouped path ran."""
    for _, block in blocks(model):
        def fail(*a, **k):
            raise AssertionError("per-expert loop ran")

        block.routed_forward = fail


def _run(model, ids, mode, grouped):
    rec = Recorder(model)
    with torch.no_grad(), routing_mode(model, mode, min_tokens=24, grouped=grouped) as session:
        out = model(ids).logits
    rec.remove()
    return out, rec, {p: (c.routed.clone(), c.forced.clone()) for p, c in session.counts.items()}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["routed", "all", "budgeted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_matches_loop(family, mode, dtype):
    _, model = build_pair(family, dtype)
    grouped_model = copy.deepcopy(model)
    _forbid_loop(grouped_model)
    ids = make_ids(3)
    out_loop, rec_loop, counts_loop = _run(model, ids, mode, grouped=False)
    out_grouped, rec_grouped, counts_grouped = _run(grouped_model, ids, mode, grouped=True)
    # In bf16 a later layer's routing can flip on a rounding difference (gpt_oss adds its bias
    # after the grouped GEMM instead of inside addmm), so bf16 compares the first block only.
    paths = list(counts_loop) if dtype == torch.float32 else list(counts_loop)[:1]
    for path in paths:
        assert torch.equal(counts_loop[path][0], counts_grouped[path][0])
        assert torch.equal(counts_loop[path][1], counts_grouped[path][1])
    assert rec_loop.inputs.keys() == rec_grouped.inputs.keys()
    for key, seen in rec_loop.inputs.items():
        if not key.startswith(tuple(f"{p}." for p in paths)):
            continue
        got = rec_grouped.inputs[key]
        assert [t.shape for t in seen] == [t.shape for t in got], key
        # Row order and values as in the loop; down_proj inputs come from GEMM outputs.
        exact = ".down" not in key and ".w2" not in key
        rel = 2e-2 if dtype == torch.bfloat16 else 1e-5
        for a, b in zip(seen, got, strict=True):
            if exact:
                assert torch.equal(a, b), key
            else:
                assert (b - a).abs().max() <= rel * a.abs().max() + 1e-6, key
        h_loop, h_grouped = rec_loop.hessians[key], rec_grouped.hessians[key]
        scale = h_loop.abs().max().clamp(min=1e-12)
        assert ((h_grouped - h_loop).abs().max() / scale).item() < (2e-2 if dtype == torch.bfloat16 else 1e-5), key
    if dtype == torch.float32:
        torch.testing.assert_close(out_grouped, out_loop, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_grouped_is_bit_equal_on_cpu_bf16(family):
    """Same rows, CPU grouped_mm == mm, combine in the loop's expert order: identical output.

    Top-4 of 8 experts, so a combine in any other order than the loop's rounds differently.
    """
    model, ids = tiny.build(family, torch.bfloat16, num_experts_per_tok=4)
    convert_model(model)
    with torch.no_grad():
        loop = model(ids).logits
        with routing_mode(model, "routed", grouped=True):
            _forbid_loop(model)
            grouped = model(ids).logits
    assert torch.equal(loop, grouped)


def test_hooks_that_replace_inputs_and_outputs_are_honoured():
    _, model = build_pair("qwen3_moe")
    grouped_model = copy.deepcopy(model)
    _forbid_loop(grouped_model)

    def attach(m):
        for _, block in blocks(m):
            for e, expert in enumerate(block):
                if e % 2 == 0:
                    expert.up_proj.register_forward_pre_hook(lambda mod, args: (args[0] * 2,))
                if e % 3 == 0:
                    expert.down_proj.register_forward_hook(lambda mod, args, out: out - 1)

    attach(model)
    attach(grouped_model)
    ids = make_ids(7)
    with torch.no_grad():
        with routing_mode(model, "routed"):
            ref = model(ids).logits
        with routing_mode(grouped_model, "routed", grouped=True):
            got = grouped_model(ids).logits
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        plain = copy.deepcopy(model)
        for _, block in blocks(plain):
            for expert in block:
                for lin in expert.children():
                    lin._forward_hooks.clear()
                    lin._forward_pre_hooks.clear()
        assert not torch.allclose(plain(ids).logits, ref)  # the hooks changed something


class _Wrapped(nn.Linear):
    def forward(self, x):
        return super().forward(x) * 1.5


@pytest.mark.parametrize("kind", ["instance_forward", "subclass", "kwargs_hook", "expert_hook", "dtype"])
def test_not_plain_falls_back_to_the_loop(kind):
    _, model = build_pair("qwen3_moe")
    path, block = blocks(model)[0]
    expert = block[1]
    if kind == "instance_forward":
        original = expert.gate_proj.forward
        expert.gate_proj.forward = lambda x: original(x) + 1
    elif kind == "subclass":
        expert.gate_proj.__class__ = _Wrapped
    elif kind == "kwargs_hook":
        expert.up_proj.register_forward_pre_hook(lambda m, a, k: None, with_kwargs=True)
    elif kind == "expert_hook":
        expert.register_forward_hook(lambda m, a, o: None)
    else:
        expert.down_proj.to(torch.float64)
    x = torch.randn(6, block[0].gate_proj.in_features)
    reason = why_not_grouped(block, x)
    assert reason is not None and "expert 1" in reason
    idx = torch.tensor([[1, 0], [1, 2], [3, 1], [0, 2], [1, 3], [2, 0]])
    weights = torch.rand(6, 2)
    assert grouped_routed_forward(block, x, idx, weights) is None
    if kind == "dtype":
        return  # the loop itself cannot mix dtypes
    ids = make_ids(2)
    with torch.no_grad():
        ref = model(ids).logits
        with routing_mode(model, "all", grouped=True):
            got = model(ids).logits
    assert torch.equal(ref, got)  # the loop ran: bit-identical to the plain forward


def test_adapter_registration():
    _, model = build_pair("qwen3_moe")
    _, block = blocks(model)[0]
    x = torch.randn(3, block[0].gate_proj.in_features)
    for expert in block:
        expert.gate_proj.__class__ = _Wrapped
    assert "_Wrapped" in why_not_grouped(block, x)
    seen = []
    register_linear_adapter(_Wrapped, LinearAdapter(is_plain=lambda m, t: False))
    try:
        assert "not plain" in why_not_grouped(block, x)
        register_linear_adapter(_Wrapped, LinearAdapter(is_plain=lambda m, t: True, inner_hook=lambda m, i, o: seen.append(i.shape[0])))
        assert why_not_grouped(block, x) is None
        idx = torch.tensor([[0, 1], [1, 2], [2, 3]])
        grouped_routed_forward(block, x, idx, torch.ones(3, 2))
        assert sorted(seen) == [1, 1, 2, 2]  # gate of experts 0..3 saw their routed rows
    finally:
        unregister_linear_adapter(_Wrapped)
    assert "_Wrapped" in why_not_grouped(block, x)


def test_stacked_weights_are_views_of_the_fused_storage():
    _, model = build_pair("qwen3_moe")
    _, block = blocks(model)[0]
    weights = [expert.gate_proj.weight for expert in block]
    stacked = _stacked_view(weights)
    assert torch.equal(stacked, torch.stack(weights))
    assert stacked.untyped_storage().data_ptr() == weights[0].untyped_storage().data_ptr()
    copies = [w.clone() for w in weights]
    assert _stacked_view(copies) is None  # separate tensors: no view, the caller stacks a copy


def test_deterministic_mode_restores_flags():
    before = torch.are_deterministic_algorithms_enabled()
    with deterministic_mode():
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before
    with deterministic_mode(False):
        assert torch.are_deterministic_algorithms_enabled() == before
    _, model = build_pair("qwen3_moe")
    with routing_mode(model, "routed", deterministic=True):
        assert torch.are_deterministic_algorithms_enabled()
    assert torch.are_deterministic_algorithms_enabled() == before


@pytest.mark.parametrize("max_rows", [1, 20, None])
def test_forced_chunks_keep_each_experts_rows_whole(max_rows):
    """Forced rows in chunks of whole experts: every hook sees one call with the loop's rows."""
    from defuser_quant.calibration.grouped import grouped_expert_calls

    _, model = build_pair("gpt_oss")  # biases and a custom gate
    _, block = blocks(model)[0]
    x = torch.randn(12, block[0].names and next(block[0].children()).in_features, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    selection = {e: torch.randperm(12, generator=gen)[: 3 + e] for e in range(0, len(block), 2)}

    def record(calls):
        handles = []
        for e, expert in enumerate(block):
            for name, linear in expert.named_children():
                handles.append(linear.register_forward_pre_hook(lambda m, a, key=(e, name): calls.append((key, a[0].clone()))))
        return handles

    loop_calls, grouped_calls = [], []
    handles = record(loop_calls)
    with torch.no_grad():
        for e, idx in selection.items():
            block[e](x[idx])
    for h in handles:
        h.remove()
    handles = record(grouped_calls)
    with torch.no_grad():
        assert grouped_expert_calls(block, x, selection, max_rows=max_rows)
    for h in handles:
        h.remove()
    assert sorted(k for k, _ in loop_calls) == sorted(k for k, _ in grouped_calls)  # one call per projection
    loop_by_key, grouped_by_key = dict(loop_calls), dict(grouped_calls)
    for key, rows in loop_by_key.items():
        torch.testing.assert_close(grouped_by_key[key], rows, atol=1e-5, rtol=1e-5)
        if "down" not in key[1]:
            assert torch.equal(grouped_by_key[key], rows)


def test_fallback_is_reported_once_per_reason(caplog):
    from defuser_quant.calibration import grouped

    _, model = build_pair("qwen3_moe")
    for _, block in blocks(model):
        block[2].up_proj.register_forward_pre_hook(lambda m, a, k: None, with_kwargs=True)
    grouped._REPORTED.clear()
    with caplog.at_level("WARNING", logger="defuser_quant.calibration.grouped"), torch.no_grad():
        with routing_mode(model, "all", grouped=True):
            model(make_ids(1))
            model(make_ids(2))
    messages = [r.getMessage() for r in caplog.records if "grouped calibration forward not used" in r.getMessage()]
    assert len(messages) == 1 and "forward hooks with kwargs" in messages[0]


def _scaled_forward(factor: float):
    """A wrapper factory like a quantization library's: each module gets its own closure."""

    def install(m: nn.Module) -> None:
        inner = type(m).forward

        def wrapped(self, x):
            return inner(self, x) * factor

        m.forward = wrapped.__get__(m)

    return install


def test_registered_forward_wrappers_are_vouched_for_by_their_own_check():
    from defuser_quant.calibration.grouped import (
        ForwardWrapper,
        recording_grouped_use,
        register_forward_wrapper,
        unregister_forward_wrapper,
    )

    _, model = build_pair("qwen3_moe")
    ids = make_ids(2)
    with torch.no_grad():
        ref = model(ids).logits
    identity = _scaled_forward(1.0)
    for _, block in blocks(model):
        for expert in block:
            for linear in expert.children():
                identity(linear)
    _, block = blocks(model)[0]
    code = block[0].gate_proj.forward.__func__.__code__  # every closure of the factory shares it
    x = torch.randn(3, block[0].gate_proj.in_features)
    assert "has an instance forward (_scaled_forward.<locals>.install.<locals>.wrapped)" in why_not_grouped(block, x)
    plain = {"on": True}
    wrapper = ForwardWrapper(code=code, why_not_plain=lambda m, t: None if plain["on"] else "scales", inner=lambda m, f: None)
    register_forward_wrapper("test.scaled", wrapper)
    try:
        assert why_not_grouped(block, x) is None
        with torch.no_grad(), recording_grouped_use() as use, routing_mode(model, "all", grouped=True):
            got = model(ids).logits
        assert use.grouped == 2 * len(blocks(model)) and use.fallbacks == {}
        assert torch.equal(got, ref)  # factor 1.0: the wrapped forward is the plain one, bit for bit
        plain["on"] = False
        with torch.no_grad(), recording_grouped_use() as use, routing_mode(model, "routed", grouped=True):
            assert torch.equal(model(ids).logits, ref)  # the loop ran, through the wrappers
        assert use.grouped == 0 and use.fallbacks == {"gate projection scales": len(blocks(model))}
        plain["on"] = True
        unregister_forward_wrapper("test.scaled")
        by_match = ForwardWrapper(matches=lambda f: f.__code__ is code, why_not_plain=lambda m, t: None, inner=lambda m, f: None)
        register_forward_wrapper("test.scaled", by_match)
        assert why_not_grouped(block, x) is None
    finally:
        unregister_forward_wrapper("test.scaled")
    assert "no registered wrapper" in why_not_grouped(block, x)
    with pytest.raises(ValueError, match="code= or matches="):
        ForwardWrapper(why_not_plain=lambda m, t: None, inner=lambda m, f: None)


@pytest.mark.parametrize(("budget", "chunks"), [(None, 1), (1, "per_token")])
def test_forced_chunk_size_takes_the_larger_of_the_row_and_byte_budgets(monkeypatch, budget, chunks):
    """A short batch's forced rows run in one chunk while they fit the byte budget; a tiny budget
    falls back to FORCED_ROWS_PER_TOKEN x tokens rows per chunk."""
    from defuser_quant.calibration import grouped

    _, model = build_pair("qwen3_moe")
    _, block = blocks(model)[0]
    x = torch.randn(6, next(block[0].children()).in_features, generator=torch.Generator().manual_seed(0))
    selection = {e: torch.arange(6) for e in range(len(block))}  # every token through every expert
    if budget is not None:
        monkeypatch.setattr(grouped, "FORCED_CHUNK_BYTES", budget)
        monkeypatch.setattr(grouped, "FORCED_ROWS_PER_TOKEN", 2)  # 12 rows: 48 forced rows in 4 chunks
    runs = []
    original = grouped._run_sorted
    monkeypatch.setattr(grouped, "_run_sorted", lambda *a, **k: runs.append(a[2]) or original(*a, **k))
    with torch.no_grad():
        assert grouped.grouped_expert_calls(block, x, selection)
    limit = grouped.forced_chunk_rows(x)
    assert limit == (grouped.FORCED_ROWS_PER_TOKEN * 6 if budget else grouped.FORCED_CHUNK_BYTES // (x.shape[1] * 4))
    expected = 1 if chunks == 1 else -(-len(block) * 6 // limit)
    assert expected == (1 if chunks == 1 else 4)
    assert len(runs) == expected and all(sum(c) <= limit for c in runs)


def test_adapter_inner_kinds_follow_the_registered_adapters():
    """An adapter's ``inner_kind`` is asked only while that very adapter is registered for its class."""
    from defuser_quant.calibration import grouped

    class Hooked(nn.Linear):
        pass

    def inner(m, x, out):
        return None

    def kind(m, x):
        return None

    try:
        grouped.register_linear_adapter(Hooked, grouped.LinearAdapter(inner_hook=inner, inner_kind=kind))
        assert grouped._INNER_KINDS == {inner: kind}
        grouped.register_linear_adapter(Hooked, grouped.LinearAdapter(inner_hook=inner))  # replaced: no kind left
        assert grouped._INNER_KINDS == {}
        grouped.register_linear_adapter(Hooked, grouped.LinearAdapter(inner_hook=inner, inner_kind=kind))
    finally:
        grouped.unregister_linear_adapter(Hooked)
    assert grouped._INNER_KINDS == {} and Hooked not in grouped._ADAPTERS


def _routing(tokens: int, experts: int, top_k: int, dtype: torch.dtype, seed: int = 3):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(tokens, experts, generator=generator)
    weights, index = torch.topk(logits.softmax(-1), top_k, dim=-1)
    return index, weights.to(dtype)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_call_without_hooks_needs_no_host_sync_and_gives_the_same_output(family, dtype, monkeypatch):
    """``hooks=False`` (no expert hook acts): the same grouped GEMMs without the rows per expert on the
    host, so no ``tolist``; the output is the synced call's bit for bit, and the counts are not known."""
    from defuser_quant.calibration import grouped

    model, _ = tiny.build(family, dtype, num_experts_per_tok=2)
    convert_model(model)
    (_, block), *_ = blocks(model)
    hidden = torch.randn(24, block[0].projection("up").in_features, generator=torch.Generator().manual_seed(4)).to(dtype)
    index, weights = _routing(24, block.num_experts, 2, dtype)
    with torch.no_grad():
        synced, counts = grouped.grouped_routed_forward_with_counts(block, hidden, index, weights)
        host_reads = []
        monkeypatch.setattr(torch.Tensor, "tolist", lambda self: host_reads.append(self) or [])
        free, no_counts = grouped.grouped_routed_forward_with_counts(block, hidden, index, weights, hooks=False)
    assert host_reads == [] and no_counts is None and sum(counts) == 48
    assert torch.equal(free, synced)
    grouped.check_routed_indices()  # every index was an expert's: nothing raised


def _six_token_call() -> tuple:
    """A converted tiny qwen3_moe block and a six-token top-2 call of it: ``(block, hidden, index, weights)``."""
    model, _ = tiny.build("qwen3_moe", torch.float32)
    convert_model(model)
    (_, block), *_ = blocks(model)
    hidden = torch.randn(6, block[0].projection("up").in_features)
    index, weights = _routing(6, block.num_experts, 2, torch.float32)
    return block, hidden, index, weights


def test_an_index_outside_the_block_without_a_sync_is_raised_at_the_check():
    from defuser_quant.calibration import grouped

    block, hidden, index, weights = _six_token_call()
    index[3, 1] = block.num_experts  # no such expert: the loop's one_hot refuses it
    with pytest.raises(RuntimeError):
        block.routed_forward(hidden, index, weights)
    assert grouped.grouped_routed_forward_with_counts(block, hidden, index, weights) is None  # synced: the loop's turn
    grouped.grouped_routed_forward_with_counts(block, hidden, index, weights, hooks=False)
    with pytest.raises(grouped.RoutedIndexError, match=rf"outside \[0, {block.num_experts}\).*sync_free_propagation=False"):
        grouped.check_routed_indices()
    grouped.check_routed_indices()  # the check cleared the flag


@pytest.mark.parametrize("family", FAMILIES)
def test_sync_counts_reads_the_counts_once_after_the_hookless_gemms(family, monkeypatch):
    """``hooks=False, sync_counts=True`` (``routing: all``'s routed output): the hookless GEMMs, then one host read
    of the counts; the output and counts are the synced call's, and no expert hook is consulted."""
    from defuser_quant.calibration import grouped

    model, _ = tiny.build(family, torch.float32, num_experts_per_tok=2)
    convert_model(model)
    (_, block), *_ = blocks(model)
    hidden = torch.randn(24, block[0].projection("up").in_features, generator=torch.Generator().manual_seed(5))
    index, weights = _routing(24, block.num_experts, 2, torch.float32)
    fired = []
    for expert in block:
        for linear in expert.children():
            linear.register_forward_hook(lambda *a: fired.append(1))
    with torch.no_grad():
        with grouped.recording_grouped_use() as plain:
            free = grouped.grouped_routed_forward_with_counts(block, hidden, index, weights, hooks=False, sync_counts=True)
        order = []
        real_hookless, real_tolist = grouped._run_hookless, torch.Tensor.tolist
        monkeypatch.setattr(grouped, "_run_hookless", lambda *a: order.append("gemms") or real_hookless(*a))
        monkeypatch.setattr(torch.Tensor, "tolist", lambda self: order.append("read") or real_tolist(self))
        grouped.grouped_routed_forward_with_counts(block, hidden, index, weights, hooks=False, sync_counts=True)
        monkeypatch.undo()
        for expert in block:
            for linear in expert.children():
                linear._forward_hooks.clear()
        synced = grouped.grouped_routed_forward_with_counts(block, hidden, index, weights)
    assert free is not None and order == ["gemms", "read"] and not fired
    assert torch.equal(free[0], synced[0]) and free[1] == synced[1] and sum(free[1]) == 48
    assert plain.grouped == 1 and plain.without_sync == 0  # a synced call, counted as one


def test_sync_counts_refuses_an_index_outside_the_block_and_leaves_no_flag():
    from defuser_quant.calibration import grouped

    block, hidden, index, weights = _six_token_call()
    index[2, 0] = block.num_experts
    assert grouped.grouped_routed_forward_with_counts(block, hidden, index, weights, hooks=False, sync_counts=True) is None
    grouped.check_routed_indices()  # refused on the spot: nothing left for the later check


def test_sync_counts_runs_nothing_where_the_gemms_need_the_module_path(monkeypatch):
    """A block with weightless experts, or Linears with an adapter's inner hook: None at once, nothing run or
    recorded (the caller runs the call with its hooks suspended)."""
    from defuser_quant.calibration import grouped

    block, hidden, index, weights = _six_token_call()
    ran = []
    monkeypatch.setattr(grouped, "_run_hookless", lambda *a: ran.append(a))
    monkeypatch.setattr(grouped, "_run_sorted", lambda *a, **k: ran.append(a))
    monkeypatch.setattr(grouped, "_no_weightless_experts", lambda b: False)
    with grouped.recording_grouped_use() as use, torch.no_grad():
        assert grouped.grouped_routed_forward_with_counts(block, hidden, index, weights, hooks=False, sync_counts=True) is None
    assert not ran and use.grouped == 0 and not use.fallbacks
    monkeypatch.setattr(grouped, "_no_weightless_experts", lambda b: True)
    plan = grouped.call_plan(block, hidden)
    plan.roles[0] = dataclasses.replace(plan.roles[0], inner_hooks=(None,) * len(block))
    with torch.no_grad():
        assert grouped.grouped_routed_forward_with_counts(block, hidden, index, weights, plan, hooks=False,
                                                          sync_counts=True) is None
    assert not ran


@pytest.mark.parametrize("family", FAMILIES)
def test_device_counts_come_back_as_a_tensor_without_a_host_read(family, monkeypatch):
    """``hooks=False, device_counts=True`` (``sync_free`` whole-batch calls): the hookless GEMMs and the rows per
    expert as a tensor on the call's device, nothing read on the host; the synced call's output and counts."""
    from defuser_quant.calibration import grouped

    model, _ = tiny.build(family, torch.float32, num_experts_per_tok=2)
    convert_model(model)
    (_, block), *_ = blocks(model)
    hidden = torch.randn(24, block[0].projection("up").in_features, generator=torch.Generator().manual_seed(6))
    index, weights = _routing(24, block.num_experts, 2, torch.float32)
    with torch.no_grad():
        synced, counts = grouped.grouped_routed_forward_with_counts(block, hidden, index, weights)
        host_reads = []
        monkeypatch.setattr(torch.Tensor, "tolist", lambda self: host_reads.append(self) or [])
        monkeypatch.setattr(torch.Tensor, "item", lambda self: host_reads.append(self) or 0)
        with grouped.recording_grouped_use() as use:
            free, on_device = grouped.grouped_routed_forward_with_counts(block, hidden, index, weights, hooks=False,
                                                                         device_counts=True)
        monkeypatch.undo()
    assert host_reads == [] and use.without_sync == 1
    assert isinstance(on_device, torch.Tensor) and on_device.dtype == torch.long
    assert torch.equal(free, synced) and on_device.tolist() == counts
    grouped.check_routed_indices()


def test_device_counts_leave_an_index_outside_the_block_to_the_check(monkeypatch):
    from defuser_quant.calibration import grouped

    block, hidden, index, weights = _six_token_call()
    index[3, 1] = block.num_experts
    with torch.no_grad():
        _, on_device = grouped.grouped_routed_forward_with_counts(block, hidden, index, weights, hooks=False,
                                                                  device_counts=True)
    assert int(on_device.sum()) == 11  # the eleven rows of real experts, counted per expert
    with pytest.raises(grouped.RoutedIndexError, match="sync_free_calibration=False"):
        grouped.check_routed_indices()
    # where the GEMMs need the module path: nothing run, None at once (the caller suspends the hooks and syncs)
    monkeypatch.setattr(grouped, "_no_weightless_experts", lambda b: False)
    index[3, 1] = 0
    assert grouped.grouped_routed_forward_with_counts(block, hidden, index, weights, hooks=False,
                                                      device_counts=True) is None
