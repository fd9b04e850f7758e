"""convert_model / fuse_model: same math, zero copy, round trips, filters, errors, rollback."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import defuser_quant as dq
from defuser_quant.core.defuse import convert_model
from tiny import EXACT, FAMILIES, build, logits, state

FAMILY_NAMES = sorted(FAMILIES)


def _assert_close(family, out, ref):
    if family in EXACT:
        assert torch.equal(out, ref), (out - ref).abs().max()
    else:
        torch.testing.assert_close(out, ref, rtol=1e-6 if out.dtype == torch.float32 else 2e-2, atol=1e-5 if out.dtype == torch.float32 else 5e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_defused_forward_matches_fused_eager(family, dtype):
    model, ids = build(family, dtype)
    ref = logits(model, ids)
    report = dq.convert_model(model)
    assert report and len(report.converted) == 2
    assert not any(p.dim() == 3 for p in model.parameters())
    experts = model.model.layers[0].mlp.experts
    assert isinstance(experts, dq.DefusedExperts) and len(experts) == 8
    assert all(isinstance(m, nn.Linear) for m in experts[0].children())
    _assert_close(family, logits(model, ids), ref)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_expert_is_exercised_and_matches(family):
    """Route every token to every expert (top-k = E) so rarely hit experts are compared too."""
    model, ids = build(family, num_experts_per_tok=8)
    ref = logits(model, ids)
    dq.convert_model(model)
    _assert_close(family, logits(model, ids), ref)


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_round_trip_is_bit_identical_and_zero_copy(family):
    model, ids = build(family)
    before = state(model)
    ptrs = {n: p.untyped_storage().data_ptr() for n, p in model.named_parameters() if p.dim() == 3}
    dq.convert_model(model)
    experts = model.model.layers[0].mlp.experts
    gate = experts[3].projection("gate").weight
    assert gate.untyped_storage().data_ptr() == ptrs["model.layers.0.mlp.experts.gate_up_proj"]
    report = dq.fuse_model(model)
    assert report and all(r.zero_copy for r in report.converted)
    after = state(model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert type(model.model.layers[0].mlp.experts).__name__ == type(experts.fused_shell).__name__
    for n, p in model.named_parameters():
        if n in ptrs:
            assert p.untyped_storage().data_ptr() == ptrs[n], f"{n} was copied"


def test_views_share_storage_no_copy_for_concatenated_layout():
    model, _ = build("qwen3_moe")
    fused = model.model.layers[0].mlp.experts.gate_up_proj
    dq.convert_model(model)
    block = model.model.layers[0].mlp.experts
    base = fused.untyped_storage().data_ptr()
    size = fused.element_size()
    for e, expert in enumerate(block):
        gate, up = expert.gate_proj.weight, expert.up_proj.weight
        assert gate.untyped_storage().data_ptr() == base and gate.is_contiguous()
        assert gate.storage_offset() * size == fused[e, :32].storage_offset() * size
        assert up.storage_offset() == fused[e, 32:].storage_offset()


def test_interleaved_transposed_gpt_oss_split_by_even_odd_columns():
    model, _ = build("gpt_oss")
    fused = model.model.layers[0].mlp.experts
    gate_up = fused.gate_up_proj.detach().clone()  # [E, H, 2I], interleaved
    bias = fused.gate_up_proj_bias.detach().clone()
    down = fused.down_proj.detach().clone()  # [E, I, H]
    dq.convert_model(model)
    expert = model.model.layers[0].mlp.experts[5]
    assert torch.equal(expert.gate_proj.weight, gate_up[5][:, 0::2].T)
    assert torch.equal(expert.up_proj.weight, gate_up[5][:, 1::2].T)
    assert torch.equal(expert.gate_proj.bias, bias[5][0::2])
    assert torch.equal(expert.up_proj.bias, bias[5][1::2])
    assert torch.equal(expert.down_proj.weight, down[5].T)
    assert expert.gate_proj.weight.is_contiguous()


def test_mixtral_exposes_original_checkpoint_names():
    model, _ = build("mixtral")
    dq.convert_model(model)
    expert = model.model.layers[0].mlp.experts[0]
    assert {n for n, _ in expert.named_children()} == {"w1", "w2", "w3"}


def test_convert_twice_is_a_no_op():
    model, ids = build("qwen3_moe")
    dq.convert_model(model)
    snapshot, modules = state(model), [id(m) for m in model.modules()]
    again = dq.convert_model(model)
    assert not again
    assert {r.reason for r in again.skipped} == {"already defused"}
    assert [id(m) for m in model.modules()] == modules
    assert all(torch.equal(v, state(model)[k]) for k, v in snapshot.items())


def test_filter_rules_include_exclude_negative_wins():
    model, _ = build("qwen3_moe")
    report = dq.convert_model(model, filter=["+:layers\\.", "-:layers\\.1\\."])
    assert [r.path for r in report.converted] == ["model.layers.0.mlp.experts"]
    assert report.skipped[0].reason == "excluded by filter"
    assert not isinstance(model.model.layers[1].mlp.experts, dq.DefusedExperts)
    model2, _ = build("qwen3_moe")
    assert [r.path for r in dq.convert_model(model2, filter="layers\\.1\\.").converted] == ["model.layers.1.mlp.experts"]


def test_max_layers():
    model, _ = build("qwen3_moe")
    report = dq.convert_model(model, max_layers=1)
    assert [r.path for r in report.converted] == ["model.layers.0.mlp.experts"]
    assert "max_layers" in report.skipped[0].reason


@pytest.mark.parametrize("rule", ["+:([", "-:*x", ""])
def test_bad_filter_rule_names_the_rule_and_changes_nothing(rule):
    model, _ = build("qwen3_moe")
    before = state(model)
    with pytest.raises(dq.FilterRuleError) as info:
        dq.convert_model(model, filter=["+:layers", rule])
    assert repr(rule) in str(info.value)
    assert state(model).keys() == before.keys()


def test_shared_storage_is_refused_before_any_change():
    model, _ = build("qwen3_moe")
    layers = model.model.layers
    layers[1].mlp.experts.down_proj = layers[0].mlp.experts.down_proj  # tie
    before = state(model)
    with pytest.raises(dq.SharedStorageError, match="model.layers.0.mlp.experts.down_proj"):
        dq.convert_model(model)
    assert not any(isinstance(m, dq.DefusedExperts) for m in model.modules())
    assert all(torch.equal(v, state(model)[k]) for k, v in before.items())


def test_inconsistent_layout_is_refused_before_any_change():
    model, _ = build("qwen3_moe")
    bad = model.model.layers[1].mlp.experts
    bad.down_proj = nn.Parameter(torch.zeros(8, 64, 7))
    with pytest.raises(dq.LayoutError, match="model.layers.1.mlp.experts"):
        dq.convert_model(model)
    assert not isinstance(model.model.layers[0].mlp.experts, dq.DefusedExperts)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("failure", [RuntimeError("simulated out of memory"), KeyboardInterrupt()])
def test_failure_half_way_restores_the_model_exactly(family, failure, monkeypatch):
    import defuser_quant.core.defuse as engine

    model, ids = build(family)
    before, ref = state(model), logits(model, ids)
    modules_before = [(n, type(m)) for n, m in model.named_modules()]
    real = engine.build_defused
    calls = {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the first block is already converted (and relaid out for gpt_oss)
            raise failure
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "build_defused", failing)
    expected = dq.ConversionError if isinstance(failure, Exception) else KeyboardInterrupt
    with pytest.raises(expected):
        convert_model(model)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules_before
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(logits(model, ids), ref)


def test_meta_model_converts_without_materializing():
    from tiny import qwen3_moe_config
    from transformers import Qwen3MoeForCausalLM

    with torch.device("meta"):
        model = Qwen3MoeForCausalLM(qwen3_moe_config())
    report = dq.convert_model(model)
    assert report
    expert = model.model.layers[0].mlp.experts[2]
    assert expert.gate_proj.weight.device.type == "meta"
    assert tuple(expert.gate_proj.weight.shape) == (32, 64)
    assert tuple(expert.down_proj.weight.shape) == (64, 32)


def test_fuse_refuses_replaced_projections_and_changes_nothing():
    model, _ = build("qwen3_moe")
    dq.convert_model(model)
    block = model.model.layers[1].mlp.experts
    block[4].up_proj = nn.Identity()
    with pytest.raises(dq.FuseError, match=r"model.layers.1.mlp.experts.4.up_proj"):
        dq.fuse_model(model)
    assert isinstance(model.model.layers[0].mlp.experts, dq.DefusedExperts)


def test_fuse_after_dtype_change_copies_and_still_round_trips():
    model, ids = build("gpt_oss")
    dq.convert_model(model)
    model.to(torch.float64)  # every per-expert weight gets its own storage
    ref = logits(model, ids)
    report = dq.fuse_model(model)
    assert not report.converted[0].zero_copy
    assert model.model.layers[0].mlp.experts.gate_up_proj.dtype == torch.float64
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-12, atol=1e-12)


def test_report_is_structured():
    model, _ = build("gpt_oss")
    report = dq.convert_model(model)
    data = report.to_dict()
    assert data["converted"][0]["class_name"] == "GptOssExperts"
    assert data["converted"][0]["layout"] == "gated/interleaved/[E,in,out]/bias"
    assert data["converted"][0]["num_experts"] == 8
    assert "2 block(s) converted (16 experts)" in report.summary()


def test_accelerate_cpu_offload_keeps_weights_reachable():
    from accelerate import cpu_offload

    model, ids = build("qwen3_moe")
    ref = logits(model, ids)
    cpu_offload(model, execution_device=torch.device("cpu"))
    assert model.model.layers[0].mlp.experts.gate_up_proj.device.type == "meta"
    dq.convert_model(model)
    block = model.model.layers[0].mlp.experts
    assert isinstance(block, dq.DefusedExperts)
    assert torch.equal(logits(model, ids), ref)


def test_fused_tensors_held_as_buffers_are_defused_and_restored_as_buffers():
    model, ids = build("qwen3_moe")
    for layer in model.model.layers:
        experts = layer.mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            tensor = experts._parameters.pop(name).detach()
            experts.register_buffer(name, tensor)
    ref = logits(model, ids)
    assert dq.convert_model(model)
    assert torch.equal(logits(model, ids), ref)
    dq.fuse_model(model)
    experts = model.model.layers[0].mlp.experts
    assert "gate_up_proj" in experts._buffers and "gate_up_proj" not in experts._parameters


def test_partially_converted_model_converts_the_rest_and_fuses_back():
    model, ids = build("qwen3_moe")
    before = state(model)
    dq.convert_model(model, filter="layers\\.0\\.")
    report = dq.convert_model(model)
    assert [r.path for r in report.converted] == ["model.layers.1.mlp.experts"]
    assert [r.reason for r in report.skipped] == ["already defused"]
    dq.fuse_model(model)
    assert all(torch.equal(v, state(model)[k]) for k, v in before.items())


def test_block_with_a_missing_expert_cannot_be_fused():
    model, _ = build("qwen3_moe")
    dq.convert_model(model)
    del model.model.layers[0].mlp.experts._modules["5"]
    with pytest.raises(dq.FuseError, match="expert 5 is missing"):
        dq.fuse_model(model)
    assert isinstance(model.model.layers[1].mlp.experts, dq.DefusedExperts)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_cuda_defuse_matches_and_round_trips(family):
    model, ids = build(family)
    model, ids = model.cuda(), ids.cuda()
    ref = logits(model, ids)
    before = state(model)
    dq.convert_model(model)
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-5, atol=1e-5)
    dq.fuse_model(model)
    assert all(torch.equal(v, state(model)[k]) for k, v in before.items())


def test_rename_projections_keeps_modules_and_fuses_back():
    model, ids = build("mixtral")
    before, ref = state(model), logits(model, ids)
    dq.convert_model(model)
    block = model.model.layers[0].mlp.experts
    w1 = block[2].w1
    block.rename_projections(dq.core.defused.ProjectionNames())
    assert block[2].gate_proj is w1 and not hasattr(block[2], "w1")
    assert torch.equal(logits(model, ids), ref)
    with pytest.raises(ValueError, match="gated and ungated"):
        block.rename_projections(dq.core.defused.ProjectionNames(gate=None))
    dq.fuse_model(model)
    assert all(torch.equal(v, state(model)[k]) for k, v in before.items())


def test_accelerate_disk_offload_keeps_weights_reachable(tmp_path):
    from accelerate import disk_offload

    model, ids = build("gpt_oss")  # transposed + interleaved: relaid out from the loaded copy
    ref = logits(model, ids)
    disk_offload(model, str(tmp_path / "offload"), execution_device=torch.device("cpu"))
    assert model.model.layers[0].mlp.experts.gate_up_proj.device.type == "meta"
    assert dq.convert_model(model)
    block = model.model.layers[1].mlp.experts
    assert isinstance(block, dq.DefusedExperts)
    torch.testing.assert_close(logits(model, ids), ref, rtol=1e-6, atol=1e-5)


def test_gpt_oss_built_under_the_preload_patch_with_grad_mode_on():
    """Building the model (grad mode on, Parameters requiring grad) carves the transposed,
    interleaved slabs in place: that must not trip autograd, and the block must train."""
    from tiny import gpt_oss_config, randomize_experts
    from transformers import GptOssForCausalLM

    torch.manual_seed(0)
    reference = GptOssForCausalLM(gpt_oss_config()).eval()
    randomize_experts(reference)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    ref = logits(reference, ids)
    dq.convert_model(reference)
    assert torch.is_grad_enabled()
    dq.replace_fused_blocks("gpt_oss")
    patched = GptOssForCausalLM(gpt_oss_config()).eval()
    assert isinstance(patched.model.layers[0].mlp.experts, dq.DefusedExperts)
    patched.load_state_dict(reference.state_dict())
    torch.testing.assert_close(logits(patched, ids), ref, rtol=1e-6, atol=1e-5)
    patched(ids).logits.sum().backward()
    expert = patched.model.layers[0].mlp.experts[0]
    grads = [p.grad for p in expert.parameters()]
    assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)


def _split_matmul_is_exact(tokens: int, hidden: int, inter: int) -> bool:
    """Whether this CPU's BLAS computes the columns of x @ [2I, H]^T like x @ [I, H]^T of each half."""
    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(tokens, hidden, generator=gen), torch.randn(2 * inter, hidden, generator=gen)
    fused = nn.functional.linear(x, w)
    return torch.equal(fused[:, :inter], nn.functional.linear(x, w[:inter])) and torch.equal(
        fused[:, inter:], nn.functional.linear(x, w[inter:])
    )


