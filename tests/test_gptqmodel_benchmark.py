"""benchmarks/gptqmodel_gpu.py's bookkeeping: flags, stage breakdown, 1-vs-N-GPU comparison rows."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import gptqmodel_gpu as bench  # noqa: E402


def test_gpu_counts_are_parsed_and_checked():
    args = bench.parse_args(["--gpu-counts", "1,2", "--variants", "ours-grouped-batched"])
    assert args.gpu_counts == [1, 2]
    for bad in (["--gpu-counts", "1,x"], ["--gpu-counts", "0"], ["--gpu-counts", "1,2", "--device", "cpu"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    assert {"ours-batched", "ours-grouped-batched"} <= set(bench.VARIANTS)


def test_repeat_runs_the_list_round_after_round():
    assert bench.parse_args(["--device", "cpu"]).repeat == 1
    assert bench.runs_of(["ours", "stock"], 1) == [("ours", "ours"), ("stock", "stock")]
    assert bench.runs_of(["ours", "stock"], 3) == [("ours", "ours"), ("stock", "stock"), ("ours", "ours#2"),
                                                   ("stock", "stock#2"), ("ours", "ours#3"), ("stock", "stock#3")]


def test_ratios_pair_every_run_with_every_stock_run():
    def row(variant, total, quantize, **extra):
        return {"variant": variant, "run": variant, "total_s": total, "quantize_s": quantize, **extra}

    rows = [row("ours", 10.0, 8.0), row("stock", 40.0, 36.0), row("ours", 12.0, 9.0), row("stock+si5000", 48.0, 45.0),
            row("ours-all", 20.0, 18.0), row("ours", 1.0, 1.0, error="exit 1")]
    ratios = bench.ratios_vs_stock(rows)
    assert list(ratios) == ["ours", "ours-all"]  # a run that failed counts nowhere; every stock-based variant is stock
    # ours: 40/10, 40/12, 48/10, 48/12 end to end; 36/8, 36/9, 45/8, 45/9 quantize
    assert ratios["ours"] == {"runs": 2, "stock_runs": 2,
                              "end_to_end": {"min": 3.33, "median": 4.0, "max": 4.8},
                              "quantize": {"min": 4.0, "median": 4.75, "max": 5.62}}
    assert ratios["ours-all"]["end_to_end"] == {"min": 2.0, "median": 2.2, "max": 2.4}
    table = bench.ratios_markdown(ratios)
    assert "| ours | 2 | 2 | 3.33x / 4.00x / 4.80x | 4.00x / 4.75x / 5.62x |" in table
    assert bench.ratios_vs_stock([row("ours", 10.0, 8.0)]) == {} and bench.ratios_markdown({}) == ""


def test_the_checkpoint_reference_is_the_first_stock_run_that_finished():
    def row(variant, run=None, **extra):
        return {"variant": variant, "run": run or variant, **extra}

    plain = [row("ours"), row("stock+cpuw4"), row("stock", error="exit 1"), row("stock", "stock#2")]
    assert bench.checkpoint_reference(plain)["run"] == "stock#2"  # plain stock first, a failed run never
    other = [row("ours+cpuw4"), row("stock+cpuw4"), row("stock+cpuw4", "stock+cpuw4#2")]
    assert bench.checkpoint_reference(other)["run"] == "stock+cpuw4"  # no plain stock: the first stock setting
    assert bench.checkpoint_reference([row("ours"), row("stock", error="timeout")]) is None


def test_stage_breakdown_from_a_recorder():
    from defuser_quant.integrations.gptqmodel.kernels import record_gptq_kernels, stage

    with record_gptq_kernels(stages=True) as record:
        with stage("forward"), stage("hessian"):
            pass
        with stage("solve"):
            time.sleep(0.05)
    kernels = record.as_dict()
    out = bench.stage_breakdown(kernels, quantize_s=10.0, save_s=1.5)
    assert set(bench.STAGE_COLUMNS) <= set(out)
    assert kernels["busy_wall_seconds"] >= 0.05 and out["solve"] >= 0.05
    assert out["save"] == 1.5 and out["framework_overhead"] == round(10.0 - kernels["busy_wall_seconds"], 2) <= 9.95
    assert out["outside_every_stage"] == round(10.0 - kernels["any_stage_wall_seconds"], 2)
    assert out["thread_seconds"].keys() == {"forward", "hessian", "solve"}


def _checkpoint(path: Path, codes: torch.Tensor) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True)
    save_file({"m.qweight": codes, "m.scales": torch.ones(2, 4, dtype=torch.float16)}, str(path / "model.safetensors"))


def test_scaling_rows_compare_checkpoints_against_the_fewest_gpus(tmp_path, monkeypatch):
    same = torch.arange(8, dtype=torch.int32).reshape(2, 4)
    _checkpoint(tmp_path / "v@1gpu.out", same)
    _checkpoint(tmp_path / "v@2gpu.out", same)
    _checkpoint(tmp_path / "w@2gpu.out", same + 1)
    rows = [{"variant": "v", "run": "v@1gpu", "gpus": 1, "quantize_s": 10.0, "total_s": 12.0},
            {"variant": "v", "run": "v@2gpu", "gpus": 2, "quantize_s": 5.0, "total_s": 7.0},
            {"variant": "v", "run": "w@2gpu", "gpus": 2, "quantize_s": 5.0, "total_s": 7.0}]
    bench._compare_rows(rows, tmp_path, rows[0], "detail", "checkpoint_vs_fewest_gpus")
    assert rows[1]["checkpoint_vs_fewest_gpus"] == "yes"
    assert rows[2]["checkpoint_vs_fewest_gpus"].startswith("1/2 tensors, 0/1 qweights")
    table = bench.markdown([{**r, "speedup": "2.00x", "load_s": 0, "save_s": 0, "peak_rss_bytes": 0, "experts_quantized": 1,
                             "expert_projections": 1, "peak_gpu_bytes_per_device": [2**30, 2**29]} for r in rows])
    assert "| v | 2 | 5.0 | 7.0 | 2.00x | 1.00 / 0.50 | yes |" in table
    # comparisons made here are kept for the grouping, which then reads no checkpoint pair again
    done: dict = {}
    bench._compare_rows(rows, tmp_path, rows[0], "detail", "checkpoint_vs_fewest_gpus", done=done)
    assert set(done) == {("v@1gpu", "v@2gpu"), ("v@1gpu", "w@2gpu")}
    monkeypatch.setattr(bench, "compare_checkpoints", lambda a, b: pytest.fail(f"compared {a.name} and {b.name} again"))
    assert bench.checkpoint_groups(rows, tmp_path, rows[0], done=done) == [["v@1gpu", "v@2gpu"], ["w@2gpu"]]


def test_checkpoints_are_compared_as_runs_finish_and_kept_for_the_end(tmp_path, monkeypatch):
    codes = torch.arange(8, dtype=torch.int32).reshape(2, 4)
    for run, shift in (("ours", 0), ("stock+cpuw4", 1), ("stock", 0), ("ours#2", 0)):
        _checkpoint(tmp_path / f"{run}.out", codes + shift)
    partial = tmp_path / "x.partial.jsonl"
    early = bench.EarlyComparisons(tmp_path, partial)
    rows = [{"variant": "ours", "run": "ours"}, {"variant": "stock+cpuw4", "run": "stock+cpuw4"},
            {"variant": "ours", "run": "ours#3", "error": "timeout"}, {"variant": "stock", "run": "stock"},
            {"variant": "ours", "run": "ours#2"}]
    early(rows[0])
    assert early.done == {} and not partial.exists()  # no stock run yet
    early(rows[1])  # the reference for now: the first stock setting
    assert set(early.done) == {("stock+cpuw4", "ours")} and early.done[("stock+cpuw4", "ours")]["qweights_equal"] == 0
    for row in rows[2:]:
        early(row)  # a plain stock run takes over as the reference; a failed run is never compared
    assert set(early.done) == {("stock+cpuw4", "ours"), ("stock", "ours"), ("stock", "stock+cpuw4"), ("stock", "ours#2")}
    lines = [json.loads(line) for line in partial.read_text().splitlines()]
    assert [(x["reference"], x["compared"]) for x in lines] == list(early.done)
    assert lines[1]["checkpoint"]["qweights_equal"] == 1
    calls = []
    monkeypatch.setattr(bench, "compare_checkpoints", lambda a, b: calls.append((a, b)))
    done = [r for r in rows if "error" not in r]
    bench._compare_rows(done, tmp_path, rows[3], "checkpoint_vs_stock", "same_ckpt_as_stock", done=early.done)
    assert calls == []  # every comparison came from the early ones
    assert [r["same_ckpt_as_stock"] for r in done if r is not rows[3]] == ["yes", "1/2 tensors, 0/1 qweights, max scale diff 0, logits None", "yes"]


def test_runs_are_grouped_by_identical_checkpoints_even_when_the_reference_is_the_odd_one(tmp_path, monkeypatch):
    """Round 42a on an H100: the first stock run routed differently from every other run; compared
    with it alone, ours looked 15/776 from stock although it matched the second stock run."""
    codes = torch.arange(8, dtype=torch.int32).reshape(2, 4)
    for run, shift in (("ours", 0), ("stock", 1), ("ours#2", 0), ("stock#2", 0), ("ours#3", 2)):
        _checkpoint(tmp_path / f"{run}.out", codes + shift)
    rows = [{"variant": "ours", "run": "ours"}, {"variant": "stock", "run": "stock"}, {"variant": "ours", "run": "ours#2"},
            {"variant": "stock", "run": "stock#2"}, {"variant": "ours", "run": "ours#3"},
            {"variant": "ours", "run": "ours#4", "error": "timeout"}]
    early = bench.EarlyComparisons(tmp_path, None)
    for row in rows:
        if "error" not in row:
            early(row)
    real, calls = bench.compare_checkpoints, []
    monkeypatch.setattr(bench, "compare_checkpoints", lambda a, b: calls.append((a.name, b.name)) or real(a, b))
    groups = bench.checkpoint_groups(rows, tmp_path, rows[1], done=early.done)
    assert groups == [["stock"], ["ours", "ours#2", "stock#2"], ["ours#3"]]
    # only the pairs the reference's comparisons could not settle, each group's first run against the next runs
    assert calls == [("ours.out", "ours#2.out"), ("ours.out", "stock#2.out"), ("ours.out", "ours#3.out")]
    assert bench.groups_markdown(groups).strip() == \
        "Identical checkpoints (every tensor equal): {stock} | {ours, ours#2, stock#2} | {ours#3}"
    # runs that all agree: one group from the reference's own comparisons, none new
    same = [{"variant": "stock", "run": "stock#2"}, {"variant": "ours", "run": "ours"}, {"variant": "ours", "run": "ours#2"}]
    agreeing = bench.EarlyComparisons(tmp_path, None)
    for row in same:
        agreeing(row)
    calls.clear()
    assert bench.checkpoint_groups(same, tmp_path, same[0], done=agreeing.done) == [["stock#2", "ours", "ours#2"]]
    assert calls == []


def test_timeline_files_have_plain_names():
    out = Path("/r/calls.json")
    assert bench.timeline_path(out, "ours-grouped-batched+pin1#2") == Path("/r/calls.ours-grouped-batched_pin1_2.timeline.jsonl")
    assert bench.timeline_path(out, "stock").name == "calls.stock.timeline.jsonl"


def test_region_totals_read_gptqmodels_region_timer():
    from gptqmodel.utils.logger import QuantizationRegionTimer

    class Model:
        quant_region_timer = QuantizationRegionTimer()

    Model.quant_region_timer.record("process_quant", 0.25, source="a")
    Model.quant_region_timer.record("process_quant", 0.5)
    Model.quant_region_timer.record("my_region", 1.0)
    assert bench.region_totals(Model()) == {"process_quant": {"seconds": 0.75, "calls": 2},
                                            "my_region": {"seconds": 1.0, "calls": 1}}
    assert bench.region_totals(object()) is None


def test_any_stage_wall_time_is_the_union_of_every_stage():
    from defuser_quant.integrations.gptqmodel.kernels import record_gptq_kernels, stage

    t0 = time.perf_counter()
    with record_gptq_kernels(stages=True) as record:
        with stage("materialize"):
            time.sleep(0.03)
        gap = time.perf_counter()
        time.sleep(0.05)  # in no stage
        gap = time.perf_counter() - gap
        with stage("solve"):
            time.sleep(0.03)
            with stage("log"):  # entered while another stage runs: the union does not restart
                time.sleep(0.03)
    elapsed = time.perf_counter() - t0
    assert 0.09 <= record.any_stage_wall_seconds <= elapsed - gap  # every stage, not the gap
    assert record.busy_wall_seconds < record.any_stage_wall_seconds
    assert record.as_dict()["any_stage_wall_seconds"] == round(record.any_stage_wall_seconds, 3)


def test_the_pack_extension_is_built_before_any_variant():
    """GPTQModel builds pack_block_cpu on first use (a JIT build): the benchmark does it up front."""
    seconds, available = bench.warm_pack_extension()
    try:
        import gptqmodel  # noqa: F401
    except ImportError:
        assert (seconds, available) == (None, None)
        return
    from gptqmodel.utils import cpp

    assert available is True and seconds >= 0
    assert cpp.load_pack_block_extension(), "loaded, so a variant's packing does not build it"


def test_checkpoint_comparison_counts_equal_packed_weights_per_group(tmp_path):
    from safetensors.torch import save_file

    def write(d: Path, changed: set[str]) -> None:
        d.mkdir()
        tensors = {}
        for layer in range(2):
            for name in ("self_attn.q_proj", "mlp.experts.0.gate_proj", "mlp.experts.1.gate_proj"):
                key = f"model.layers.{layer}.{name}"
                q = torch.arange(8, dtype=torch.int32) + (1 if key in changed else 0)
                tensors[f"{key}.qweight"] = q
                tensors[f"{key}.scales"] = torch.ones(2, dtype=torch.float16)
        save_file(tensors, str(d / "model.safetensors"))

    write(tmp_path / "a", set())
    write(tmp_path / "b", {"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.experts.1.gate_proj"})
    cmp = bench.compare_checkpoints(tmp_path / "a", tmp_path / "b")
    assert (cmp["qweights"], cmp["qweights_equal"]) == (6, 4)
    assert cmp["qweights_equal_by_group"] == {
        "model.layers.0.mlp.experts.*.gate_proj": "2/2", "model.layers.0.self_attn.q_proj": "1/1",
        "model.layers.1.mlp.experts.*.gate_proj": "1/2", "model.layers.1.self_attn.q_proj": "0/1",
    }


def test_variants_pick_their_batched_solve_settings():
    pytest.importorskip("gptqmodel")
    from defuser_quant.integrations.gptqmodel.batched import BatchedSolve

    assert bench.solve_setting("ours-grouped") is False and bench.solve_setting("ours-grouped-batched") is True
    assert bench.solve_setting("ours-grouped-batched-stockbk") is True
    assert bench.solve_setting("ours-grouped-batched-serial") == BatchedSolve(parallel=1)
    assert bench.solve_setting("ours-grouped-batched-parallel4") == BatchedSolve(parallel=4)
    assert bench.solve_setting("ours-grouped-batched-hinv4") == BatchedSolve(inverse_threads=4)
    assert bench.solve_setting("ours-grouped-batched-hinv8") == BatchedSolve(inverse_threads=8)
    assert bench.solve_setting("ours-grouped-batched-invgraphs") == BatchedSolve(inverse_graphs=True)
    assert "ours-grouped-batched-invgraphs" in bench.VARIANTS
    # the inverse graphs are the default since round 61: the variant without them measures the former default
    assert BatchedSolve().inverse_graphs is True
    assert bench.solve_setting("ours-grouped-batched-noinvgraphs") == BatchedSolve(inverse_graphs=False)
    assert "ours-grouped-batched-noinvgraphs" in bench.VARIANTS
    assert bench.solve_setting("ours-grouped-batched-solvehigh") == BatchedSolve(solve_priority="high")
    assert "ours-grouped-batched-solvehigh" in bench.VARIANTS
    # larger chunks: fewer column loops a subset (1.5 and 2 GiB of working memory against the default's 1 GiB)
    assert bench.solve_setting("ours-grouped-batched-chunk1g5") == BatchedSolve(chunk_bytes=1536 << 20)
    assert bench.solve_setting("ours-grouped-batched-chunk2g") == BatchedSolve(chunk_bytes=2048 << 20)
    assert {"ours-grouped-batched-chunk1g5", "ours-grouped-batched-chunk2g"} <= set(bench.VARIANTS)
    assert bench.solve_setting("ours-grouped-batched-inplace") == BatchedSolve(inplace_update=True)
    assert "ours-grouped-batched-inplace" in bench.VARIANTS
    assert bench.solve_setting("ours-grouped-batched-loopgraphs") == BatchedSolve(loop_graphs=True)
    assert bench.solve_setting("ours-grouped-batched-graphs") == BatchedSolve(inverse_graphs=True, loop_graphs=True)
    assert {"ours-grouped-batched-loopgraphs", "ours-grouped-batched-graphs"} <= set(bench.VARIANTS)
    # replayed inverses no longer wait on launches: more threads, more of them at once on the GPU
    assert bench.solve_setting("ours-grouped-batched-hinv12-invgraphs") == BatchedSolve(inverse_threads=12,
                                                                                        inverse_graphs=True)
    assert {"ours-grouped-batched-hinv8-invgraphs", "ours-grouped-batched-hinv12-invgraphs"} <= set(bench.VARIANTS)
    # round 13's defaults, to measure round 14's against them
    assert bench.solve_setting("ours-grouped-batched-hinv1-device") == BatchedSolve(inverse_threads=1, host_results=False)
    assert "ours-grouped-batched-hinv1-device" in bench.VARIANTS
    assert {"ours-grouped-batched-hinv4", "ours-grouped-batched-parallel4"} <= set(bench.VARIANTS)
    assert bench.solve_setting("ours-grouped-batched-host") == BatchedSolve(host_results=True)
    assert bench.solve_setting("ours-grouped-batched-hinv4-host") == BatchedSolve(inverse_threads=4, host_results=True)
    assert {"ours-grouped-batched-host", "ours-grouped-batched-hinv4-host"} <= set(bench.VARIANTS)
    # round 16's solver thread, opt-in, to measure against the default
    assert bench.solve_setting("ours-grouped-batched-ahead2") == BatchedSolve(solve_ahead=2)
    assert "ours-grouped-batched-ahead2" in bench.VARIANTS
    # round 18's packing on the solve's device (opt-in), to measure it
    assert bench.solve_setting("ours-grouped-batched-pack") == BatchedSolve(pack=True)
    assert bench.solve_setting("ours-grouped-batched-pack-noreads") == BatchedSolve(pack=True)
    assert bench.solve_setting("ours-grouped-batched-nopack") == BatchedSolve(pack=False) == BatchedSolve()
    assert {"ours-grouped-batched-pack", "ours-grouped-batched-nopack"} <= set(bench.VARIANTS)
    # round 26's stream choice, explicit either way (the default decides by torch's deterministic setting)
    assert bench.solve_setting("ours-grouped-batched-ownstreams") == BatchedSolve(streams="own")
    assert bench.solve_setting("ours-grouped-batched-callerstreams") == BatchedSolve(streams="caller")
    assert {"ours-grouped-batched-ownstreams", "ours-grouped-batched-callerstreams"} <= set(bench.VARIANTS)
    # round 33's inverses ahead and one-launch block kernel, each left out to measure it
    assert bench.solve_setting("ours-grouped-batched-noahead") == BatchedSolve(inverses_ahead=False)
    assert bench.solve_setting("ours-grouped-batched-norows") == BatchedSolve(rows_kernel=False)
    assert BatchedSolve().inverses_ahead and BatchedSolve().rows_kernel  # on by default
    assert {"ours-grouped-batched-noahead", "ours-grouped-batched-norows"} <= set(bench.VARIANTS)
    assert bench.solve_setting("ours-grouped-batched-packahead") == BatchedSolve(pack_ahead=True)
    # the GPU words with the groups made side by side: both bounds of the last layer's finalize window off
    assert bench.solve_setting("ours-grouped-batched-pack-stealgroups") == BatchedSolve(pack=True)
    assert bench.bookkeeping_setting("ours-grouped-batched-pack-stealgroups") >= {"steal_groups"}
    assert "ours-grouped-batched-pack-stealgroups" in bench.VARIANTS
    assert "ours-grouped-batched-packahead" in bench.VARIANTS


def test_suffixes_are_stripped_in_any_order_and_reported():
    assert bench.strip_suffixes("a-x-y-x", ("-x", "-y")) == ("a", ["-x", "-y", "-x"])
    assert bench.strip_suffixes("a-y-z", ("-x", "-y")) == ("a-y-z", [])  # only trailing ones


def test_variants_pick_their_lean_bookkeeping():
    pytest.importorskip("gptqmodel")
    from defuser_quant.integrations.gptqmodel.overhead import PARTS, default_parts

    DEFAULT_PARTS = default_parts()  # noqa: N806  (this host's defaults, the ones a suffix variant starts from)
    assert bench.bookkeeping_setting("ours-grouped-batched") is True
    assert bench.bookkeeping_setting("ours-grouped-batched-stockbk") is False
    assert bench.bookkeeping_setting("ours-grouped-batched-norecopy") == set(DEFAULT_PARTS) - {"recopy"}
    assert bench.solve_setting("ours-grouped-batched-norecopy") is True and "ours-grouped-batched-norecopy" in bench.VARIANTS
    assert bench.bookkeeping_setting("ours-grouped-batched-noreads") == set(DEFAULT_PARTS) - {"layer_reads"}
    assert bench.solve_setting("ours-grouped-batched-noreads") is True and "ours-grouped-batched-noreads" in bench.VARIANTS
    # the opt-in part: added to the defaults, and only there
    assert "layer_ahead" in PARTS and "layer_ahead" not in DEFAULT_PARTS
    assert bench.bookkeeping_setting("ours-grouped-batched-layerahead") == set(DEFAULT_PARTS) | {"layer_ahead"}
    assert bench.solve_setting("ours-grouped-batched-layerahead") is True and "ours-grouped-batched-layerahead" in bench.VARIANTS
    assert "gc_freeze" in DEFAULT_PARTS  # a default since round 52: -gcfreeze adds nothing, -nogcfreeze leaves it out
    assert bench.bookkeeping_setting("ours-grouped-batched-gcfreeze") == set(DEFAULT_PARTS)
    assert bench.bookkeeping_setting("ours-grouped-batched-nogcfreeze") == set(DEFAULT_PARTS) - {"gc_freeze"}
    assert "ours-grouped-batched-nogcfreeze" in bench.VARIANTS
    assert bench.split_variant("stock+gcfreeze1") == ("stock", {"gcfreeze": 1})
    # both opt-in parts at once, and the disk probe left out
    both = "ours-grouped-batched-layerahead-gcfreeze"
    assert bench.bookkeeping_setting(both) == set(DEFAULT_PARTS) | {"layer_ahead", "gc_freeze"} and both in bench.VARIANTS
    assert bench.solve_setting(both) is True
    lazy_frozen = "ours-grouped-batched-capturelazy-gcfreeze"
    assert bench.bookkeeping_setting(lazy_frozen) == set(DEFAULT_PARTS) | {"capture_lazy", "gc_freeze"}
    assert lazy_frozen in bench.VARIANTS
    tail = "ours-grouped-batched-tailworkers"
    assert bench.bookkeeping_setting(tail) == set(DEFAULT_PARTS) | {"tail_workers"} and tail in bench.VARIANTS
    assert "tail_workers" in PARTS and "tail_workers" not in DEFAULT_PARTS
    block = "ours-grouped-batched-blockfinalize"
    assert bench.bookkeeping_setting(block) == set(DEFAULT_PARTS) | {"block_finalize"} and block in bench.VARIANTS
    steal = "ours-grouped-batched-blockfinalize-stealgroups"
    assert bench.bookkeeping_setting(steal) == set(DEFAULT_PARTS) | {"block_finalize", "steal_groups"} and steal in bench.VARIANTS
    assert "steal_groups" in PARTS and "steal_groups" not in default_parts(1024)
    gate = "ours-grouped-batched-blockfinalize-loadpriority"
    assert bench.bookkeeping_setting(gate) == set(DEFAULT_PARTS) | {"block_finalize", "load_priority"} and gate in bench.VARIANTS
    assert "load_priority" in PARTS and "load_priority" not in default_parts(1024)
    switch = "ours-grouped-batched-loadswitch"
    assert bench.bookkeeping_setting(switch) == set(DEFAULT_PARTS) | {"load_switch"} and switch in bench.VARIANTS
    assert "load_switch" in PARTS and "load_switch" not in default_parts(1024)
    unblock = "ours-grouped-batched-noblockfinalize"  # a default part where the host has 16 cores
    assert bench.bookkeeping_setting(unblock) == set(DEFAULT_PARTS) - {"block_finalize"} and unblock in bench.VARIANTS
    words = "ours-grouped-batched-blockfinalize-devicewords"
    assert bench.bookkeeping_setting(words) == set(DEFAULT_PARTS) | {"block_finalize", "device_words"}
    assert words in bench.VARIANTS and "device_words" in PARTS and "device_words" not in default_parts(1024)
    cold = "ours-grouped-batched-nosolvewarmup"  # a default part since round 44
    assert bench.bookkeeping_setting(cold) == set(DEFAULT_PARTS) - {"solve_warmup"} and cold in bench.VARIANTS
    assert "solve_warmup" in DEFAULT_PARTS and "ours-grouped-batched-solvewarmup" not in bench.VARIANTS
    assert bench.solve_setting(cold) is True
    assert bench.bookkeeping_setting("ours-grouped-batched-nodiskprobe") == set(DEFAULT_PARTS) - {"disk_probe"}
    assert "disk_probe" in DEFAULT_PARTS and "ours-grouped-batched-nodiskprobe" in bench.VARIANTS
    assert bench.bookkeeping_setting("ours-grouped-batched-norehome") == set(DEFAULT_PARTS) - {"rehome"}
    assert "rehome" in DEFAULT_PARTS and "ours-grouped-batched-norehome" in bench.VARIANTS


def test_variant_modifiers_are_parsed_and_bad_ones_refused():
    assert bench.split_variant("stock") == ("stock", {})
    assert bench.split_variant("ours-grouped-batched+si500+cpuw4") == ("ours-grouped-batched", {"si": 500, "cpuw": 4})
    for bad in ("stock+si0", "stock+si", "stock+xx5", "stock+si5+si6", "stock+SI5", "stock+si-5"):
        with pytest.raises(ValueError, match="bad modifier"):
            bench.split_variant(bad)
    # main() refuses them (and unknown bases, and a variant named twice) before building anything
    assert bench.split_variant("ours-grouped-batched+wt8") == ("ours-grouped-batched", {"wt": 8})
    for variants, says in (("stock+cpuw0", "bad modifier"), ("nope+si5", "unknown variants"),
                           ("stock,stock", "names a variant twice"), ("stock+wt4", "a stock run and -stocksave do not"),
                           ("ours-grouped-batched-stocksave+wt2", r"\+wt<threads> sets the plugin's shard writer")):
        with pytest.raises(SystemExit, match=says):
            bench.main(["--device", "cpu", "--variants", variants])


def test_modifiers_reach_the_variants_process(tmp_path, monkeypatch):
    seen = {}

    def run(cmd, env, **kwargs):
        seen["cmd"], seen["env"] = cmd, env
        return bench.subprocess.CompletedProcess(cmd, 1, "", "stopped here")

    monkeypatch.setattr(bench.subprocess, "run", run)
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "7")
    args = bench.parse_args(["--device", "cpu", "--gil-probe"])
    bench.run_variant("ours+si250+cpuw3", args, tmp_path)
    assert seen["env"]["GPTQMODEL_CPU_WORKERS"] == "3"  # the modifier wins over the caller's environment
    assert seen["cmd"][seen["cmd"].index("--worker") + 1] == "ours+si250+cpuw3" and "--gil-probe" in seen["cmd"]
    bench.run_variant("ours+si250", args, tmp_path)
    assert seen["env"]["GPTQMODEL_CPU_WORKERS"] == "7"  # no +cpuw: left as it was


def test_the_gil_modifier_samples_that_run_only_and_leaves_it_out_of_the_ratios(tmp_path, monkeypatch):
    seen = []

    def run(cmd, env, **kwargs):
        seen.append(env.get("DQ_GIL_DIR"))
        return bench.subprocess.CompletedProcess(cmd, 1, "", "stopped here")

    monkeypatch.setattr(bench.subprocess, "run", run)
    monkeypatch.setenv("DQ_GIL_DIR", str(tmp_path / "inherited"))
    args = bench.parse_args(["--device", "cpu"])
    bench.run_variant("ours+gil1", args, tmp_path, run_id="ours+gil1#2")
    bench.run_variant("ours", args, tmp_path)
    assert seen == [str(tmp_path / "ours+gil1#2.gil"), None]  # its own folder; the caller's setting reaches no run
    assert bench.gil_sampled("stock+gil1") and not bench.gil_sampled("stock+si500")

    def row(variant, total):
        return {"variant": variant, "run": variant, "total_s": total, "quantize_s": total}

    ratios = bench.ratios_vs_stock([row("ours", 10.0), row("ours+gil1", 20.0), row("stock", 40.0), row("stock+gil1", 80.0)])
    assert list(ratios) == ["ours"] and ratios["ours"]["stock_runs"] == 1
    assert ratios["ours"]["end_to_end"] == {"min": 4.0, "median": 4.0, "max": 4.0}
    stacks = tmp_path / "ours+gil1#2.gil" / "gptqmodel-ours+gil1#2.gil.txt"
    stacks.parent.mkdir()
    stacks.write_text("thread (1): MainThread;f (x.py:1) 5\n")
    kept = bench.gil_stacks_path(tmp_path / "r.json", stacks.name)
    from _report import write_gzipped

    write_gzipped(stacks, kept)
    import gzip

    assert kept.name == "r.gptqmodel-ours_gil1_2.gil.txt.gz" and gzip.decompress(kept.read_bytes()) == stacks.read_bytes()


def test_the_wt_modifier_installs_the_plugin_with_that_many_write_threads(tmp_path, monkeypatch):
    """The variant's process installs the plugin with +wt's threads (and the default 1 without it); stopped there."""
    pytest.importorskip("gptqmodel")
    from defuser_quant.integrations import gptqmodel as plugin

    seen = []

    def install(**kwargs):
        seen.append(kwargs)
        raise RuntimeError("stopped after install")

    monkeypatch.setattr(plugin, "install", install)
    for name in ("ours-grouped-batched+wt3", "ours-grouped-batched"):
        args = bench.parse_args(["--device", "cpu", "--worker", name, "--workdir", str(tmp_path)])
        with pytest.raises(RuntimeError, match="stopped after install"):
            bench.worker(args)
    assert seen == [{"fast_save": True, "write_threads": 3}, {"fast_save": True, "write_threads": 1}]


def test_cudaw_gives_gptqmodels_device_pool_that_many_workers_per_cuda_device(monkeypatch):
    import gptqmodel

    built = {}

    class Pool:  # GPTQModel's DeviceThreadPool as far as the modifier sees it: what it is built with
        def __init__(self, *args, workers=None, **kwargs):
            built.update(workers)
            self._worker_groups = {"cuda:0": [object()] * workers["cuda:per"], "cpu": [object()]}

    monkeypatch.setattr(gptqmodel, "DeviceThreadPool", Pool)
    monkeypatch.setattr(gptqmodel, "_DEVICE_THREAD_POOL", None)
    assert bench.cuda_workers() is None  # nothing built: nothing claimed
    bench.set_cuda_workers(2)
    pool = gptqmodel.get_device_thread_pool()
    assert built["cuda:per"] == 2 and built["cpu"] == gptqmodel._default_cpu_workers()  # the rest as GPTQModel's
    assert bench.cuda_workers() == {"cuda:0": 2} and gptqmodel._DEVICE_THREAD_POOL is pool
    with pytest.raises(SystemExit, match="already built"):  # too late to act: refused, not ignored
        bench.set_cuda_workers(1)
    assert bench.split_variant("ours-grouped-batched+cudaw1") == ("ours-grouped-batched", {"cudaw": 1})


def test_cold_runs_drop_the_checkpoint_from_the_page_cache_before_each_variant(tmp_path, monkeypatch):
    """``--cold``: every variant's process starts after the source checkpoint's pages were dropped
    (each file advised, after its writes reached the disk); the row records it."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("model-00001.safetensors", "model-00002.safetensors"):
        (src / name).write_bytes(b"x" * 4096)
    (src / "config.json").write_text("{}")
    advised, order = [], []
    real = bench.os.posix_fadvise

    def fadvise(fd, offset, length, advice):
        advised.append((bench.os.readlink(f"/proc/self/fd/{fd}"), advice))
        order.append("advise")
        return real(fd, offset, length, advice)

    def run(cmd, env, **kwargs):
        order.append("run")
        (tmp_path / "stock.json").write_text(json.dumps({"variant": "stock"}))
        return bench.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bench.os, "posix_fadvise", fadvise)
    monkeypatch.setattr(bench.subprocess, "run", run)
    row = bench.run_variant("stock", bench.parse_args(["--device", "cpu", "--cold"]), tmp_path)
    assert row["cold_files_evicted"] == 2 and order == ["advise", "advise", "run"]
    assert sorted(Path(p).name for p, _ in advised) == ["model-00001.safetensors", "model-00002.safetensors"]
    assert {a for _, a in advised} == {bench.os.POSIX_FADV_DONTNEED}
    assert bench.run_variant("stock", bench.parse_args(["--device", "cpu"]), tmp_path)["cold_files_evicted"] is None


