"""benchmarks/calibration_throughput.py: the fused all-experts baseline and which baseline each ratio uses."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))

import calibration_throughput as ct  # noqa: E402

ARGS = ["--hidden", "64", "--intermediate", "32", "--experts", "8", "--top-k", "2", "--layers", "2", "--heads", "4",
        "--kv-heads", "2", "--head-dim", "16", "--vocab", "128", "--batch-size", "1", "--seq-len", "16", "--batches", "1",
        "--repeats", "1", "--threads", "1"]


def test_all_experts_routing_sends_every_token_through_every_expert():
    args = ct.parse_args(ARGS)
    model = ct.build_model(args, torch.device("cpu"), torch.float32)
    model.set_experts_implementation("grouped_mm")
    routers = ct.top_k_routers(model)
    assert len(routers) == args.layers and {r.top_k for r in routers} == {args.top_k}
    seen = []
    for layer in model.model.layers:
        layer.mlp.experts.register_forward_pre_hook(lambda m, a, k: seen.append(tuple(a[1].shape)), with_kwargs=True)
    ids = torch.randint(0, args.vocab, (1, args.seq_len))
    with torch.no_grad():
        top_k = model(ids).logits
        assert seen == [(args.seq_len, args.top_k)] * args.layers
        seen.clear()
        with ct.all_experts_routing(model):
            every = model(ids).logits
        assert seen == [(args.seq_len, args.experts)] * args.layers  # every token routed to all experts
    assert {r.top_k for r in routers} == {args.top_k}  # restored
    assert not torch.equal(top_k, every)


def test_rows_name_their_baselines(tmp_path):
    out = tmp_path / "result.json"
    ct.main([*ARGS, "--output", str(out)])
    result = json.loads(out.read_text())
    rows = {f"{r['model']}/{r['variant']}": r for r in result["rows"]}
    every = rows["fused/grouped_mm all experts"]
    fast = rows["fused/grouped_mm"]
    assert set(result["baselines"]) == {"vs_fused_eager", "vs_fused_fast", "vs_fused_all_experts", "slowdown"}
    assert result["command"].startswith("python ") and "--output" in result["command"]  # the result says how it was made
    for name, row in rows.items():
        assert row["vs_fused_all_experts"] == row["tokens_per_second"] / every["tokens_per_second"]
        assert row["vs_fused_fast"] == row["tokens_per_second"] / fast["tokens_per_second"]
        if row["model"] != "defused":
            assert "slowdown" not in row
            continue
        same_work = every if row["variant"].startswith("all") else fast
        assert row["slowdown"]["baseline"] == f"fused/{same_work['variant']}", name
        assert row["slowdown"]["times"] == row["seconds_per_pass"] / same_work["seconds_per_pass"]
    assert rows["defused/all grouped"]["exact_vs_defused"] and rows["defused/routed grouped"]["exact_vs_defused"]
    whole = rows["defused/all whole-batch grouped"]
    assert whole["exact_vs_defused"] and whole["slowdown"]["baseline"] == f"fused/{every['variant']}"
    assert whole["forced_tokens_per_pass"] == rows["defused/all grouped"]["forced_tokens_per_pass"] > 0
