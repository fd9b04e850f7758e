"""Coverage totals against independent counts: routed tokens from the router's own top-k,
calibrated tokens from the rows every expert Linear actually saw, in a mode that forces extra
tokens (so routed and calibrated differ)."""

from __future__ import annotations

from test_calibration_routing import TOKENS, TOP_K, blocks, build_pair, logits, make_ids, router_counts

from defuser_quant.calibration import CoverageTracker, routing_mode


def test_totals_count_routed_forced_and_calibrated_tokens_separately():
    _, defused = build_pair("qwen3_moe")
    ids = make_ids(seed=5)
    routed = router_counts(defused, "qwen3_moe", ids)
    rows = {"n": 0}

    def count_rows(module, args):
        rows["n"] += args[0].shape[0]

    handles = [expert.gate_proj.register_forward_pre_hook(count_rows) for _, block in blocks(defused) for expert in block]
    try:
        with CoverageTracker(defused, min_tokens=TOKENS) as tracker, routing_mode(defused, "all"):
            logits(defused, ids)
    finally:
        for handle in handles:
            handle.remove()
    totals = tracker.report().totals
    assert totals.routed_tokens == sum(sum(v) for v in routed.values()) == len(routed) * TOKENS * TOP_K
    assert totals.calibrated_tokens == rows["n"] > totals.routed_tokens
    assert totals.forced_tokens == totals.calibrated_tokens - totals.routed_tokens
