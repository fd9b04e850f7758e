"""``benchmarks/_groups.py`` and ``distributed_gpu.checkpoint_groups``: runs grouped by identical checkpoints,
reading only the pairs no known verdict settles, and none once the deadline is near."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import distributed_gpu as dg  # noqa: E402
from _groups import group_identical  # noqa: E402

#: which checkpoint each run wrote: equal letters, identical checkpoints
WROTE = {"s0": "A", "a0": "A", "s1": "B", "a1": "B", "u1": "B", "x": "C"}


def reader(calls: list):
    def compare(a, b):
        calls.append((a, b))
        return WROTE[a] == WROTE[b]
    return compare


def test_known_verdicts_of_any_member_settle_a_pair_and_only_the_rest_is_read():
    calls: list = []
    known = {("s0", "a0"): True, ("s1", "a1"): True, ("a1", "u1"): True, ("s0", "x"): False}
    groups, unsettled = group_identical(["s0", "s1", "a0", "a1", "u1", "x"], known, reader(calls))
    assert groups == [["s0", "a0"], ["s1", "a1", "u1"], ["x"]] and unsettled == []
    # s1 against s0, then x against s1's group: two reads; a0, a1, u1 and x-vs-s0 came from the known verdicts
    assert calls == [("s0", "s1"), ("s1", "x")]
    # every verdict known: nothing read
    calls.clear()
    everything = {(a, b): WROTE[a] == WROTE[b] for a in WROTE for b in WROTE if a < b}
    assert group_identical(list(WROTE), everything, reader(calls))[0] == [["s0", "a0"], ["s1", "a1", "u1"], ["x"]]
    assert calls == []


def test_once_no_read_may_start_the_runs_no_known_verdict_places_are_unsettled():
    calls: list = []
    known = {("s0", "a0"): True, ("s1", "a1"): True}
    groups, unsettled = group_identical(["s0", "s1", "a0", "a1"], known, reader(calls), may_compare=lambda: False)
    assert groups == [["s0", "a0"]] and unsettled == ["s1", "a1"] and calls == []
    # a deadline reached after the first read: the later runs that need a read stay unsettled, not new groups
    allowed = iter([True, False, False])
    groups, unsettled = group_identical(["s0", "x", "s1"], {}, reader(calls), may_compare=lambda: next(allowed))
    assert groups == [["s0"], ["x"]] and unsettled == ["s1"] and calls == [("s0", "x")]


def row(variant: str, repeat: int, **extra) -> dict:
    return {"variant": variant, "nproc": 1, "repeat": repeat, "oneshot_s": 10.0, "checkpoint": f"/ck/{variant}-r{repeat}",
            **extra}


def test_distributed_runs_of_every_round_are_grouped_from_their_stock_comparisons(monkeypatch):
    """Round 42's worry for llm-compressor: the stock runs of two rounds disagree (index_add_ on CUDA); each of
    ours matched its own round's stock run, so the call's runs form two groups, found with one read."""
    same = {"tensors": "10/10", "only_in_one": 0}
    differ = {"tensors": "9/10", "only_in_one": 0}
    rows = [row("stock", 0), row("all", 0, vs_stock={"checkpoint": same}),
            row("all-unshared", 0, vs_stock={"checkpoint": same}, checkpoint_vs_shared=same),
            row("stock", 1), row("all", 1, vs_stock={"checkpoint": same}),
            row("all-unshared", 1, vs_stock={"checkpoint": differ}, checkpoint_vs_shared=differ),
            row("all", 2, error="exit 1")]
    calls = []

    def compare(a: Path, b: Path) -> dict:
        calls.append((a.name, b.name))
        return differ
    monkeypatch.setattr(dg, "compare_checkpoints", compare)
    found = dg.checkpoint_groups(rows, lambda: None)
    assert found["x1"]["groups"] == [["stock x1 r0", "all x1 r0", "all-unshared x1 r0"], ["stock x1 r1", "all x1 r1"],
                                     ["all-unshared x1 r1"]]
    # read: the second stock run against the first, and the odd run against the first group (that it differs
    # from its own round's runs does not say whether it matches round 0's); all r1 came from its stock verdict
    assert found["x1"]["unsettled"] == [] and calls == [("stock-r0", "stock-r1"), ("stock-r0", "all-unshared-r1")]
    assert [x["pair"] for x in found["x1"]["read"]] == [["stock x1 r0", "stock x1 r1"], ["stock x1 r0", "all-unshared x1 r1"]]
    line = dg.groups_markdown(found)
    assert line == "Identical checkpoints (x1, every tensor equal): {stock x1 r0, all x1 r0, all-unshared x1 r0} | " \
                   "{stock x1 r1, all x1 r1} | {all-unshared x1 r1}"
    # 8 s to the deadline: no read starts, and the second round's runs are not guessed into a group
    calls.clear()
    late = dg.checkpoint_groups(rows, lambda: 8.0)
    assert late["x1"]["groups"] == [["stock x1 r0", "all x1 r0", "all-unshared x1 r0"]] and calls == []
    assert late["x1"]["unsettled"] == ["stock x1 r1", "all x1 r1", "all-unshared x1 r1"]
    assert dg.groups_markdown(late).endswith("; not compared before the deadline: stock x1 r1, all x1 r1, all-unshared x1 r1")
