"""``benchmarks/_timeline.py``: spans of one GPTQModel run and their per-subset summary."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _timeline  # noqa: E402
from _timeline import MAIN_PHASES, SOLVE_STEPS, Span, Timeline, finalize_windows, main_gaps, summarize, union_seconds  # noqa: E402


def test_union_counts_overlaps_once_and_clips():
    assert union_seconds([(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)]) == pytest.approx(4.0)
    assert union_seconds([(0.0, 2.0), (1.0, 3.0)], lo=1.5, hi=2.5) == pytest.approx(1.0)
    assert union_seconds([(4.0, 5.0)], lo=0.0, hi=3.0) == 0.0
    assert union_seconds([(0.0, 5.0), (1.0, 2.0), (4.0, 4.5)]) == pytest.approx(5.0)  # nested spans add nothing
    assert union_seconds([]) == 0.0


def test_a_subset_splits_into_its_forward_its_solves_and_the_rest():
    main, worker, cpu = "MainThread", "DPWorker-cuda:0#0", "DPWorker-cpu#0"
    spans = [
        Span("subset", "layer 0 subset 2: 4 modules", main, 10.0, 20.0),
        Span("pre_quant_forward", "model.layers.0:subset3/4", main, 10.5, 13.0),
        Span("chunk_solve", "2 modules", worker, 14.0, 16.0),
        Span("chunk_solve", "2 modules", worker, 17.0, 18.5),
        Span("module_solve", "mlp.experts.3.up_proj", worker, 18.0, 19.0),
        *(Span("process_quant", f"m{i}", worker, 16.0 + i * 0.5, 16.4 + i * 0.5) for i in range(4)),
        Span("submodule_finalize", "earlier layer", cpu, 19.5, 21.0),  # 0.5 s of it inside the subset
        Span("subset", "layer 1 subset 0: 3 modules", main, 25.0, 26.0),
    ]
    out = summarize(spans, start=9.0, end=30.0)
    first = out["subsets"][0]
    assert first["seconds"] == 10.0 and first["forward"] == 2.5
    assert first["solving"] == 3.5 and first["chunks"] == 2 and first["module_solving"] == 1.0
    assert first["before_first_solve"] == 1.0  # forward ends at 13, the first solve starts at 14
    assert first["between_solves"] == 1.0 and first["after_last_solve"] == 1.5
    assert first["other"] == 4.0 and first["process_calls"] == 4 and first["finalize_busy"] == 0.5
    second = out["subsets"][1]
    assert second["chunks"] == 0 and "before_first_solve" not in second and second["other"] == 1.0
    totals = out["totals"]
    assert totals["wall"] == 21.0 and totals["subsets"] == 11.0
    assert totals["before_first_subset"] == 1.0 and totals["between_subsets"] == 5.0
    assert totals["after_last_subset"] == 4.0 and totals["solving"] == 3.5
    assert totals["finalize_busy"] == 1.5 and totals["spans"] == len(spans)


def test_each_subset_gives_the_seconds_of_its_solves_first_steps_and_the_longest_call():
    main, w0, w1 = "MainThread", "DPWorker-cuda:0#0", "DPWorker-cuda:0#1"
    spans = [
        Span("subset", "layer 0 subset 0: 3 modules", main, 1.0, 2.0),
        Span("solve_step", "_release_deferred_hessian_sources", w0, 1.3, 1.55),  # two threads waiting at once
        Span("solve_step", "_release_deferred_hessian_sources", w1, 1.35, 1.5),
        Span("solve_step", "finalize_hessian", w0, 1.25, 1.3),
        Span("subset", "layer 1 subset 0: 3 modules", main, 5.0, 6.0),
        Span("solve_step", "_release_deferred_hessian_sources", w0, 5.1, 5.11),
    ]
    out = summarize(spans, start=0.0, end=7.0)
    first, second = out["subsets"]
    assert first["solve_steps"] == {"_release_deferred_hessian_sources": 0.25, "_release_deferred_hessian_sources:max": 0.25,
                                    "finalize_hessian": 0.05, "finalize_hessian:max": 0.05}
    assert second["solve_steps"] == {"_release_deferred_hessian_sources": 0.01, "_release_deferred_hessian_sources:max": 0.01}
    assert out["totals"]["solve_steps"]["_release_deferred_hessian_sources"] == 0.26
    assert summarize([s for s in spans if s.kind == "subset"], 0.0, 7.0)["totals"]["solve_steps"] == {}


def test_each_layers_finalizes_get_their_window_and_medians():
    spans = [
        Span("submodule_finalize", "model.layers.1.mlp.experts.0.gate_proj", "DPWorker-cpu#0", 12.0, 12.02),
        Span("submodule_finalize_pack", "model.layers.1.mlp.experts.0.gate_proj [module.pack_block]", "DPWorker-cpu#0",
             12.001, 12.017),
        Span("submodule_finalize", "model.layers.1.mlp.experts.0.up_proj", "DPWorker-cpu#1", 12.01, 12.04),
        Span("submodule_finalize", "model.layers.1.self_attn.o_proj", "DPWorker-cpu#1", 12.5, 12.56),
        Span("submodule_finalize", "model.layers.0.mlp.experts.5.down_proj", "DPWorker-cpu#2", 6.0, 6.1),
        Span("submodule_finalize", "lm_head", "DPWorker-cpu#2", 13.0, 13.1),  # no layer index: left out
        Span("process_quant", "model.layers.1.mlp.experts.0.gate_proj", "DPWorker-cuda:0#0", 9.0, 9.1),
    ]
    assert finalize_windows(spans, start=2.0) == [
        {"layer": 0, "modules": 1, "first_start": 4.0, "last_end": 4.1, "median_ms": 100.0, "median_pack_ms": None,
         "workers": 1},
        {"layer": 1, "modules": 3, "first_start": 10.0, "last_end": 10.56, "median_ms": 30.0, "median_pack_ms": 16.0,
         "workers": 2},
    ]
    assert summarize(spans, 2.0, 14.0)["finalize"] == finalize_windows(spans, 2.0)


def test_a_layer_finalized_by_block_finalize_gets_its_release_median_and_summed_waits():
    member, worker = "model.layers.1.mlp.experts.{}.gate_proj", "DPWorker-cpu#0"
    spans = [Span("submodule_finalize", member.format(0), worker, 1.0, 1.5)]
    for e, (wait, release) in enumerate([(0.02, 0.001), (0.03, 0.004), (0.0, 0.002)], start=1):
        at = 1.0 + e * 0.1
        spans += [Span("submodule_finalize", member.format(e), f"DPWorker-cpu#{e}", 1.0, at + 0.05),
                  Span("block_finalize_wait", member.format(e), worker, at, at + wait),
                  Span("block_finalize_release", member.format(e), worker, at + wait, at + wait + release)]
    spans.append(Span("submodule_finalize", "model.layers.0.self_attn.o_proj", "DPWorker-cpu#3", 0.1, 0.2))
    layer0, layer1 = finalize_windows(spans, start=0.0)
    assert "wait_s" not in layer0 and "median_release_ms" not in layer0  # GPTQModel's own finalizes only
    assert layer1["median_release_ms"] == 2.0 and layer1["wait_s"] == pytest.approx(0.05)
    assert layer1["modules"] == 4


def test_the_committed_round31_spans_give_the_documented_last_finalize_window():
    """docs/performance.md round 31: layer 1's 388 finalizes, 17-19 ms each, about 1.1-1.2 s first to last."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / \
        "gptqmodel_cuda_2layers_round31a_timeline_h200x1.ours-grouped-batched_2.timeline.jsonl.gz"
    spans = [Span(**json.loads(line)) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]
    last = finalize_windows(spans, start=0.0)[-1]
    assert last["layer"] == 1 and last["modules"] == 388 and last["workers"] == 8
    assert 17.0 <= last["median_ms"] <= 19.0 and 1.1 <= last["last_end"] - last["first_start"] <= 1.2


