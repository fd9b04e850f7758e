"""One GPTQModel log row per batched chunk (integrations/gptqmodel/log_rows.py): each module keeps
its count and persisted record; the terminal gets one row standing for the chunk."""

from __future__ import annotations

import re
import sys
import threading
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_gptqmodel_batched import _quantize, per_module  # noqa: E402,F401
from test_gptqmodel_plugin import plugin, tiny  # noqa: E402,F401

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class _Columns:
    """Stands in for LogBar's columns printer: keeps the rows and headers it is asked to draw."""

    def __init__(self):
        self.rows: list[tuple] = []
        self.headers = 0
        columns = self

        class _Info:
            def __call__(self, *values):
                columns.rows.append(values)

            def header(self):
                columns.headers += 1

        self.info = _Info()


def _processor():
    """A GPTQModel ``LoopProcessor`` with the state ``log_new_row`` uses and nothing else."""
    from gptqmodel.looper.loop_processor import LoopProcessor

    proc = LoopProcessor.__new__(LoopProcessor)
    proc.lock = threading.Lock()
    proc.log_call_count = 0
    proc._log_header_interval = 20
    proc._log_columns = None
    proc._log_column_labels = None
    proc.saved = []
    proc.log_save_async = proc.saved.append
    columns = _Columns()

    def ensure(stat):
        rebuilt = proc._log_columns is None
        proc._log_columns = columns
        proc._log_column_labels = ["process", "layer", "module", "loss", "samples", "damp", "time"]
        return rebuilt

    proc._ensure_log_columns = ensure
    return proc, columns


def _plain(text):
    """A cell without its ANSI colour codes."""
    return re.sub(r"\x1b\[[0-9;]*m", "", str(text))


def _stat(module, loss, samples, time="0.010"):
    return {"process": "gptq", "layer": 0, "module": module, "loss": f"{loss:.10f}", "samples": str(samples),
            "damp": "0.05000", "time": time}


def test_a_chunk_gets_one_row_after_its_last_module_and_every_module_keeps_its_record():
    from gptqmodel.looper.loop_processor import LoopProcessor

    from defuser_quant.integrations.gptqmodel import log_rows

    original = LoopProcessor.log_new_row
    proc, columns = _processor()
    stats = [_stat("mlp.experts.3.gate_proj", 0.002, 90), _stat("mlp.experts.3.up_proj", 0.005, 90),
             _stat("mlp.experts.7.gate_proj", 0.001, 12)]
    with log_rows.chunk_log_rows() as counts:
        chunk = log_rows.ChunkRows(expected=3)
        for i, stat in enumerate(stats):
            log_rows.mark_batched(chunk)
            proc.log_new_row(stat)
            assert len(columns.rows) == (1 if i == 2 else 0)  # drawn once the chunk's last module logged
        # a module GPTQModel solved itself keeps its own row
        log_rows.mark_batched(None)
        proc.log_new_row(_stat("self_attn.q_proj", 0.0001, 4096))
    assert LoopProcessor.log_new_row is original
    assert proc.saved == [*stats, _stat("self_attn.q_proj", 0.0001, 4096)]  # each module's record, unchanged
    assert proc.log_call_count == 4
    assert counts.as_dict() == {"modules": 3, "rows": 1, "partial": 0, "stock": 1}
    chunk_row, attention_row = columns.rows
    labels = proc._log_column_labels
    row = {label: _plain(value) for label, value in zip(labels, chunk_row)}
    assert row["module"] == "mlp.experts.*.gate_proj|up_proj x3"
    assert row["loss"] == "0.0050000000" and row["samples"] == "12"  # the worst loss, the fewest samples
    assert row["damp"] == "0.05000" and row["time"] == "0.030"
    assert dict(zip(labels, attention_row))["module"] == "self_attn.q_proj"


def test_a_chunk_whose_modules_did_not_all_log_is_drawn_when_the_block_ends():
    from defuser_quant.integrations.gptqmodel import log_rows

    proc, columns = _processor()
    with log_rows.chunk_log_rows() as counts:
        chunk = log_rows.ChunkRows(expected=3)
        for stat in (_stat("mlp.experts.0.down_proj", 0.01, 30), _stat("mlp.experts.1.down_proj", 0.02, 40)):
            log_rows.mark_batched(chunk)
            proc.log_new_row(stat)
        assert columns.rows == []
    assert counts.as_dict() == {"modules": 2, "rows": 1, "partial": 1, "stock": 0}
    assert dict(zip(proc._log_column_labels, columns.rows[0]))["module"] == "mlp.experts.*.down_proj x2"


def test_summary_row_keeps_unindexed_names_and_unparsable_values():
    from gptqmodel.looper import loop_processor as keys

    from defuser_quant.integrations.gptqmodel.log_rows import summary_row

    row = summary_row([_stat("a.b", 0.1, 5), {**_stat("c.d", 0.2, 7), "loss": "fallback"}], keys)
    assert row["module"] == "a.b|c.d x2" and row["loss"] == "0.1000000000" and row["samples"] == "5"


def test_log_rows_setting_is_checked():
    from defuser_quant.integrations.gptqmodel.batched import BatchedSolve

    with pytest.raises(ValueError, match="log_rows must be 'chunk' or 'module'"):
        BatchedSolve(log_rows="layer")


@pytest.mark.slow
def test_chunk_rows_in_a_gptqmodel_run_keep_every_modules_log_record(plugin, tiny, tmp_path, per_module):  # noqa: F811
    from defuser_quant.integrations.gptqmodel.batched import BatchedSolve

    reference, _, tensors_ref = per_module
    result, _, tensors = _quantize(plugin, tiny, tmp_path, "rows", batched_solve=BatchedSolve(chunk_bytes=2_000_000))
    solve = result.solve
    assert not [k for k in tensors if not torch.equal(tensors[k], tensors_ref[k])]
    rows = solve.log_rows
    assert rows is not None and rows.modules == solve.batched_modules > 0
    assert rows.rows == solve.chunks > solve.groups and rows.partial == 0 and rows.stock > 0

    def records(r):
        return sorted((row["layer"], row["module"], row["samples"], row["loss"]) for row in r.log["gptq"])

    assert records(result) == records(reference)  # GPTQModel's per-module log, whole
    result, _, tensors = _quantize(plugin, tiny, tmp_path, "module_rows", batched_solve=BatchedSolve(log_rows="module"))
    assert result.solve.log_rows is None and records(result) == records(reference)
    assert not [k for k in tensors if not torch.equal(tensors[k], tensors_ref[k])]


def test_a_process_that_raises_after_its_solve_leaves_no_mark_for_the_next_row(monkeypatch):
    from gptqmodel.looper.gptq_processor import GPTQProcessor

    from defuser_quant.integrations.gptqmodel import log_rows
    from defuser_quant.integrations.gptqmodel.batched import batched_solves

    def process(self, module, *args, **kwargs):  # GPTQModel's process(): solved batched, then failed
        log_rows.mark_batched(log_rows.ChunkRows(expected=1))
        raise RuntimeError("failed before its log row")

    monkeypatch.setattr(GPTQProcessor, "process", process)
    with batched_solves():
        with pytest.raises(RuntimeError, match="before its log row"):
            GPTQProcessor.process(object(), object())
        assert getattr(log_rows._current, "rows", None) is None