def test_a_run_alone_writes_the_earlier_checkpoints_back_first_and_concurrent_runs_do_not(tmp_path, monkeypatch):
    order: list[str] = []

    def run(cmd, env, **kwargs):
        order.append("run")
        run_id = cmd[cmd.index("--run-id") + 1]
        (tmp_path / f"{run_id}.json").write_text(json.dumps({"variant": cmd[cmd.index("--worker") + 1]}))
        return bench.subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(bench.os, "sync", lambda: order.append("sync"))
    monkeypatch.setattr(bench.subprocess, "run", run)
    args = bench.parse_args(["--device", "cpu"])
    row = bench.run_variant("stock", args, tmp_path)
    assert order == ["sync", "run"] and isinstance(row["sync_before_s"], float)
    order.clear()
    assert bench.run_variant("stock", args, tmp_path, alone=False)["sync_before_s"] is None and order == ["run"]
    order.clear()
    rows = bench.run_variants([("stock", "stock"), ("ours", "ours")], args, tmp_path, slots=1)
    assert order == ["sync", "run", "sync", "run"] and all(isinstance(r["sync_before_s"], float) for r in rows)
    order.clear()
    rows = bench.run_variants([("stock", "stock"), ("ours", "ours")], args, tmp_path, slots=2)
    assert order == ["run", "run"] and [r["sync_before_s"] for r in rows] == [None, None]


