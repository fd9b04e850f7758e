"""``defuser_quant.compat.defuser``: Defuser 0.0.28's public API over the core.

Signatures are compared with the installed Defuser's (read by ``inspect``), results with running
Defuser itself on the same model, and GPTQModel 7.6's own loader code runs with the module in
place of ``defuser``.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch

import defuser_quant as dq
from defuser_quant.compat import defuser as compat
from tiny import build, logits, state


def _defuser():
    return pytest.importorskip("defuser", reason="Defuser is installed with gptqmodel only")


def test_public_names_and_signatures_are_defusers():
    defuser = _defuser()
    from defuser import defuser as implementation

    assert sorted(compat.__all__) == sorted(defuser.__all__)
    for name in defuser.__all__:
        theirs = inspect.signature(getattr(implementation, name))
        ours = inspect.signature(getattr(compat, name))
        assert [(p.name, p.kind, p.default) for p in ours.parameters.values()] == [
            (p.name, p.kind, p.default) for p in theirs.parameters.values()
        ], name
        assert ours.return_annotation in (bool, "bool") and theirs.return_annotation in (bool, "bool")


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_convert_model_returns_what_defuser_returns_and_converts_exactly(family):
    defuser = _defuser()
    model, ids = build(family)
    ref = logits(model, ids)
    theirs = copy.deepcopy(model)
    assert defuser.convert_model(theirs) is True
    assert compat.convert_model(model) is True
    assert model.state_dict().keys() == theirs.state_dict().keys()  # same per-expert names
    assert all(b.defused for b in dq.find_fused_blocks(model))
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-6, atol=1e-6)
    if family == "qwen3_moe":
        assert torch.equal(logits(model, ids), ref)  # the core is exact here; Defuser differs by ~2e-7
    assert compat.convert_model(model) is False  # nothing left to convert (Defuser says True again)


def test_mixtral_keeps_its_checkpoint_names_where_defuser_renames():
    defuser = _defuser()
    model, _ = build("mixtral")
    theirs = copy.deepcopy(model)
    defuser.convert_model(theirs)
    compat.convert_model(model)
    assert "model.layers.0.mlp.experts.0.w1.weight" in model.state_dict()
    assert "model.layers.0.mlp.experts.0.gate_proj.weight" in theirs.state_dict()


def test_cleanup_original_keeps_or_drops_the_fused_tensors():
    kept, _ = build("qwen3_moe")
    fused = kept.model.layers[0].mlp.experts.gate_up_proj.detach().clone()
    assert compat.convert_model(kept) is True  # Defuser's default: cleanup_original=False
    assert torch.equal(kept.model.layers[0].mlp.experts.gate_up_proj, fused)
    dropped, _ = build("qwen3_moe")
    assert compat.convert_model(dropped, cleanup_original=True) is True
    assert dropped.model.layers[0].mlp.experts.gate_up_proj.device.type == "meta"  # shape only, no data
    assert dropped.state_dict().keys() == kept.state_dict().keys()  # per-expert names either way


def test_max_layers_and_filter_follow_defusers_rules():
    model, ids = build("qwen3_moe")
    before = state(model)
    with pytest.raises(ValueError, match="max_layers must be >= 1"):
        compat.convert_model(model, max_layers=0)
    with pytest.raises(TypeError, match="sequence of regex strings"):
        compat.convert_model(model, filter=r"layers\.0")
    with pytest.raises(TypeError, match="rules must be strings"):
        compat.convert_model(model, filter=[r"layers\.0", 1])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert compat.convert_model(model, filter=[r"+:layers\.", r"-:layers\.1\."]) is True
    assert [b.defused for b in dq.find_fused_blocks(model)] == [True, False]
    assert compat.convert_model(model, max_layers=1) is False  # layer 1 is beyond the limit
    assert compat.convert_model(model, max_layers=2) is True


def test_replace_fused_blocks_returns_defusers_bools(tmp_path):
    model, ids = build("qwen3_moe")
    ref = logits(model, ids)
    model.save_pretrained(tmp_path)
    assert compat.replace_fused_blocks("qwen3_moe") is True
    assert compat.replace_fused_blocks("qwen3_moe") is True  # still patched, as Defuser re-patches
    assert compat.replace_fused_blocks("llama") is False  # nothing to patch
    assert compat.replace_fused_blocks("no_such_model") is False  # unknown to Transformers
    loaded = type(model).from_pretrained(tmp_path, experts_implementation="eager").eval()
    assert all(b.defused for b in dq.find_fused_blocks(loaded))
    assert compat.convert_model(loaded) is False  # built defused, as Defuser's prebuilt replacements
    torch.testing.assert_close(logits(loaded, ids), ref, rtol=1e-5, atol=1e-6)


def test_unmodelled_structure_is_raised_not_skipped():
    from test_unmodelled_structure import ExpertsWithNorm, _swap_experts

    model, _ = build("qwen3_moe")
    _swap_experts(model, ExpertsWithNorm)
    with pytest.raises(dq.UnmodelledStructureError, match="post_norm"):
        compat.convert_model(model)
    assert not any(isinstance(m, dq.DefusedExperts) for m in model.modules())


def test_gptqmodels_loader_runs_unchanged_with_it(monkeypatch):
    """GPTQModel 7.6's own conversion step (``_convert_model_with_defuser``), with this module as
    its ``defuser``: the experts come out defused, exactly, including ``defuser_module_paths``."""
    loader = pytest.importorskip("gptqmodel.models.loader")
    monkeypatch.setattr(loader, "defuser", compat)
    model, ids = build("qwen3_moe")
    ref = logits(model, ids)

    class Definition:  # what GPTQModel reads from a model definition class
        defuser_module_paths = ("model.layers.1",)
        finalized = []

        @classmethod
        def after_defuser_conversion(cls, model):
            cls.finalized.append(model)

    assert loader._convert_model_with_defuser(Definition, model, cleanup_original=True) is True
    assert Definition.finalized == [model]
    assert all(b.defused for b in dq.find_fused_blocks(model))
    assert torch.equal(logits(model, ids), ref)
