"""``routing: all`` with one call per expert over the whole batch (``whole_batch=True``).

Each expert's hooks see every token of a batch in token order in one call (provenance ``"all"``),
the block output stays the routed one, coverage counts split into routed and forced as before,
and inside llm-compressor GPTQ's Hessians are the ones stock llm-compressor's own all-experts
calibration accumulates (a separate process, our integration never imported), with one gate/up
product per batch and layer for all experts."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from defuser_quant.calibration import CoverageTracker, add_rows, capture_expert_inputs, provenance, routed_rows, routing_mode
from defuser_quant.calibration.capture import defused_blocks, whole_batch

from test_calibration_routing import FAMILIES, NUM_EXPERTS, TOP_K, build_pair, make_ids  # noqa: E402


def _defused(family: str = "qwen3_moe"):
    return build_pair(family)[1]


def _block_inputs(model, ids):
    """Every defused block's hidden_states of one forward (top-k routing)."""
    seen = {}

    def keep(path):
        def hook(module, args):
            seen.setdefault(path, args[0].detach().clone())

        return hook

    handles = [block.register_forward_pre_hook(keep(path)) for path, block in defused_blocks(model)]
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for h in handles:
            h.remove()
    return seen


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("grouped", [False, True])
def test_each_expert_sees_the_whole_batch_once_in_token_order(grouped, family):
    model = _defused(family)
    ids = make_ids(3)
    with torch.no_grad():
        reference = model(ids).logits
    inputs = _block_inputs(model, ids)
    calls = []
    with capture_expert_inputs(model, lambda *a: calls.append(a)), routing_mode(
        model, "all", grouped=grouped, whole_batch=True
    ) as session, torch.no_grad():
        logits = model(ids).logits
    assert torch.equal(logits, reference), "the block output is the routed one"
    for path, block in defused_blocks(model):
        mine = [c for c in calls if c[0] == path]
        roles = [r for r in ("gate", "up", "down") if block[0].projection(r) is not None]
        assert len(mine) == NUM_EXPERTS * len(roles), "one call per expert and projection"
        assert {c[4] for c in mine} == {"all"}
        for _, expert, role, x, _ in mine:
            if role != "down":
                assert torch.equal(x, inputs[path].reshape(-1, x.shape[-1])), (path, expert, role)
        counts = session.counts[path]
        tokens = inputs[path].reshape(-1, inputs[path].shape[-1]).shape[0]
        assert counts.routed.sum().item() == tokens * TOP_K
        assert torch.equal(counts.calibrated, torch.full((NUM_EXPERTS,), tokens, dtype=torch.long))


def test_whole_batch_counts_equal_the_split_calls():
    model = _defused()
    batches = [make_ids(seed) for seed in range(3)]
    totals = {}
    for whole in (False, True):
        with CoverageTracker(model, min_tokens=8) as tracker, routing_mode(model, "all", whole_batch=whole), torch.no_grad():
            for ids in batches:
                model(ids)
        totals[whole] = tracker.counts()
    assert totals[True] == totals[False]
    assert all(sum(f) > 0 for _, f in totals[True].values())


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_batch_down_inputs_match_the_loop(family):
    """Grouped and loop whole-batch calls hand every projection the same rows (bit-equal on the CPU)."""
    model = _defused(family)
    ids = make_ids(4)
    seen = {}
    for grouped in (False, True):
        calls = []
        with capture_expert_inputs(model, lambda *a: calls.append(a)), routing_mode(
            model, "all", grouped=grouped, whole_batch=True
        ), torch.no_grad():
            model(ids)
        seen[grouped] = calls
    assert len(seen[True]) == len(seen[False])
    key = lambda c: (c[0], c[1], c[2])  # noqa: E731
    loop = {key(c): c[3] for c in seen[False]}
    for c in seen[True]:
        torch.testing.assert_close(c[3], loop[key(c)], rtol=0, atol=0)


def test_bad_arguments_and_provenance_are_refused():
    model = _defused()
    for kwargs in ({"mode": "routed"}, {"mode": "budgeted"}, {"mode": "all", "observe_routed": False}):
        with pytest.raises(ValueError, match="whole_batch=True needs mode='all'"):
            with routing_mode(model, whole_batch=True, **kwargs):
                pass
    path = defused_blocks(model)[0][0]
    with pytest.raises(ValueError, match="whole_batch=True needs"):
        with routing_mode(model, "all", experts={path: [0]}, whole_batch=True):
            pass
    with pytest.raises(ValueError, match="use whole_batch"):
        with provenance("all"):
            pass
    with pytest.raises(RuntimeError, match="only known inside whole_batch"):
        routed_rows(0)
    counts = {"routed": [0, 0], "forced": [0, 0]}
    with whole_batch([3, 5]):
        add_rows(counts, 1, 8)
    add_rows(counts, 0, 2, "forced")
    assert counts == {"routed": [0, 5], "forced": [2, 3]}