def test_the_block_records_region_samples_subset_stages_and_solves_then_restores(tmp_path):
    pytest.importorskip("gptqmodel")
    from gptqmodel.looper import stage_layer
    from gptqmodel.quantization.gptq import GPTQ
    from gptqmodel.utils.logger import QuantizationRegionTimer

    originals = (QuantizationRegionTimer.record, stage_layer.run_subset_stage, GPTQ.quantize)
    with Timeline() as timeline:
        assert (QuantizationRegionTimer.record, stage_layer.run_subset_stage, GPTQ.quantize) != originals
        QuantizationRegionTimer().record("process_quant", 0.25, source="model.layers.0.mlp.experts.0.up_proj")
    assert (QuantizationRegionTimer.record, stage_layer.run_subset_stage, GPTQ.quantize) == originals
    [span] = [s for s in timeline.spans if s.kind != "gc"]  # the interpreter may collect garbage meanwhile
    assert span.kind == "process_quant" and span.name.endswith("up_proj") and span.thread == "MainThread"
    assert span.end - span.start == pytest.approx(0.25)
    timeline.write(tmp_path / "spans.jsonl")
    [line] = [json.loads(x) for x in (tmp_path / "spans.jsonl").read_text().splitlines()]
    assert line["kind"] == "process_quant" and line["end"] - line["start"] == pytest.approx(0.25, abs=1e-4)


