"""Calibration routing modes, per-expert capture and coverage reports on tiny random MoE models."""

from __future__ import annotations

import copy
import json
import logging
from collections import defaultdict

import pytest
import torch
import tiny
from defuser_quant import DefusedExperts, convert_model
from defuser_quant.calibration import (
    ROUTING_MODES,
    SCHEMA_VERSION,
    CoverageError,
    CoverageReport,
    CoverageTracker,
    ExpertCapture,
    NoDefusedExpertsError,
    build_report,
    capture_expert_inputs,
    current_provenance,
    provenance,
    routing_mode,
)

NUM_EXPERTS, TOP_K, BATCH, SEQ, VOCAB = 8, 2, 2, 16, 128
TOKENS = BATCH * SEQ
# Router module name per family (the zoo of the core tests builds the configs).
ROUTERS = {"qwen3_moe": "gate", "gpt_oss": "router", "mixtral": "gate"}


def _configs() -> dict:
    return {
        family: (tiny.FAMILIES[family][1], tiny.FAMILIES[family][0](vocab_size=VOCAB, num_experts_per_tok=TOP_K), router)
        for family, router in ROUTERS.items()
    }


FAMILIES = tuple(_configs())


def build_fused(family: str, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A tiny fused model, eager experts, expert and router weights ~ randn * 0.1."""
    cls, config, _ = _configs()[family]
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    model = cls(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 3 or ".experts." in name or ".mlp.gate." in name or ".mlp.router." in name:
                param.copy_(torch.randn_like(param) * 0.1)
    return model.to(dtype)


def build_pair(family: str, dtype: torch.dtype = torch.float32):
    fused = build_fused(family, dtype)
    defused = copy.deepcopy(fused)
    convert_model(defused)
    return fused, defused


def make_ids(seed: int = 1, batch: int = BATCH, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def blocks(model) -> list[tuple[str, DefusedExperts]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DefusedExperts)]


def router_counts(model, family: str, ids) -> dict[str, list[int]]:
    """Routed tokens per expert from the router's own logits (our own top-k, not our code's)."""
    router_attr = _configs()[family][2]
    found: dict[str, list[int]] = {}
    handles = []
    for path, _ in blocks(model):
        router = model.get_submodule(path.rsplit(".", 1)[0] + "." + router_attr)

        def hook(module, args, output, path=path):
            top = torch.topk(output[0].float(), TOP_K, dim=-1).indices
            found[path] = torch.bincount(top.flatten(), minlength=NUM_EXPERTS).tolist()

        handles.append(router.register_forward_hook(hook))
    try:
        logits(model, ids)
    finally:
        for h in handles:
            h.remove()
    return found


class Recorder:
    """Capture consumer: rows per (layer, expert, role, provenance), and the forced rows themselves."""

    def __init__(self):
        self.rows: dict[tuple, int] = defaultdict(int)
        self.inputs: dict[tuple, list[torch.Tensor]] = defaultdict(list)

    def __call__(self, path, expert, role, inputs, prov):
        assert current_provenance() == prov
        self.rows[(path, expert, role, prov)] += inputs.shape[0]
        self.inputs[(path, expert, role, prov)].append(inputs.clone())


# ----- exactness -------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_mode_keeps_logits_exact(family, dtype):
    fused, defused = build_pair(family, dtype)
    ids = make_ids()
    ref_defused = logits(defused, ids)
    ref_fused = logits(fused, ids)
    if family == "gpt_oss":
        # the core's F.linear(x, W, b) vs the fused eager `x @ W + b`: ulp-level differences only
        tol = 1e-5 if dtype == torch.float32 else 3e-2
        torch.testing.assert_close(ref_defused, ref_fused, atol=tol, rtol=tol)
    else:
        assert torch.equal(ref_defused, ref_fused)
    for mode in ROUTING_MODES:
        with routing_mode(defused, mode, min_tokens=TOKENS - 4) as session:
            out = logits(defused, ids)
        assert torch.equal(out, ref_defused), mode
        forced = sum(int(c.forced.sum()) for c in session.counts.values())
        assert (forced > 0) == (mode != "routed"), (mode, forced)
    assert torch.equal(logits(defused, ids), ref_defused)


def test_fallback_routing_keeps_logits_exact():
    _, defused = build_pair("qwen3_moe")
    ids = make_ids()
    ref = logits(defused, ids)
    path = blocks(defused)[0][0]
    with routing_mode(defused, "all", experts={path: [1, 5]}, observe_routed=False):
        assert torch.equal(logits(defused, ids), ref)


# ----- counts ----------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_routed_counts_match_router_topk(family):
    _, defused = build_pair(family)
    ids = make_ids(seed=3)
    expected = router_counts(defused, family, ids)
    with CoverageTracker(defused, min_tokens=TOKENS) as tracker, routing_mode(defused, "budgeted", min_tokens=TOKENS // 2) as session:
        logits(defused, ids)
    counts = tracker.counts()
    assert set(counts) == set(expected) and len(expected) == 2
    for path, want in expected.items():
        assert sum(want) == TOKENS * TOP_K
        assert counts[path][0] == want
        assert session.counts[path].routed.tolist() == want
        assert counts[path][1] == session.counts[path].forced.tolist()
    report = tracker.report()
    for layer in report.layers:
        assert layer.top_k_assignments == TOKENS * TOP_K
        assert [e.router_share for e in layer.experts] == [r / (TOKENS * TOP_K) for r in expected[layer.path]]


@pytest.mark.parametrize("family", FAMILIES)
def test_all_mode_reaches_every_expert_with_every_token(family):
    _, defused = build_pair(family)
    ids = make_ids()
    expected = router_counts(defused, family, ids)
    block_inputs = {}

    def grab(module, args, kwargs, path):
        block_inputs[path] = (args[0].detach().clone(), (*args[1:], *kwargs.values())[0].clone())

    handles = [b.register_forward_pre_hook(lambda m, a, k, p=p: grab(m, a, k, p), with_kwargs=True) for p, b in blocks(defused)]
    recorder = Recorder()
    with capture_expert_inputs(defused, recorder), routing_mode(defused, "all"):
        logits(defused, ids)
    for h in handles:
        h.remove()
    roles = ("gate", "up", "down")
    for path, block in blocks(defused):
        hidden, top_k_index = block_inputs[path]
        for e in range(NUM_EXPERTS):
            for role in roles:
                routed = recorder.rows[(path, e, role, "routed")]
                forced = recorder.rows[(path, e, role, "forced")]
                assert routed == expected[path][e]
                assert routed + forced == TOKENS
            not_routed = ~(top_k_index == e).any(dim=-1)
            forced_in = torch.cat(recorder.inputs[(path, e, "up", "forced")])
            assert torch.equal(forced_in, hidden[not_routed])


def test_budgeted_reaches_min_tokens():
    _, defused = build_pair("qwen3_moe")
    min_tokens = 20
    with routing_mode(defused, "routed") as first_batch:
        logits(defused, make_ids(1))
    with CoverageTracker(defused, min_tokens=min_tokens) as tracker, routing_mode(defused, "budgeted", min_tokens=min_tokens) as s:
        for seed in (1, 2):
            logits(defused, make_ids(seed))
    report = tracker.report()
    assert not report.under_threshold
    assert all(e.calibrated >= min_tokens for layer in report.layers for e in layer.experts)
    assert report.totals.forced_tokens > 0
    for layer in report.layers:
        routed_first = first_batch.counts[layer.path].routed.tolist()
        # the floor is met within the first batch, with exactly the missing tokens, never more
        assert [e.forced for e in layer.experts] == [max(0, min_tokens - r) for r in routed_first]
        assert s.counts[layer.path].routed.tolist() == [e.routed for e in layer.experts]
    with routing_mode(defused, "budgeted", min_tokens=0) as s0:
        logits(defused, make_ids())
    assert all(int(c.forced.sum()) == 0 for c in s0.counts.values())


def test_budgeted_counts_accumulate_across_batches():
    _, defused = build_pair("qwen3_moe")
    with routing_mode(defused, "budgeted", min_tokens=TOKENS // 2) as session:
        logits(defused, make_ids(1))
        first = {p: c.forced.clone() for p, c in session.counts.items()}
        logits(defused, make_ids(2))
    for path, counts in session.counts.items():
        assert first[path].sum() > 0
        assert torch.equal(counts.forced, first[path])  # every expert already reached the floor in batch 1


# ----- provenance and capture ------------------------------------------------------------------
def test_provenance_reported_correctly():
    _, defused = build_pair("mixtral")
    ids = make_ids()
    assert current_provenance() == "routed"
    with provenance("forced"):
        assert current_provenance() == "forced"
    assert current_provenance() == "routed"
    with pytest.raises(ValueError):
        with provenance("bogus"):  # type: ignore[arg-type]
            pass
    recorder = Recorder()
    with capture_expert_inputs(defused, recorder, roles=("up",)):
        logits(defused, ids)
        with provenance("forced"), routing_mode(defused, "routed"):
            logits(defused, ids)  # the routing override marks routed tokens "routed" whatever is outside
    assert {k[3] for k in recorder.rows} == {"routed"}
    assert {k[2] for k in recorder.rows} == {"up"}
    assert sum(recorder.rows.values()) == 2 * 2 * TOKENS * TOP_K
    recorder = Recorder()
    with capture_expert_inputs(defused, recorder, roles=("down",)), routing_mode(defused, "budgeted", min_tokens=TOKENS // 2) as s:
        logits(defused, ids)
    for path, counts in s.counts.items():
        for e in range(NUM_EXPERTS):
            assert recorder.rows[(path, e, "down", "forced")] == int(counts.forced[e])
            assert recorder.rows[(path, e, "down", "routed")] == int(counts.routed[e])


def test_capture_handles_and_role_validation():
    _, defused = build_pair("qwen3_moe")
    capture = ExpertCapture(defused, Recorder(), roles=("gate", "down"), layers=lambda p: ".0." in p)
    with capture:
        assert len(capture.handles) == NUM_EXPERTS * 2
    assert not capture.handles
    assert all(not lin._forward_pre_hooks for _, b in blocks(defused) for ex in b for lin in ex.children())
    with pytest.raises(ValueError, match="unknown projection role"):
        ExpertCapture(defused, Recorder(), roles=("gate_up",))


def test_no_defused_experts_is_a_clear_error():
    fused = build_fused("qwen3_moe")
    with pytest.raises(NoDefusedExpertsError, match="convert_model"):
        with routing_mode(fused, "all"):
            pass
    with pytest.raises(NoDefusedExpertsError, match="convert_model"):
        CoverageTracker(fused)
    with pytest.raises(NoDefusedExpertsError):
        capture_expert_inputs(fused, Recorder())


def test_bad_arguments():
    _, defused = build_pair("qwen3_moe")
    with pytest.raises(ValueError, match="unknown routing mode"):
        with routing_mode(defused, "everything"):  # type: ignore[arg-type]
            pass
    with pytest.raises(ValueError, match="no DefusedExperts block"):
        with routing_mode(defused, "all", experts={"model.nope": [0]}):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with routing_mode(defused, "all", experts={blocks(defused)[0][0]: [NUM_EXPERTS]}):
            pass
    assert all(b.forward_override is None for _, b in blocks(defused))


# ----- context restore -------------------------------------------------------------------------
def test_context_restores_overrides_also_after_exception():
    _, defused = build_pair("gpt_oss")
    ids = make_ids()
    ref = logits(defused, ids)

    def sentinel(block, hidden_states, top_k_index, top_k_weights):
        return block.routed_forward(hidden_states, top_k_index, top_k_weights)

    all_blocks = [b for _, b in blocks(defused)]
    all_blocks[0].forward_override = sentinel
    with routing_mode(defused, "all"):
        assert all(b.forward_override not in (None, sentinel) for b in all_blocks)
        with routing_mode(defused, "budgeted", min_tokens=4):
            logits(defused, ids)
        assert all(b.forward_override not in (None, sentinel) for b in all_blocks)
    assert all_blocks[0].forward_override is sentinel and all_blocks[1].forward_override is None

    with pytest.raises(RuntimeError, match="boom"):
        with routing_mode(defused, "all"):
            logits(defused, ids)
            raise RuntimeError("boom")
    assert all_blocks[0].forward_override is sentinel and all_blocks[1].forward_override is None
    all_blocks[0].forward_override = None
    assert torch.equal(logits(defused, ids), ref)


# ----- coverage report and policies ------------------------------------------------------------
@pytest.fixture(scope="module")
def routed_only():
    """qwen3_moe after one routed calibration pass over two batches, tracked at min_tokens=12."""
    _, defused = build_pair("qwen3_moe")
    batches = [{"input_ids": make_ids(seed)} for seed in (1, 2)]
    tracker = CoverageTracker(defused, min_tokens=12).attach()
    with torch.no_grad():
        for batch in batches:
            defused(**batch)
    return defused, tracker, batches


def test_report_counts_and_under_threshold(routed_only):
    _, tracker, _ = routed_only
    report = tracker.report()
    assert report.totals.layers == 2 and report.totals.experts == 2 * NUM_EXPERTS
    assert report.totals.routed_tokens == 2 * 2 * TOKENS * TOP_K
    assert report.totals.forced_tokens == 0
    under = [(layer.path, e.expert) for layer in report.layers for e in layer.experts if e.calibrated < 12]
    assert under and [(r.layer, r.expert) for r in report.under_threshold] == under
    assert report.worst(1)[0].calibrated == min(e.calibrated for layer in report.layers for e in layer.experts)


def test_policy_error_names_experts(routed_only):
    _, tracker, _ = routed_only
    report = tracker.report()
    with pytest.raises(CoverageError) as info:
        tracker.enforce("error")
    assert info.value.experts == report.under_threshold
    first = report.under_threshold[0]
    assert f"{first.layer}[{first.expert}]" in str(info.value)
    with pytest.raises(ValueError, match="unknown coverage policy"):
        report.apply_policy("ignore")  # type: ignore[arg-type]


def test_policy_warn_logs(routed_only, caplog):
    _, tracker, _ = routed_only
    report = tracker.report()
    with caplog.at_level(logging.WARNING, logger="defuser_quant.calibration.coverage"):
        result = tracker.enforce("warn")
    assert result == report
    assert not report.apply_policy("warn")
    text = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert f"{len(report.under_threshold)} of {2 * NUM_EXPERTS} experts" in text
    for ref in report.under_threshold[:5]:
        assert f"{ref.layer}[{ref.expert}]" in text


def test_policy_fallback_calibrates_them():
    _, defused = build_pair("qwen3_moe")
    batches = [{"input_ids": make_ids(seed)} for seed in (1, 2)]
    tracker = CoverageTracker(defused, min_tokens=12).attach()
    with torch.no_grad():
        refs = [defused(**b).logits for b in batches]
    before = tracker.report()
    plan = before.apply_policy("fallback")
    assert plan and plan.num_experts == len(before.under_threshold)
    # a quantizer-style hook: during the fallback pass it must see forced tokens only
    recorder = Recorder()
    seen_logits = []

    def forward(model, batch):
        seen_logits.append(model(**batch).logits)

    with ExpertCapture(defused, recorder):
        after = tracker.enforce("fallback", batches, forward=forward)
    assert all(torch.equal(a, b) for a, b in zip(seen_logits, refs))
    assert not after.under_threshold
    fallback = {(r.layer, r.expert) for r in before.under_threshold}
    total = len(batches) * TOKENS
    for layer_before, layer_after in zip(before.layers, after.layers):
        for eb, ea in zip(layer_before.experts, layer_after.experts):
            assert ea.routed == eb.routed  # no routed token counted twice
            if (layer_after.path, ea.expert) in fallback:
                assert ea.calibrated == total and ea.forced == total - eb.routed
            else:
                assert ea.forced == 0 == eb.forced
    assert {k[3] for k in recorder.rows} == {"forced"}
    assert {(k[0], k[1]) for k in recorder.rows} == fallback
    tracker.remove()


def test_policy_fallback_raises_when_data_is_too_small():
    _, defused = build_pair("qwen3_moe")
    batches = [make_ids(1)]
    with CoverageTracker(defused, min_tokens=TOKENS + 1) as tracker:
        with torch.no_grad():
            defused(batches[0])
        with pytest.raises(CoverageError, match="even after the all-experts pass"):
            tracker.enforce("fallback", batches)
        with pytest.raises(ValueError, match="needs the calibration batches"):
            tracker.enforce("fallback")


def _no_nan(token: str):
    raise AssertionError(f"non-finite number {token} in the JSON report")


def test_json_report_matches_schema(routed_only, tmp_path):
    _, tracker, _ = routed_only
    report = tracker.report()
    path = report.to_json(tmp_path / "sub" / "coverage.json")
    data = json.loads(path.read_text(), parse_constant=_no_nan)
    assert data["schema_version"] == SCHEMA_VERSION == 1
    assert set(data) == {"schema_version", "min_tokens", "totals", "layers", "under_threshold"}
    assert set(data["totals"]) == {"layers", "experts", "routed_tokens", "forced_tokens", "calibrated_tokens", "under_threshold"}
    for layer in data["layers"]:
        assert set(layer) == {"path", "layer_index", "num_experts", "top_k_assignments", "experts"}
        assert layer["layer_index"] in (0, 1)
        assert abs(sum(e["router_share"] for e in layer["experts"]) - 1.0) < 1e-9
        for e in layer["experts"]:
            assert set(e) == {"expert", "routed", "forced", "calibrated", "router_share", "under_threshold"}
    for ref in data["under_threshold"]:
        assert set(ref) == {"layer", "layer_index", "expert", "routed", "forced", "calibrated"}
    assert CoverageReport.from_json(path) == report
    data["layers"][0]["experts"][0]["calibrated"] += 1
    with pytest.raises(ValueError, match="inconsistent"):
        CoverageReport.model_validate(data)


def test_empty_layer_has_zero_share_not_nan():
    report = build_report({"model.layers.0.mlp.experts": ([0, 0], [0, 0])}, min_tokens=1)
    assert [e.router_share for e in report.layers[0].experts] == [0.0, 0.0]
    assert report.totals.under_threshold == 2


def test_console_summary_and_heatmap(routed_only, tmp_path):
    from rich.console import Console

    _, tracker, _ = routed_only
    report = tracker.report()
    console = Console(record=True, width=140, file=open(tmp_path / "console.txt", "w"))
    text = report.console_summary(console, worst=5)
    assert "Expert coverage" in text and "UNDER" in text and "under threshold:" in text
    assert "UNDER" in console.export_text()
    png = report.heatmap(tmp_path / "plots" / "coverage.png")
    raw = png.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and len(raw) > 1000
    import matplotlib.image

    assert matplotlib.image.imread(png).ndim == 3


@pytest.mark.parametrize("mode", ["all", "budgeted"])
def test_identity_expert_indices_are_never_forced(mode):
    """longcat_flash routes some tokens to identity experts (indices >= num_experts)."""
    from model_zoo import build_tiny_model

    model, inputs = build_tiny_model("longcat_flash")
    with torch.no_grad():
        ref = model(**inputs).logits
    convert_model(model)
    with routing_mode(model, mode, min_tokens=4):
        with torch.no_grad():
            out = model(**inputs).logits
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