def test_modulerows_variant_and_nooff_modifier_are_what_they_say():
    from defuser_quant.integrations.gptqmodel.batched import BatchedSolve

    assert bench.solve_setting("ours-grouped-batched-modulerows") == BatchedSolve(log_rows="module")
    assert bench.solve_setting("ours-grouped-batched") is True  # chunk rows: BatchedSolve()'s default
    assert BatchedSolve().log_rows == "chunk"
    assert bench.split_variant("stock+nooff1") == ("stock", {"nooff": 1})
    assert "ours-grouped-batched-modulerows" in bench.VARIANTS


def test_nobundle_variant_leaves_out_only_the_offload_bundle():
    from defuser_quant.integrations.gptqmodel.overhead import default_parts

    PARTS = default_parts()  # noqa: N806
    assert bench.bookkeeping_setting("ours-grouped-batched-nobundle") == set(PARTS - {"offload_bundle"})
    assert bench.solve_setting("ours-grouped-batched-nobundle") is True
    assert bench.bookkeeping_setting("ours-grouped-batched-nokeeplast") == set(PARTS - {"keep_last_block"})
    assert bench.solve_setting("ours-grouped-batched-nokeeplast") is True
    assert bench.bookkeeping_setting("ours-grouped-batched-noonload") == set(PARTS - {"layer_onload"})
    assert bench.bookkeeping_setting("ours-grouped-batched-noline") == set(PARTS - {"line_redraw"})
    assert bench.solve_setting("ours-grouped-batched-noline") is True