@pytest.mark.parametrize("inter", [24, 40])
def test_gate_activation_rounds_like_the_fused_chunk(inter):
    """The fused loop applies the activation to a strided half of one [T, 2I] output; SiLU
    rounds differently there than on a contiguous tensor unless I is a multiple of its vector
    loop (off by 1.2e-7 at I=24). The defused gate must see the same memory layout."""
    model, _ = build("qwen3_moe", moe_intermediate_size=inter)
    shell_act = model.model.layers[0].mlp.experts.act_fn
    dq.convert_model(model)
    gate_fn = model.model.layers[0].mlp.experts[0].gate_fn
    gate_up = torch.randn(37, 2 * inter, generator=torch.Generator().manual_seed(2))
    gate, up = gate_up.chunk(2, dim=-1)
    assert torch.equal(gate_fn(gate.contiguous(), up.contiguous()), shell_act(gate) * up)


@pytest.mark.parametrize("family,key", [("qwen3_moe", "moe_intermediate_size"), ("mixtral", "intermediate_size")])
@pytest.mark.parametrize("inter", [24, 40])
def test_fp32_bit_exact_where_the_split_matmul_is(family, key, inter):
    """Bit-exact in fp32 whenever the BLAS splits the gate/up matmul exactly (a property of the
    CPU kernel and I, probed here); every other operation is the fused loop's, on the same layout."""
    if not _split_matmul_is_exact(48, 64, inter):
        pytest.skip(f"this BLAS rounds x @ W[:I] unlike the first I columns of x @ W for I={inter}")
    model, ids = build(family, **{key: inter})
    ref = logits(model, ids)
    dq.convert_model(model)
    assert torch.equal(logits(model, ids), ref)