def test_main_gaps_give_each_gap_outside_the_subsets_its_phases_and_what_nothing_covers():
    main, worker = "MainThread", "DPWorker-cpu#0"
    spans = [
        Span("capture_inputs", "cache_inputs:model.layers.0", main, 1.0, 2.0),
        Span("phase", "build_layer_subset_plans", main, 2.5, 3.0),
        Span("subset", "layer 0 subset 0: 3 modules", main, 3.0, 5.0),
        Span("phase", "DeviceThreadPool.submit", main, 3.5, 3.6),  # inside a subset: not a gap's
        Span("subset", "layer 0 subset 1: 1 modules", main, 5.0005, 6.0),  # a 0.5 ms gap: left out
        Span("phase", "_replay_layer_outputs", main, 6.0, 7.0),
        Span("post_quant_forward", "model.layers.0:subset2/2", main, 6.1, 6.9),  # nested: counted on its own
        Span("phase", "BaseQModel.pre_quantize", main, 7.5, 9.0),
        Span("phase", "BaseQModel.pre_quantize", worker, 6.0, 10.0),  # another thread: not the main thread's
        Span("submodule_finalize", "model.layers.0.mlp.experts.0.up_proj", worker, 6.5, 6.6),
        Span("subset", "layer 1 subset 0: 3 modules", main, 10.0, 11.0),
        Span("phase", "DeviceThreadPool.submit", main, 11.0, 11.25),
    ]
    gaps = summarize(spans, start=0.0, end=12.0)["main_gaps"]
    assert gaps == [
        {"after": None, "before": "layer 0 subset 0: 3 modules", "seconds": 3.0,
         "parts": {"capture_inputs": 1.0, "build_layer_subset_plans": 0.5}, "uncovered": 1.5},
        {"after": "layer 0 subset 1: 1 modules", "before": "layer 1 subset 0: 3 modules", "seconds": 4.0,
         "parts": {"BaseQModel.pre_quantize": 1.5, "_replay_layer_outputs": 1.0, "post_quant_forward": 0.8},
         "uncovered": 1.5},
        {"after": "layer 1 subset 0: 3 modules", "before": None, "seconds": 1.0,
         "parts": {"DeviceThreadPool.submit": 0.25}, "uncovered": 0.75},
    ]
    assert main_gaps([], 0.0, 2.0) == [{"after": None, "before": None, "seconds": 2.0, "parts": {}, "uncovered": 2.0}]
    # the GIL probe's stalls (its own thread) are given per gap, apart from the main thread's spans
    stalled = [*spans, Span("gil_stall", "400 ms", "DQGilProbe", 8.0, 8.4), Span("gil_stall", "50 ms", "DQGilProbe", 3.2, 3.25)]
    summary = summarize(stalled, start=0.0, end=12.0)
    assert [g.get("gil_stalled") for g in summary["main_gaps"]] == [0.0, 0.4, 0.0]
    assert [g["uncovered"] for g in summary["main_gaps"]] == [1.5, 1.5, 0.75]
    assert (summary["totals"]["gil_stalls"], summary["totals"]["gil_stalled"]) == (2, 0.45)


def current(table: tuple) -> list:
    """What each ``(module, owner, attribute)`` of a timeline table is right now (patched or not)."""
    import importlib

    out = []
    for module_name, owner_name, attribute in table:
        owner = importlib.import_module(module_name)
        out.append(vars(getattr(owner, owner_name) if owner_name else owner)[attribute])
    return out


def test_the_block_times_each_main_phase_where_the_layer_loop_looks_it_up_and_restores_them():
    pytest.importorskip("gptqmodel")

    def targets():
        return current(MAIN_PHASES)

    before = targets()
    from gptqmodel.looper import stage_layer

    with Timeline() as timeline:
        inside = targets()
        assert all(a is not b for a, b in zip(before, inside, strict=True))
        stage_layer.torch_sync()
    assert targets() == before
    assert [(s.kind, s.name, s.thread) for s in timeline.spans] == [("phase", "torch_sync", "MainThread")]