@pytest.fixture(scope="module")
def tiny_cpu_call(tmp_path_factory) -> tuple[Path, dict]:
    """One real tiny CPU call for the tests below (each subprocess run imports GPTQModel again, so
    they share it): ours and stock twice each, with ``--timeline`` and ``--hessian-prints``."""
    from gptqmodel_benchmark_run import run_tiny_cpu

    pytest.importorskip("gptqmodel")
    out = tmp_path_factory.mktemp("tiny_cpu_call") / "repeat.json"
    return out, run_tiny_cpu(out, "--variants", "ours-grouped-batched,stock", "--repeat", "2", "--no-reload", "--timeline",
                             "--hessian-prints", timeout=400)


@pytest.mark.slow
def test_a_real_tiny_cpu_run_repeats_the_list_and_pairs_every_run(tiny_cpu_call):
    out, data = tiny_cpu_call
    rows = data["rows"]
    assert [r["run"] for r in rows] == ["ours-grouped-batched", "stock", "ours-grouped-batched#2", "stock#2"]
    # every run after the first stock one is compared with it: on the CPU all are its checkpoint
    assert [r.get("same_ckpt_as_stock") for r in rows] == ["yes", None, "yes", "yes"]
    assert data["meta"]["early_comparisons"] == 3  # each made as soon as its pair was on disk, taken at the end
    # the CPU packing extension was built in a child process beside the source model, and is available
    assert data["meta"]["extensions_built_beside_source"] == ["pack"] and data["meta"]["pack_extension_available"] is True
    assert data["meta"]["extensions_waited_s"] >= 0 and data["meta"]["pack_extension_warmup_s"] >= 0
    # one group of identical checkpoints, the reference's first, found from those comparisons alone
    assert data["meta"]["checkpoint_groups"] == [["stock", "ours-grouped-batched", "ours-grouped-batched#2", "stock#2"]]
    assert "Identical checkpoints (every tensor equal): {stock, ours-grouped-batched, ours-grouped-batched#2, stock#2}" \
        in data["markdown"]
    for r in rows:  # GPTQModel's own region timer, for stock and ours alike
        assert r["regions"]["process_quant"]["calls"] > 0 and r["regions"]["pre_quant_forward"]["seconds"] > 0
        # --timeline: 2 layers x 4 subset stages, each with its forward; ours' experts solved in chunks, stock's per module
        timeline = r["timeline"]
        assert len(timeline["subsets"]) == 8 and all(s["forward"] > 0 for s in timeline["subsets"])
        assert sum(s["process_calls"] for s in timeline["subsets"]) == r["regions"]["process_quant"]["calls"]
        totals = timeline["totals"]
        assert 0 < totals["subsets"] < totals["wall"] <= r["quantize_s"] + 0.01
        windows = timeline["finalize"]  # each layer's finalizes, every one of GPTQModel's counted once
        assert [w["layer"] for w in windows] == [0, 1]
        assert sum(w["modules"] for w in windows) == r["regions"]["submodule_finalize"]["calls"]
        # every solve's first steps on the workers: GPTQModel's Hessian finalization and its sources' wait, in ours'
        # chunk solves too; the weight's clone in GPTQModel's own solves (all of stock's, ours' per-module ones)
        steps = set(totals["solve_steps"])
        assert {"GPTQ.finalize_hessian", "GPTQ._release_deferred_hessian_sources", "GPTQ.clone_module"} <= steps
        assert all("GPTQ.finalize_hessian" in s["solve_steps"] for s in timeline["subsets"])
        # the per-row quantizer parameters: GPTQModel's own in its solves, the plugin's sync-free ones in its chunks
        assert "Quantizer.find_params" in steps and ("_find_params" in steps) == (r["variant"] != "stock")
        if r["variant"] == "stock":
            assert totals["solving"] == 0 and totals["module_solving"] > 0
        else:
            assert totals["solving"] > 0 and sum(s["chunks"] for s in timeline["subsets"]) == r["solve"]["chunks"]
        # the main thread between the subset stages: the layer loop's steps, each layer's, in the right gap
        gaps = timeline["main_gaps"]
        assert gaps[0]["after"] is None and gaps[-1]["before"] is None
        assert {"capture_inputs", "BaseQModel.pre_quantize", "build_layer_subset_plans", "ModuleLooper.__init__"
                } <= set(gaps[0]["parts"])
        # the plugin's set-up before GPTQModel's quantize: a phase of ours' start, none in stock's
        assert (bench.SET_UP_PHASE in gaps[0]["parts"]) == (r["variant"] != "stock")
        # GPTQModel's offload of the base modules after the capture: stock's, skipped in ours (base_in_memory)
        assert ("offload_to_disk" in gaps[0]["parts"]) == (r["variant"] == "stock")
        # GPTQModel's disk probe: on the main thread in stock's start, on its own thread in ours (disk_probe)
        assert ("io_write_performance" in gaps[0]["parts"]) == (r["variant"] == "stock")
        [change] = [g for g in gaps if g["before"] == "layer 1 subset 0: 3 modules"]
        assert change["after"].startswith("layer 0 subset 3: ")
        assert {"_replay_layer_outputs", "BaseQModel.post_quantize", "BaseQModel.pre_quantize",
                "build_layer_subset_plans", "DeviceThreadPool.submit"} <= set(change["parts"])
        # the layer's load split: its checkpoint copy inside pre_quantize
        assert 0 < change["parts"]["LazyTurtle.materialize_submodule"] <= change["parts"]["BaseQModel.pre_quantize"]
        assert all(0 <= g["uncovered"] <= g["seconds"] and max(g["parts"].values(), default=0) <= g["seconds"] for g in gaps)
        spans = bench.timeline_path(out, r["run"])
        kinds = {json.loads(line)["kind"] for line in spans.read_text().splitlines()}
        assert {"subset", "pre_quant_forward", "process_quant", "submodule_finalize", "phase"} <= kinds
    ratios = data["ratios_vs_stock"]["ours-grouped-batched"]
    assert ratios["runs"] == ratios["stock_runs"] == 2
    stock = [r["total_s"] for r in rows if r["variant"] == "stock"]
    ours = [r["total_s"] for r in rows if r["variant"] == "ours-grouped-batched"]
    assert ratios["end_to_end"]["max"] == round(max(stock) / min(ours), 2)
    assert ratios["end_to_end"]["min"] == round(min(stock) / max(ours), 2)
    assert "Ratios against every stock run of this call" in data["markdown"]
    # how busy the host was beside each run: the run's own process counted as the run, each run named in the table
    for r in rows:
        assert r["host_load"]["run_cores"] > 0 and r["host_load"]["probe_ms"] > 0
        assert f"| {r['run']} | {r['host_load']['others_cores']} |" in data["markdown"]