def test_dense_split_is_rolled_back_when_a_later_block_fails(monkeypatch):
    import defuser_quant.core.defuse as engine
    from defuser_quant.core.dense import is_split
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config).eval()
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    before, ref = state(model), logits(model, ids)
    modules_before = [(n, type(m)) for n, m in model.named_modules()]
    real, calls = engine.split_dense_mlp, {"n": 0}

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated failure")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine, "split_dense_mlp", failing)
    with pytest.raises(dq.ConversionError, match="restored"):
        dq.convert_model(model)
    assert not any(is_split(layer.mlp) for layer in model.model.layers)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules_before
    assert all(torch.equal(v, state(model)[k]) for k, v in before.items())
    assert torch.equal(logits(model, ids), ref)


def test_cleanup_original_true_drops_the_fused_tensors():
    model, _ = build("qwen3_moe")
    assert dq.convert_model(model, cleanup_original=True)
    block = model.model.layers[0].mlp.experts
    assert block.gate_up_proj.device.type == "meta"  # the shape only: the tensor itself is gone
    assert "gate_up_proj" not in block.fused_shell._parameters


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_cleanup_original_false_keeps_the_fused_tensors_readable(family):
    model, ids = build(family)
    before, ref = state(model), logits(model, ids)
    original = model.model.layers[0].mlp.experts.gate_up_proj
    report = dq.convert_model(model, cleanup_original=False)
    block = model.model.layers[0].mlp.experts
    assert block.gate_up_proj is original
    assert torch.equal(block.gate_up_proj, before["model.layers.0.mlp.experts.gate_up_proj"])  # native layout
    assert not any(k.endswith("gate_up_proj") for k in model.state_dict())  # not saved twice
    _assert_close(family, logits(model, ids), ref)
    gate = block[3].projection("gate").weight
    if family == "qwen3_moe":  # concatenated [E, 2I, H]: per-expert weights are views of the kept tensor
        assert all(r.zero_copy for r in report.converted)
        assert gate.untyped_storage().data_ptr() == original.untyped_storage().data_ptr()
    else:  # transposed, interleaved: copies, so the kept tensor is not relaid out
        assert not any(r.zero_copy for r in report.converted)
        assert torch.equal(gate, original[3][:, 0::2].T)
    dq.fuse_model(model)
    after = state(model)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_defuser_signature_is_accepted():
    model, _ = build("qwen3_moe")
    report = dq.convert_model(model, cleanup_original=True, max_layers=1, filter=["+:layers"])
    assert [r.path for r in report.converted] == ["model.layers.0.mlp.experts"]
    model2, _ = build("qwen3_moe")
    original = model2.model.layers[1].mlp.experts.down_proj
    assert dq.convert_model(model2, False, 2)  # positional, as Defuser orders them
    assert model2.model.layers[1].mlp.experts.down_proj is original
    with pytest.raises(TypeError, match="both"):
        dq.convert_model(build("qwen3_moe")[0], False, cleanup_original=False)
    with pytest.raises(TypeError, match="True or False"):
        dq.convert_model(build("qwen3_moe")[0], cleanup_original="no")
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="positive layer count"):
            dq.convert_model(build("qwen3_moe")[0], max_layers=bad)


