"""benchmarks/_hessian_prints.py: per-module digests of the Hessian each GPTQ solve starts from, and
their comparison with stock's in benchmarks/gptqmodel_gpu.py (``--hessian-prints``). The flag end to end, in a
real tiny CPU call, is tested in test_gptqmodel_benchmark.py (one call serves several tests there)."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import _hessian_prints as hp  # noqa: E402
import gptqmodel_gpu as bench  # noqa: E402


@pytest.fixture
def GPTQ():  # noqa: N802 - GPTQModel's class; imported per test: importing gptqmodel patches safetensors' save_file
    pytest.importorskip("gptqmodel")
    from gptqmodel.quantization.gptq import GPTQ

    return GPTQ


def _task(full_name: str, hessian: torch.Tensor, weight: torch.Tensor | None = None) -> SimpleNamespace:
    relative = full_name.split(".", 3)[-1]  # GPTQModel's task.name is relative to the layer
    module = SimpleNamespace(weight=torch.nn.Parameter(weight)) if weight is not None else None
    return SimpleNamespace(name=relative, _named_module=SimpleNamespace(full_name=full_name), H=hessian, module=module)


def test_digest_follows_the_values_dtype_and_shape_not_the_memory_layout():
    a = torch.randn(6, 6)
    h = a + a.T  # exactly symmetric: its transpose has the same values in another layout
    assert hp.digest(h) == hp.digest(h.clone()) == hp.digest(h.T)
    bumped = h.clone()
    bumped[2, 3] = torch.nextafter(bumped[2, 3], torch.tensor(float("inf")))
    assert hp.digest(bumped) != hp.digest(h)
    assert hp.digest(h.double()) != hp.digest(h)
    assert hp.digest(h.reshape(4, 9)) != hp.digest(h)


def test_prints_keep_each_modules_first_finalized_hessian_by_full_name_and_restore(monkeypatch, GPTQ):
    monkeypatch.setattr(GPTQ, "finalize_hessian", lambda task, target_device=None: task.H)
    stub = GPTQ.finalize_hessian
    h0, h1 = torch.eye(4), 2 * torch.eye(4)
    w0, w1 = torch.randn(3, 4, dtype=torch.bfloat16), torch.randn(3, 4, dtype=torch.bfloat16)
    k0, k1 = _task("model.layers.0.self_attn.k_proj", h0, w0), _task("model.layers.1.self_attn.k_proj", h1, w1)
    embedding = _task("model.embed_tokens", torch.ones(4))  # GPTQModel's embedding path returns a diagonal
    with hp.HessianPrints() as prints:
        assert GPTQ.finalize_hessian(k0) is h0  # the result passes through unchanged
        GPTQ.finalize_hessian(k1)
        k0.H = 3 * torch.eye(4)
        k0.module.weight.data = w1.clone()
        GPTQ.finalize_hessian(k0)  # a later finalize of the same module: the first is kept
        GPTQ.finalize_hessian(embedding)
    assert GPTQ.finalize_hessian is stub
    assert prints.digests == {"model.layers.0.self_attn.k_proj": hp.digest(h0),
                              "model.layers.1.self_attn.k_proj": hp.digest(h1)}
    # the weight each solve reads, taken with its Hessian (none for a task without a module)
    assert prints.weights == {"model.layers.0.self_attn.k_proj": hp.digest(w0),
                              "model.layers.1.self_attn.k_proj": hp.digest(w1)}


def test_prints_restore_the_method_when_the_run_fails(monkeypatch, GPTQ):
    from defuser_quant.integrations.gptqmodel import batched

    monkeypatch.setattr(GPTQ, "finalize_hessian", lambda task, target_device=None: task.H)
    stub, inverse, first_inverse = GPTQ.finalize_hessian, GPTQ.hessian_inverse, batched.gptq_first_inverse
    with pytest.raises(KeyboardInterrupt), hp.HessianPrints():
        assert GPTQ.hessian_inverse is not inverse and batched.gptq_first_inverse is not first_inverse
        raise KeyboardInterrupt
    assert GPTQ.finalize_hessian is stub
    assert GPTQ.hessian_inverse is inverse and batched.gptq_first_inverse is first_inverse


def test_inverse_prints_key_each_factor_by_the_hessian_it_was_given_before_the_damp(GPTQ):
    from defuser_quant.integrations.gptqmodel import batched

    a = torch.randn(40, 8, dtype=torch.float64).float()
    h = a.T.matmul(a) / 40
    given = hp.digest(h)
    with hp.HessianPrints() as prints:
        hinv, info = batched.gptq_first_inverse(h.clone(), 0.01)  # ours: adds its damp in place
        assert int(info) == 0
    assert prints.inverses == {given: hp.digest(hinv)} and prints.inverse_modules == {}
    other = torch.eye(8)
    with hp.HessianPrints() as prints:
        batched.gptq_first_inverse(h.clone(), 0.01)
        batched.gptq_first_inverse(h.clone(), 0.02)  # the same Hessian again: the first factor is kept
        batched.gptq_first_inverse(other.clone(), 0.01)
    assert list(prints.inverses) == [given, hp.digest(other)] and prints.inverses[given] == hp.digest(hinv)


def test_compare_inverses_names_stocks_module_for_each_differing_factor():
    stock = {"h1": "f1", "h2": "f2", "h3": "f3"}
    ours = {"h2": "f2", "h1": "x", "h4": "f4"}
    assert hp.compare_inverses(stock, ours, {"h1": "model.layers.0.self_attn.q_proj"}) == {
        "hessians": 2, "equal": 1, "first_differing": ["model.layers.0.self_attn.q_proj"],
        "only_in_base": 1, "only_in_other": 1}
    assert hp.compare_inverses(stock, {"h3": "y"})["first_differing"] == ["h3"]  # no name known: its key


def test_compare_counts_equal_hessians_and_lists_the_first_differing_in_base_order():
    base = {"l0.q": "a", "l0.k": "b", "l0.v": "c", "l1.q": "d", "l1.k": "e"}
    other = {"l1.k": "x", "l0.v": "c", "l0.k": "y", "l0.q": "w", "l2.q": "z"}
    assert hp.compare(base, other) == {"modules": 4, "equal": 1, "first_differing": ["l0.q", "l0.k", "l1.k"],
                                       "only_in_base": 1, "only_in_other": 1}
    assert hp.compare(base, other, first=1)["first_differing"] == ["l0.q"]  # base's order, not the names' order


def test_the_benchmark_compares_every_printed_row_with_stock_and_passes_the_flag(tmp_path, monkeypatch):
    stock = {"variant": "stock", "hessian_prints": {"m.a": "1", "m.b": "2"}, "weight_prints": {"m.a": "5", "m.b": "6"}}
    ours = {"variant": "ours-grouped-batched", "hessian_prints": {"m.a": "1", "m.b": "3"},
            "weight_prints": {"m.a": "7", "m.b": "6"}}
    failed = {"variant": "ours", "error": "exit 1", "hessian_prints": {}}
    unprinted = {"variant": "ours-grouped"}
    bench.compare_hessian_prints([stock, ours, failed, unprinted], stock)
    assert ours["hessians_vs_stock"]["first_differing"] == ["m.b"] and ours["hessians_vs_stock"]["equal"] == 1
    assert ours["weights_vs_stock"]["first_differing"] == ["m.a"] and ours["weights_vs_stock"]["equal"] == 1
    assert "hessians_vs_stock" not in stock and "hessians_vs_stock" not in failed and "hessians_vs_stock" not in unprinted
    seen = {}

    def run(cmd, env, **kwargs):
        seen["cmd"] = cmd
        return bench.subprocess.CompletedProcess(cmd, 1, "", "stopped here")

    monkeypatch.setattr(bench.subprocess, "run", run)
    bench.run_variant("stock", bench.parse_args(["--device", "cpu", "--hessian-prints"]), tmp_path)
    assert "--hessian-prints" in seen["cmd"]
    bench.run_variant("stock", bench.parse_args(["--device", "cpu"]), tmp_path)
    assert "--hessian-prints" not in seen["cmd"]
