"""fuse_model: refuses what the fused layout cannot represent (naming the module and the
difference), leaves the model unchanged when it refuses or fails half way, and re-fuses
experts the user reordered to the reordered (not the original) weights."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import defuser_quant as dq
from tiny import build, logits, state


def _defused_state(model) -> tuple[list[tuple[str, type]], dict[str, torch.Tensor]]:
    return [(n, type(m)) for n, m in model.named_modules()], state(model)


def _assert_unchanged(model, ids, before, ref) -> None:
    modules, tensors = before
    assert [(n, type(m)) for n, m in model.named_modules()] == modules
    after = state(model)
    assert after.keys() == tensors.keys()
    assert all(torch.equal(tensors[k], after[k]) for k in tensors)
    assert torch.equal(logits(model, ids), ref)


def test_added_bias_is_refused_naming_the_module_and_nothing_changes():
    model, ids = build("qwen3_moe")
    dq.convert_model(model)
    model.model.layers[1].mlp.experts[3].down_proj.bias = nn.Parameter(torch.full((64,), 0.05))
    before, ref = _defused_state(model), logits(model, ids)
    with pytest.raises(dq.FuseError, match=r"model\.layers\.1\.mlp\.experts\.3\.down_proj has a bias.*Qwen3MoeExperts stores none"):
        dq.fuse_model(model)
    _assert_unchanged(model, ids, before, ref)


def test_all_zero_added_bias_is_exact_and_fuses():
    model, ids = build("qwen3_moe")
    dq.convert_model(model)
    model.model.layers[0].mlp.experts[1].gate_proj.bias = nn.Parameter(torch.zeros(32))
    ref = logits(model, ids)
    assert dq.fuse_model(model)
    assert torch.equal(logits(model, ids), ref)


def test_missing_bias_of_a_biased_layout_is_refused():
    model, ids = build("gpt_oss")
    dq.convert_model(model)
    model.model.layers[1].mlp.experts[6].up_proj.bias = None
    before, ref = _defused_state(model), logits(model, ids)
    with pytest.raises(dq.FuseError, match=r"model\.layers\.1\.mlp\.experts\.6\.up_proj\.bias is missing.*\[32\]"):
        dq.fuse_model(model)
    _assert_unchanged(model, ids, before, ref)


def test_resized_projection_is_refused_with_both_shapes_and_nothing_changes():
    model, ids = build("qwen3_moe")
    dq.convert_model(model)
    expert = model.model.layers[1].mlp.experts[2]  # a wider expert: runs, but has no place in [E, 2I, H]
    expert.gate_proj, expert.up_proj, expert.down_proj = nn.Linear(64, 40, False), nn.Linear(64, 40, False), nn.Linear(40, 64, False)
    before, ref = _defused_state(model), logits(model, ids)
    with pytest.raises(dq.FuseError, match=r"model\.layers\.1\.mlp\.experts\.2\.gate_proj\.weight has shape \[40, 64\].*needs \[32, 64\]"):
        dq.fuse_model(model)
    _assert_unchanged(model, ids, before, ref)


def test_one_expert_in_another_dtype_is_refused_naming_both():
    model, ids = build("mixtral")
    dq.convert_model(model)
    model.model.layers[1].mlp.experts[5].w2.to(torch.float64)
    before = _defused_state(model)
    with pytest.raises(dq.FuseError, match=r"experts\.5\.w2\.weight is torch\.float64.*experts\.0\.w2\.weight is torch\.float32"):
        dq.fuse_model(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == before[0]


@pytest.mark.parametrize("cleanup_original", [True, False])
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("failure", [RuntimeError("simulated out of memory"), KeyboardInterrupt()])
def test_failure_half_way_restores_the_defused_model(family, failure, cleanup_original, monkeypatch):
    """The second block fails after the first is fused (and, for gpt_oss, its storage relaid out
    back to the native layout in place): every block is defused again, bit for bit, and fused
    tensors kept by ``cleanup_original=False`` are the originals again."""
    import defuser_quant.core.fuse as fuse

    model, ids = build(family)
    fused_state = state(model)
    originals = [layer.mlp.experts.gate_up_proj for layer in model.model.layers]
    dq.convert_model(model, cleanup_original=cleanup_original)
    before, ref = _defused_state(model), logits(model, ids)
    real, calls = fuse.put_tensor, {"n": 0}
    per_block = len(model.model.layers[0].mlp.experts.specs)

    def failing(shell, name, *args):
        calls["n"] += 1
        if calls["n"] == per_block + 1:
            raise failure
        return real(shell, name, *args)

    monkeypatch.setattr(fuse, "put_tensor", failing)
    with pytest.raises(dq.FuseError if isinstance(failure, Exception) else KeyboardInterrupt):
        dq.fuse_model(model)
    _assert_unchanged(model, ids, before, ref)
    if not cleanup_original:
        assert all(layer.mlp.experts.gate_up_proj is kept for layer, kept in zip(model.model.layers, originals))
    monkeypatch.undo()
    report = dq.fuse_model(model)  # and the restored model still re-fuses exactly (zero copy where it was carved in place)
    assert all(r.zero_copy for r in report.converted) == (cleanup_original or family == "qwen3_moe")
    assert all(torch.equal(v, state(model)[k]) for k, v in fused_state.items())


def test_reordered_experts_fuse_to_the_new_order():
    """Swapping two experts' modules keeps their storage where it was: the aliasing fast path
    must notice the offsets no longer match and copy, or the re-fused model is silently the
    old one."""
    model, ids = build("qwen3_moe", num_experts_per_tok=4)
    dq.convert_model(model)
    block = model.model.layers[0].mlp.experts
    block._modules["2"], block._modules["3"] = block._modules["3"], block._modules["2"]
    ref = logits(model, ids)
    report = dq.fuse_model(model)
    assert not report.converted[0].zero_copy and report.converted[1].zero_copy
    assert torch.equal(logits(model, ids), ref)


def _phi3():
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config).eval()
    return model, torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def test_dense_bias_on_one_half_is_refused():
    model, ids = _phi3()
    dq.convert_model(model)
    mlp = model.model.layers[1].mlp
    mlp.up_proj.bias = nn.Parameter(torch.ones(64))
    before, ref = _defused_state(model), logits(model, ids)
    with pytest.raises(dq.FuseError, match=r"model\.layers\.1\.mlp\.up_proj has a bias and its other half has none"):
        dq.fuse_model(model)
    _assert_unchanged(model, ids, before, ref)


def test_dense_fuse_failing_half_way_resplits_the_first_mlp(monkeypatch):
    import defuser_quant.core.dense as dense

    model, ids = _phi3()
    dq.convert_model(model)
    before, ref = _defused_state(model), logits(model, ids)
    real, calls = dense._unsplit, {"n": 0}

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated failure")
        return real(*args)

    monkeypatch.setattr(dense, "_unsplit", failing)
    with pytest.raises(dq.FuseError, match="restored"):
        dq.fuse_model(model)
    assert all(dense.is_split(layer.mlp) for layer in model.model.layers)
    _assert_unchanged(model, ids, before, ref)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_gradients_are_carried_back_into_the_fused_parameters(family):
    """Backward on the defused model, then fuse: the fused Parameters hold the gradients the
    fused model computes itself (experts no token reached: zeros)."""
    reference, ids = build(family)
    model, _ = build(family)
    dq.convert_model(model)
    for m in (reference, model):
        m.train()
        m(ids).logits.pow(2).mean().backward()
    dq.fuse_model(model)
    wanted = dict(reference.named_parameters())
    experts = [(n, p) for n, p in model.named_parameters() if ".experts." in n]
    assert len(experts) == len([n for n in wanted if ".experts." in n])
    for name, got in experts:
        assert got.grad is not None, name
        torch.testing.assert_close(got.grad, wanted[name].grad, rtol=1e-5, atol=1e-7)


def test_temporarily_fused_keeps_each_blocks_cleanup_choice():
    model, ids = build("gpt_oss")
    dq.convert_model(model, filter="layers\\.0\\.", cleanup_original=False)
    dq.convert_model(model)
    ref = logits(model, ids)
    with dq.temporarily_fused(model):
        fused = [layer.mlp.experts.gate_up_proj.detach().clone() for layer in model.model.layers]
    kept, dropped = (layer.mlp.experts for layer in model.model.layers)
    assert torch.equal(kept.gate_up_proj, fused[0])  # readable again, native layout
    assert dropped.gate_up_proj.device.type == "meta"  # shape only, as before
    assert torch.equal(logits(model, ids), ref)