def _train_step(model, ids) -> None:
    out = model(ids).logits
    (out.float().pow(2).mean()).backward()


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_gradients_are_carried_into_the_per_expert_parameters(family, caplog):
    """Convert between backward and optimizer step: the step taken on the defused model equals
    the step taken on the fused one."""
    reference, ids = build(family)
    model, _ = build(family)
    reference.train(), model.train()
    _train_step(reference, ids)
    _train_step(model, ids)
    fused_grad = model.model.layers[0].mlp.experts.gate_up_proj.grad.clone()
    with caplog.at_level("WARNING", logger="defuser_quant.core.defuse"):
        dq.convert_model(model)
    warnings = [r for r in caplog.records if "optimizer" in r.getMessage()]
    assert len(warnings) == 1 and "Create the optimizer after convert_model" in warnings[0].getMessage()
    expert = model.model.layers[0].mlp.experts[2]
    if family == "qwen3_moe":
        assert torch.equal(expert.gate_proj.weight.grad, fused_grad[2, :32])
        assert torch.equal(expert.up_proj.weight.grad, fused_grad[2, 32:])
    else:
        assert torch.equal(expert.gate_proj.weight.grad, fused_grad[2][:, 0::2].T)
    for m in (reference, model):
        torch.optim.SGD(m.parameters(), lr=0.5).step()
        m.eval()
    _assert_close(family, logits(model, ids), logits(reference, ids))