@pytest.mark.slow
def test_a_real_tiny_cpu_run_prints_every_solved_module_and_matches_stock(tiny_cpu_call):
    """``--hessian-prints`` end to end: stock and ours on the tiny shape (CPU: deterministic), every GPTQ-solved
    module printed in every row, the same Hessians and weights as the first stock run and the same checkpoint."""
    _, data = tiny_cpu_call
    rows = {r["run"]: r for r in data["rows"]}
    stock = rows["stock"]
    solved = sum(stock["kernels"]["gptq_solves"].values())
    assert len(stock["hessian_prints"]) == len(stock["weight_prints"]) == solved > 0
    inverted = len(stock["inverse_prints"])  # every Hessian stock inverted (once per shared cohort)
    assert inverted > 0 and set(stock["inverse_modules"]) == set(stock["inverse_prints"])
    for name in ("ours-grouped-batched", "ours-grouped-batched#2", "stock#2"):
        row = rows[name]
        assert set(row["hessian_prints"]) == set(row["weight_prints"]) == set(stock["hessian_prints"]), name
        for key in ("hessians_vs_stock", "weights_vs_stock"):
            assert row[key] == {"modules": solved, "equal": solved, "first_differing": [], "only_in_base": 0,
                                "only_in_other": 0}, (name, key)
        assert row["inverses_vs_stock"] == {"hessians": inverted, "equal": inverted, "first_differing": [],
                                            "only_in_base": 0, "only_in_other": 0}, name  # ... to the same factor
        assert row["qweights_equal"] == f"{solved}/{solved}", name
    assert "hessians_vs_stock" not in stock
    for row in rows.values():  # every row times the tail after its last GPTQ solve, within its quantize()
        assert 0.0 <= row["tail_s"] <= row["quantize_s"]