_STOCK_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from defuser_quant.assets import TINY_MOE_PATH
    from defuser_quant.calibration.data import CalibrationDataConfig, build_calibration_samples, to_hf_dataset

    out, samples, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    assert "defuser_quant.integrations.llmcompressor" not in sys.modules
    tokenizer = AutoTokenizer.from_pretrained(TINY_MOE_PATH)
    data = to_hf_dataset(build_calibration_samples(CalibrationDataConfig(num_samples=samples, seq_len=seq), tokenizer))
    seen = {}
    original = GPTQModifier.compress_modules
    def snapshot(self):
        for module, hessian in self._hessians.items():
            seen[self._module_names[module]] = (hessian.clone(), float(self._num_samples[module]))
        return original(self)
    GPTQModifier.compress_modules = snapshot
    model = AutoModelForCausalLM.from_pretrained(TINY_MOE_PATH, dtype=torch.bfloat16)
    oneshot(model=model, processor=tokenizer, dataset=data, output_dir=out + "/ckpt", num_calibration_samples=samples,
            max_seq_length=seq, shuffle_calibration_samples=False,
            recipe=[GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head", "re:.*mlp.gate$"])])
    assert "defuser_quant.integrations.llmcompressor" not in sys.modules
    torch.save(seen, out + "/hessians.pt")
    print(json.dumps(sorted({type(m).__name__ for m in model.modules() if "Experts" in type(m).__name__})))
    """
)


def test_llmcompressor_all_gives_stock_all_experts_hessians(tmp_path, monkeypatch):
    pytest.importorskip("llmcompressor")
    from test_llmcompressor_grouped import SAMPLES, SEQ, _oneshot, calibration  # noqa: F401

    from defuser_quant.integrations.llmcompressor.hessians import last_batching

    script = tmp_path / "stock.py"
    script.write_text(_STOCK_SCRIPT)
    run = subprocess.run([sys.executable, str(script), str(tmp_path), str(SAMPLES), str(SEQ)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Defused" not in run.stdout and json.loads(run.stdout.strip().splitlines()[-1]), run.stdout
    stock = torch.load(tmp_path / "hessians.pt")

    from transformers import AutoTokenizer

    from defuser_quant.assets import TINY_MOE_PATH
    from defuser_quant.calibration.data import CalibrationDataConfig, build_calibration_samples, to_hf_dataset

    tokenizer = AutoTokenizer.from_pretrained(TINY_MOE_PATH)
    data = to_hf_dataset(build_calibration_samples(CalibrationDataConfig(num_samples=SAMPLES, seq_len=SEQ), tokenizer))
    ours, modifier = _oneshot((tokenizer, data), tmp_path / "ours", "all", True, monkeypatch)
    experts = sorted(n for n in stock if ".mlp.experts." in n)
    layers = sorted({n.split(".mlp.")[0] for n in experts})
    per_layer = len(experts) // len(layers)
    assert experts == sorted(n for n in ours if ".mlp.experts." in n) and per_layer % 3 == 0
    for name in experts:
        assert ours[name][1] == stock[name][1], f"{name}: one sample per batch, as stock"
    # the first layer sees the same inputs as stock: the very same Hessians (stock's gathered
    # all-token outputs round differently from the routed ones, so later layers are close, not equal)
    first = [n for n in experts if n.startswith(layers[0] + ".")]
    assert [n for n in first if not torch.equal(ours[n][0], stock[n][0])] == []
    for name in experts:
        gap = (ours[name][0] - stock[name][0]).norm() / stock[name][0].norm()
        assert gap < 5e-2, (name, gap)
    # one gate/up product per batch and layer for all experts (+ one per expert's down);
    # each module's first call goes through the hook, which allocates its Hessian
    num_experts = per_layer // 3
    assert last_batching().products == len(layers) * (SAMPLES - 1) * (1 + num_experts), last_batching()
    assert modifier.coverage.totals.forced_tokens > 0


def test_blocks_built_for_llmcompressor_follow_its_flag_with_whole_batch_calls():
    """Outside DefuseModifier's routing, our blocks follow llm-compressor's all-experts flag the way
    LinearExperts2D does: one call per expert and batch over every token; the output stays routed."""
    pytest.importorskip("llmcompressor")
    from llmcompressor.modeling.moe.context import moe_calibration_context

    from defuser_quant.integrations.llmcompressor.stock_face import FollowCalibrationFlag

    model = _defused()
    for _, block in defused_blocks(model):
        block.forward_override = FollowCalibrationFlag()
    ids = make_ids(5)
    with torch.no_grad():
        reference = model(ids).logits
    inputs = _block_inputs(model, ids)
    for flag in (False, True):
        calls = []
        with capture_expert_inputs(model, lambda *a: calls.append(a), roles=("up",)), torch.no_grad():
            if flag:
                with moe_calibration_context():
                    logits = model(ids).logits
            else:
                logits = model(ids).logits
        assert torch.equal(logits, reference)
        if not flag:
            assert {c[4] for c in calls} == {"routed"} and len(calls) < NUM_EXPERTS * len(inputs) * 2
            continue
        assert len(calls) == NUM_EXPERTS * len(inputs) and {c[4] for c in calls} == {"all"}
        for path, _, _, x, _ in calls:
            assert torch.equal(x, inputs[path].reshape(-1, x.shape[-1]))


@pytest.mark.parametrize("grouped", [False, True])
def test_the_routed_output_suspends_hooks_only_on_the_module_path(grouped, monkeypatch):
    """Grouped, the routed output runs hook-free GEMMs (nothing to suspend); the loop suspends the experts'
    hooks. Either way the hooks see each expert's whole-batch call once and the output is the routed one."""
    from defuser_quant.calibration import routing

    model = _defused()
    (path, block), *_ = defused_blocks(model)
    hidden = _block_inputs(model, make_ids(2))[path]
    router_logits = torch.randn(hidden.shape[0], len(block), generator=torch.Generator().manual_seed(1))
    weights, index = router_logits.softmax(-1).topk(TOP_K, dim=-1)
    with torch.no_grad():
        reference = block.routed_forward(hidden, index, weights)
    suspended = []
    real = routing.suspended_hooks
    monkeypatch.setattr(routing, "suspended_hooks", lambda modules: suspended.append(1) or real(modules))
    seen = []
    for e, expert in enumerate(block):
        expert.up_proj.register_forward_hook(lambda m, a, out, e=e: seen.append((e, a[0].shape[0])))
    with torch.no_grad():
        output, routed = routing.whole_batch_forward(block, hidden, index, weights, grouped=grouped)
    assert suspended == ([] if grouped else [1])
    assert torch.equal(output, reference) and int(routed.sum()) == hidden.shape[0] * TOP_K
    # the routed pass fired no hook: each expert's up projection saw the whole batch exactly once
    assert sorted(seen) == [(e, hidden.shape[0]) for e in range(len(block))]


def test_an_empty_batch_is_recorded_once():
    from defuser_quant.calibration import grouped, routing

    model = _defused()
    (_, block), *_ = defused_blocks(model)
    hidden = torch.zeros(0, block[0].up_proj.in_features)
    index, weights = torch.zeros(0, TOP_K, dtype=torch.long), torch.zeros(0, TOP_K)
    with grouped.recording_grouped_use() as use, torch.no_grad():
        output, routed = routing.whole_batch_forward(block, hidden, index, weights, grouped=True)
    assert output.shape == (0, hidden.shape[1]) and int(routed.sum()) == 0
    assert use.fallbacks == {"no routed tokens in this batch": 1}


@pytest.mark.parametrize("family", FAMILIES)
def test_sync_free_whole_batch_calls_read_nothing_on_the_host_and_give_the_synced_calls(family, monkeypatch):
    """``sync_free=True``: the routed rows per expert stay where they were counted (here the CPU is let stand in
    for a device), no ``tolist``/``item`` during the calls; the hooks see the synced calls' rows, the output is the
    routed one, and the session's counts (folded when read) and a coverage tracker's are the synced ones."""
    from defuser_quant.calibration import capture

    model = _defused(family)
    batches = [make_ids(seed) for seed in range(2)]
    runs = {}
    for sync_free in (False, True):
        if sync_free:
            monkeypatch.setattr(capture, "HOST_COUNT_DEVICES", frozenset())
        calls, reads = [], []
        with CoverageTracker(model, min_tokens=8) as tracker, capture_expert_inputs(model, lambda *a: calls.append(a)), \
                routing_mode(model, "all", grouped=True, whole_batch=True, sync_free=sync_free) as session, torch.no_grad():
            model(batches[0])  # the first call builds the plan
            if sync_free:
                real_tolist = torch.Tensor.tolist
                monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append("tolist") or real_tolist(self))
            logits = model(batches[1]).logits
            monkeypatch.setattr(torch.Tensor, "tolist", torch.Tensor.tolist)
            pending = [bool(c._pending) for c in session.counts.values()]
            counts = {path: (c.routed.clone(), c.forced.clone()) for path, c in session.counts.items()}
        runs[sync_free] = calls, logits, counts, tracker.counts(), pending, reads
    (calls0, logits0, counts0, tracked0, pending0, _), (calls1, logits1, counts1, tracked1, pending1, reads1) = runs[False], runs[True]
    assert torch.equal(logits1, logits0)
    assert len(calls1) == len(calls0) and all(
        a[:3] == b[:3] and a[4] == b[4] and torch.equal(a[3], b[3]) for a, b in zip(calls0, calls1))
    assert reads1 == [] and all(pending1) and not any(pending0)
    assert counts1.keys() == counts0.keys() and all(
        torch.equal(counts1[p][0], counts0[p][0]) and torch.equal(counts1[p][1], counts0[p][1]) for p in counts0)
    assert tracked1 == tracked0


def test_sync_free_needs_grouped_whole_batch_calls():
    model = _defused()
    for kwargs in ({"whole_batch": True}, {"grouped": True}):
        with pytest.raises(ValueError, match="sync_free=True needs whole_batch=True and grouped=True"):
            with routing_mode(model, "all", sync_free=True, **kwargs):
                pass