def test_no_training_warning_for_an_eval_model_without_gradients(caplog):
    model, _ = build("qwen3_moe")  # eval mode, parameters require grad as from_pretrained leaves them
    with caplog.at_level("WARNING", logger="defuser_quant.core.defuse"):
        dq.convert_model(model)
    assert not [r for r in caplog.records if "optimizer" in r.getMessage()]


def _fresh(family: str, device: str = "cpu"):
    from tiny import FAMILIES

    make_config, cls = FAMILIES[family]
    config = make_config()
    config._experts_implementation = "eager"
    with torch.device(device):
        model = cls(config).eval()
    return model


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_fused_checkpoint_loads_into_a_model_converted_before_loading(family):
    reference, ids = build(family)
    fused_state, ref = reference.state_dict(), logits(reference, ids)
    model = _fresh(family)
    dq.convert_model(model)
    assert not model.load_state_dict(fused_state).missing_keys  # strict: every per-expert key loaded
    _assert_close(family, logits(model, ids), ref)


def test_fused_checkpoint_loads_into_a_meta_model_converted_before_loading():
    reference, _ = build("mixtral")
    fused_state = reference.state_dict()
    model = _fresh("mixtral", "meta")
    dq.convert_model(model)
    model.load_state_dict(fused_state, assign=True)
    assert not [n for n, p in model.named_parameters() if p.is_meta]
    dq.convert_model(reference)
    expected, loaded = reference.state_dict(), model.state_dict()
    assert expected.keys() == loaded.keys()
    assert all(torch.equal(expected[k], loaded[k]) for k in expected)