def test_the_block_times_each_solve_step_on_the_thread_that_runs_it_and_restores_them():
    pytest.importorskip("gptqmodel")
    import threading

    from gptqmodel.quantization.gptq import GPTQ

    def targets():
        return current(SOLVE_STEPS)

    before = targets()

    class Task:  # what the step reads of a GPTQ instance: nothing deferred to wait for
        _deferred_hessian_sources: list = []

    from gptqmodel.quantization import gptq

    with Timeline() as timeline:
        assert all(a is not b for a, b in zip(before, targets(), strict=True))
        worker = threading.Thread(target=GPTQ._release_deferred_hessian_sources, args=(Task(),), name="DPWorker-cuda:0#3")
        worker.start()
        worker.join()
        gptq.compute_local_perms(torch.arange(8.0), 4)  # looked up in gptq.py's namespace, as GPTQ.quantize does
    assert targets() == before
    assert [(s.kind, s.name, s.thread) for s in timeline.spans if s.kind != "gc"] == [
        ("solve_step", "GPTQ._release_deferred_hessian_sources", "DPWorker-cuda:0#3"),
        ("solve_step", "compute_local_perms", "MainThread")]


def test_a_solve_step_this_gptqmodel_lacks_is_refused_in_one_line_and_nothing_stays_patched(monkeypatch):
    pytest.importorskip("gptqmodel")
    from gptqmodel.quantization.gptq import GPTQ

    original = GPTQ.finalize_hessian
    monkeypatch.setattr(_timeline, "SOLVE_STEPS", (*_timeline.SOLVE_STEPS, ("gptqmodel.quantization.gptq", "GPTQ", "no_such_step")))
    with pytest.raises(RuntimeError, match=r"no gptqmodel\.quantization\.gptq\.GPTQ\.no_such_step to time; update _timeline\.SOLVE_STEPS"):
        Timeline().__enter__()
    assert GPTQ.finalize_hessian is original


def test_a_phase_this_gptqmodel_lacks_is_refused_in_one_line_and_nothing_stays_patched(monkeypatch):
    pytest.importorskip("gptqmodel")
    import _timeline
    from gptqmodel.looper import stage_layer

    original = stage_layer.run_subset_stage
    monkeypatch.setattr(_timeline, "MAIN_PHASES", (*_timeline.MAIN_PHASES, ("gptqmodel.looper.stage_layer", None, "no_such_step")))
    with pytest.raises(RuntimeError, match=r"no gptqmodel\.looper\.stage_layer\.no_such_step to time; update _timeline\.MAIN_PHASES"):
        Timeline().__enter__()
    assert stage_layer.run_subset_stage is original


def test_the_block_records_the_interpreters_garbage_collections_and_stops_after(monkeypatch):
    pytest.importorskip("gptqmodel")
    import gc

    monkeypatch.setattr(_timeline, "GC_SPAN", 0.0)
    callbacks = list(gc.callbacks)
    with Timeline() as timeline:
        gc.collect()  # a full collection, on this thread
    assert gc.callbacks == callbacks
    full = [s for s in timeline.spans if s.kind == "gc" and s.name == "gen2"]
    assert full and full[-1].thread == "MainThread" and full[-1].end >= full[-1].start
    n = len(timeline.spans)
    gc.collect()
    assert len(timeline.spans) == n  # nothing recorded once the block is left
    summary = timeline.summary()["totals"]
    assert summary["gc_full"] >= 1 and summary["gc"] >= 0.0


def test_the_set_up_before_a_call_is_a_phase_and_the_method_comes_back():
    import time

    class Model:
        def quantize(self, x):
            return x + 1

    model = Model()
    with Timeline() as timeline:
        timeline.time_until_called(model, "quantize", "set-up")
        time.sleep(0.02)
        assert model.quantize(1) == 2 and model.quantize(2) == 3
        assert "quantize" not in vars(model)  # restored at the first call
    spans = [s for s in timeline.spans if s.name == "set-up"]
    assert len(spans) == 1 and spans[0].kind == "phase" and spans[0].end - spans[0].start >= 0.02
    assert main_gaps(timeline.spans, timeline.start, timeline.end)[0]["parts"]["set-up"] >= 0.02
    with Timeline() as timeline:  # never called: restored when the block ends, nothing recorded
        timeline.time_until_called(model, "quantize", "set-up")
    assert "quantize" not in vars(model) and not [s for s in timeline.spans if s.name == "set-up"]
