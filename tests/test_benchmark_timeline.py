"""``benchmarks/_timeline.py``: spans of one GPTQModel run and their per-subset summary."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from _timeline import Span, Timeline, finalize_windows, summarize, union_seconds  # noqa: E402


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


def test_the_committed_round31_spans_give_the_documented_last_finalize_window():
    """docs/performance.md round 31: layer 1's 388 finalizes, 17-19 ms each, about 1.1-1.2 s first to last."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / \
        "gptqmodel_cuda_2layers_round31a_timeline_h200x1.ours-grouped-batched_2.timeline.jsonl"
    spans = [Span(**json.loads(line)) for line in path.read_text().splitlines()]
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
    [span] = timeline.spans
    assert span.kind == "process_quant" and span.name.endswith("up_proj") and span.thread == "MainThread"
    assert span.end - span.start == pytest.approx(0.25)
    timeline.write(tmp_path / "spans.jsonl")
    [line] = [json.loads(x) for x in (tmp_path / "spans.jsonl").read_text().splitlines()]
    assert line["kind"] == "process_quant" and line["end"] - line["start"] == pytest.approx(0.25, abs=1e-4)