def test_fused_checkpoint_loads_through_accelerate_into_a_converted_model(tmp_path):
    from accelerate.utils import load_checkpoint_in_model
    from safetensors.torch import save_file

    reference, ids = build("mixtral")
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "model.safetensors"))
    model = _fresh("mixtral")
    dq.convert_model(model)
    load_checkpoint_in_model(model, str(tmp_path / "model.safetensors"))  # fills absent keys with current values
    assert torch.equal(logits(model, ids), logits(reference, ids))


def test_fused_checkpoint_of_another_shape_or_next_to_per_expert_keys_is_refused():
    reference, _ = build("mixtral")
    fused_state = dict(reference.state_dict())
    model = _fresh("mixtral")
    dq.convert_model(model)
    wrong = dict(fused_state, **{"model.layers.0.mlp.experts.down_proj": torch.zeros(8, 64, 16)})
    with pytest.raises(RuntimeError, match=r"size mismatch for model\.layers\.0\.mlp\.experts\.down_proj.*\[8, 64, 16\].*\[8, 64, 32\]"):
        model.load_state_dict(wrong)
    both = dict(fused_state, **{"model.layers.1.mlp.experts.3.w1.weight": torch.zeros(32, 64)})
    with pytest.raises(RuntimeError, match=r"experts\.gate_up_proj and model\.layers\.1\.mlp\.experts\.3\.w1\.weight are both"):
        model.load_state_dict(both)


def test_dense_mlp_gradients_follow_the_split_and_the_join():
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
    )
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    models = []
    for _ in range(2):
        torch.manual_seed(0)
        models.append(Phi3ForCausalLM(config).train())
    reference, model = models
    for m in models:
        m(ids).logits.pow(2).mean().backward()
    fused_grad = model.model.layers[1].mlp.gate_up_proj.weight.grad.clone()
    dq.convert_model(model)
    mlp = model.model.layers[1].mlp
    assert torch.equal(mlp.gate_proj.weight.grad, fused_grad[:64]) and torch.equal(mlp.up_proj.weight.grad, fused_grad[64:])
    dq.fuse_model(model)
    for layer, ref_layer in zip(model.model.layers, reference.model.layers):
        assert torch.equal(layer.mlp.gate_up_proj.weight.grad, ref_layer.mlp.gate_up_proj.weight.grad)
