"""``benchmarks/distributed_gpu.py`` for real on the CPU: ``all`` against ``all-unshared`` (shared gate/up Hessians off)
``all-rehearse`` (the kernel rehearsal, opt-in), ``all-syncfree`` (the propagation's grouped forwards
without a host sync, opt-in), ``all-mmloop`` (the Hessian products one ``mm`` per expert, never a ``bmm``) and
``all-looppack`` (the save's per-module packing, the stacked packing off)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import distributed_gpu as dg  # noqa: E402


@pytest.mark.slow
def test_all_and_its_opt_in_variants_record_what_they_did_and_give_the_same_checkpoint(tmp_path):
    pytest.importorskip("llmcompressor")
    out = tmp_path / "distributed.json"
    dg.main(["--device", "cpu", "--tiny", "--variants", "all@1,all-unshared@1,all-rehearse@1,all-syncfree@1,all-mmloop@1,all-looppack@1,all-frozensave@1", "--workdir", str(tmp_path / "work"),
             "--output", str(out)])
    payload = json.loads(out.read_text())
    rows = {row["variant"]: row for row in payload["rows"]}
    assert set(rows) == {"all", "all-unshared", "all-rehearse", "all-syncfree", "all-mmloop", "all-looppack", "all-frozensave"} and not any("error" in row for row in rows.values()), rows
    shared, unshared = rows["all"]["hessian_batching"][0], rows["all-unshared"]["hessian_batching"][0]
    assert shared["shared_groups"] == shared["settles"] == 2  # one group per layer, written before each solve
    assert unshared["shared_groups"] == 0 and unshared["batched"] == shared["batched"] > 0
    same = rows["all-unshared"]["checkpoint_vs_shared"]
    total = same["tensors"].split("/")[1]
    assert same["tensors"] == f"{total}/{total}" and same["only_in_one"] == 0 and same["max_scale_diff"] == 0.0, same
    # every rank's full garbage collections during oneshot, counted and timed
    for row in rows.values():
        # how busy the host was beside the run: the launched processes counted as the run's, named in the table
        assert row["host_load"]["run_cores"] > 0 and f"| {row['variant']} x1 | " in payload["host_table"]
        (gc_full,) = row["gc_full"]
        assert set(gc_full) == {"collections", "seconds", "longest_s", "by_stage"} and gc_full["collections"] >= 0
        assert (gc_full["seconds"] > 0) == (gc_full["collections"] > 0) and gc_full["longest_s"] <= gc_full["seconds"]
        assert sum(where["collections"] for where in gc_full["by_stage"].values()) == gc_full["collections"]
    # on the CPU the rehearsal says why it did not run; all (rehearse=False) has none; the same checkpoint
    skipped = {"seconds": {}, "not_run": [], "failed": {}, "skipped": "no model tensor on a CUDA device"}
    assert rows["all-rehearse"]["rehearsal"] == [skipped] and rows["all"]["rehearsal"] == [None]
    # the propagation passes' calls (one per layer and calibration row) ran without a host sync, with the option only
    assert rows["all"]["grouped_use"][0]["without_sync"] == 0
    propagation_calls = payload["shape"]["layers"] * payload["shape"]["samples"]
    assert rows["all-syncfree"]["grouped_use"][0]["without_sync"] == propagation_calls
    # the CPU is no stacked device: no bmm shape checked in either (the GPU rows list theirs)
    assert rows["all"]["hessian_batching"][0]["stacked_checks"] == rows["all-mmloop"]["hessian_batching"][0]["stacked_checks"] == []
    # the stacked packing is on by default (off in all-looppack) and says why nothing was stacked on the CPU
    quantized = int(rows["all-looppack"]["checkpoint_vs_batched_pack"]["qweights_equal"].split("/")[1])
    assert rows["all-looppack"]["compression_batching"] == [None]
    assert rows["all"]["compression_batching"] == [{"modules": 0, "groups": 0, "chunks": 0, "checked": 0,
                                                    "mismatched": 0, "left": {"on cpu (batched on cuda)": quantized}}]
    # the frozen save froze (its full collections, if any, are the save's own) and only that variant's did
    (frozen,) = rows["all-frozensave"]["frozen_save"]
    assert frozen["froze"] is True and frozen["stock"] is None and rows["all"]["frozen_save"] == [None]
    for variant, key in (("all-rehearse", "checkpoint_vs_unrehearsed"), ("all-syncfree", "checkpoint_vs_synced"),
                         ("all-mmloop", "checkpoint_vs_stacked"), ("all-looppack", "checkpoint_vs_batched_pack"),
                         ("all-frozensave", "checkpoint_vs_unfrozen")):
        same = rows[variant][key]
        assert same["tensors"] == f"{total}/{total}" and same["only_in_one"] == 0, (variant, same)
    # the grouping by identical checkpoints takes those comparisons' verdicts and reads no pair again
    groups = [["all x1", "all-unshared x1", "all-rehearse x1", "all-syncfree x1", "all-mmloop x1", "all-looppack x1",
               "all-frozensave x1"]]
    assert payload["checkpoint_groups"] == {"x1": {"groups": groups, "unsettled": [], "read": []}}
    assert ("Identical checkpoints (x1, every tensor equal): {all x1, all-unshared x1, all-rehearse x1, all-syncfree x1, "
            "all-mmloop x1, all-looppack x1, all-frozensave x1}"
            in payload["vs_stock_table"])


@pytest.mark.slow
def test_twice_runs_each_oneshot_again_in_its_process(tmp_path):
    pytest.importorskip("llmcompressor")
    out = tmp_path / "twice.json"
    dg.main(["--device", "cpu", "--tiny", "--variants", "stock@1,all@1", "--twice", "--workdir", str(tmp_path / "work"),
             "--output", str(out)])
    payload = json.loads(out.read_text())
    rows = {row["variant"]: row for row in payload["rows"]}
    assert set(rows) == {"stock", "all"} and not any("error" in row for row in rows.values()), rows
    for variant, row in rows.items():
        assert row["oneshot_again_s"] > 0
        assert (tmp_path / "work" / f"{variant}-n1" / "checkpoint-again").is_dir()
        first_use = row["oneshot_s"] - row["oneshot_again_s"]
        assert f"| {variant} x1 | {row['oneshot_s']:.1f} | {row['oneshot_again_s']:.1f} | {first_use:.1f} |" \
            in payload["first_use_table"]


def test_a_rows_stacked_checks_name_each_field_of_the_checked_shape(monkeypatch):
    """``hessian_batching.stacked_checks``: one JSON record per shape checked, its fields by name."""
    pytest.importorskip("llmcompressor")
    import torch

    from defuser_quant.calibration import gram

    monkeypatch.setattr(gram, "STACKED_DEVICES", frozenset({"cpu"}))
    monkeypatch.setattr(gram, "_STACKED_EXACT", {})
    rows = torch.randn(4 * 8, 16)
    list(gram.gram_products(rows, [(i * 8, 8) for i in range(4)]))
    record = dg._hessian_batching(type("Defuse", (), {"grouped": True})())
    assert json.loads(json.dumps(record["stacked_checks"])) == [{
        "shape": [4, 8, 16], "strides": [128, 16, 1], "dtype": "torch.float32", "device": "cpu",
        "matmul_settings": [torch.get_float32_matmul_precision(), torch.backends.cuda.matmul.allow_tf32,
                            torch.are_deterministic_algorithms_enabled()],
        "exact": True}]