def test_the_one_launch_kernel_is_warmed_up_before_the_variants_and_says_why_not(capsys, monkeypatch):
    """The benchmark builds the rows kernel once in its own process (a plain checkout maps the
    package there too); without CUDA it says why it is unavailable, and an import failure is named
    instead of passing silently."""
    import defuser_quant.integrations.gptqmodel.rows_kernel as rows_kernel

    monkeypatch.setattr(rows_kernel, "_module", None)
    monkeypatch.setattr(rows_kernel, "_failure", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    seconds, ok = bench.warm_rows_kernel()
    out = capsys.readouterr().out
    assert ok is False and seconds is not None
    assert "rows kernel unavailable: CUDA is not available" in out and "block kernel available: False" in out

    def missing() -> object:
        raise ImportError("No module named 'nowhere'")

    assert bench._warm("some extension", missing) == (None, None)
    assert "some extension: not loaded (No module named 'nowhere')" in capsys.readouterr().out


def test_an_interrupted_call_removes_its_scratch_folder_and_keeps_a_given_one(tmp_path, monkeypatch):
    """Ctrl-C mid-call: the temp folder the call made (every run's checkpoint, GBs on a GPU) goes; a --workdir stays."""
    seen = []

    def interrupted(args, src):
        seen.append(src.parent)
        (src.parent / "stock.out").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(bench, "build_source", interrupted)
    for extra in ([], ["--workdir", str(tmp_path / "mine")]):
        with pytest.raises(KeyboardInterrupt):
            bench.main(["--device", "cpu", "--tiny", "--output", str(tmp_path / "r.json"), *extra])
    made, given = seen
    assert made.name.startswith("gptqmodel_bench_") and not made.exists()
    assert given == tmp_path / "mine" and (given / "stock.out").is_dir()


def test_a_deadline_skips_the_runs_that_would_end_after_it(monkeypatch):
    clock = [10.0]  # seconds since the script started: the source model took 10
    took = {"stock": 40.0, "ours": 20.0}

    class FakeTime:
        @staticmethod
        def perf_counter() -> float:
            return clock[0]

    def run_variant(variant, args, work, gpu=None, run_id=None, alone=True):
        clock[0] += took[variant]
        return {"variant": variant, "run": run_id}

    monkeypatch.setattr(bench, "time", FakeTime)
    monkeypatch.setattr(bench, "STARTED", 0.0)
    monkeypatch.setattr(bench, "run_variant", run_variant)
    args = bench.parse_args(["--deadline", "100", "--variants", "stock,ours", "--repeat", "3"])
    rows = bench.run_variants(bench.runs_of(["stock", "ours"], 3), args, Path("."), 1)
    # stock 10-50; ours (estimated as stock's 40) 50-70; stock#2 would end at 110; ours#2 (its own 20) 70-90;
    # stock#3 would end at 130; ours#3 would end at 110
    assert [(r["run"], "skipped" in r) for r in rows] == [("stock", False), ("ours", False), ("stock#2", True),
                                                          ("ours#2", False), ("stock#3", True), ("ours#3", True)]
    assert rows[2]["skipped"] == "would end after the 100 s deadline"


def test_a_deadline_must_be_positive_and_not_with_gpu_counts(capsys):
    for argv, says in ((["--deadline", "0"], "--deadline takes seconds > 0"),
                       (["--deadline", "50", "--gpu-counts", "1,2"], "--deadline is for the variant list")):
        with pytest.raises(SystemExit):
            bench.parse_args(argv)
        assert says in capsys.readouterr().err


@pytest.mark.slow
def test_a_call_whose_runs_are_all_past_the_deadline_still_writes_its_json(tmp_path):
    out = tmp_path / "call.json"
    assert bench.main(["--tiny", "--device", "cpu", "--variants", "stock,ours", "--no-reload", "--deadline", "0.5",
                       "--workdir", str(tmp_path / "work"), "--output", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["skipped"] == ["stock", "ours"] and payload["rows"] == []
    assert payload["meta"]["args"]["deadline"] == 0.5 and not (tmp_path / "call.partial.jsonl").exists()


def test_the_report_shows_each_sampled_runs_lock_holders():
    sample = {"samples": 500, "gil_seconds": 2.0, "wall_seconds": 8.0, "by_thread": {"MainThread": 1.2, "DPWorker-cuda#": 0.8},
              "own": [["pack (gptqmodel/q.py)", 0.5], ["load (gptqmodel/turtle.py)", 0.25]]}
    rows = [{"variant": "ours+gil1", "run": "ours+gil1", "gil_sample": sample},
            {"variant": "ours+gil1", "run": "ours+gil1#2", "gil_sample": {"error": "no py-spy: set DQ_PYSPY"}},
            {"variant": "ours", "run": "ours"}]
    lines = bench.gil_markdown(rows)
    assert "| ours+gil1 | 8.00 | 2.00 | MainThread 1.20, DPWorker-cuda# 0.80 | pack 0.50, load 0.25 |" in lines
    assert "py-spy did not sample ours+gil1#2: no py-spy: set DQ_PYSPY" in lines
    assert bench.gil_markdown([{"variant": "ours", "run": "ours"}]) == []


def test_the_row_pack_kernel_is_built_before_its_variants(monkeypatch, capsys):
    """``-rowpack`` variants find the kernel built: the parent builds it in a child process of its own (named in the
    warmers), and a kernel that cannot be built is reported as unavailable, not timed in the first run."""
    pytest.importorskip("gptqmodel")
    from defuser_quant.integrations.gptqmodel import pack_kernel

    assert bench.WARMERS["rowpack"] is bench.warm_row_pack_kernel
    assert "ours-grouped-batched-rowpack" in bench.VARIANTS
    seconds, ok = bench.warm_row_pack_kernel()
    assert seconds is not None and ok is (pack_kernel.load() is not None)
    monkeypatch.setattr(pack_kernel, "load", lambda: None)
    assert bench.warm_row_pack_kernel()[1] is False
    assert "row-wise pack kernel available: False" in capsys.readouterr().out
