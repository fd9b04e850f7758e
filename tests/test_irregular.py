"""Irregular experts families and fused dense MLPs: the details test_families.py does not see.

test_families.py runs every family end to end (forward, every expert, round trip, save/load,
pre-load). Here: names and halves (which half is the gate), the call contracts the adapters
restate as routing (llama4, jetmoe, aria), identity experts, switches and zero copy.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import defuser_quant as dq
from defuser_quant.core.dense import FusedGateUp, is_split
from model_zoo import (
    build_tiny_model,
    discover_fused_dense_mlp_classes,
    skip_unless_longcat_identity_experts_in_block,
    torch_threads,
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


def _mlp_instance(info) -> nn.Module:
    """A small instance of a discovered dense MLP class, built from its family's tiny config."""
    if info.class_name == "EsmFold2SwiGLU":
        return info.cls(32, 48)
    from model_zoo import tiny_config

    cfg = tiny_config(info.model_type)
    if info.class_name == "Zamba2MLP":  # one MLP shared by the hybrid layers, one adapter each
        return info.cls(cfg, num_fwd_mem_blocks=len(cfg.hybrid_layer_ids), block_id=0)
    for candidate in (cfg, cfg.get_text_config(decoder=True), *[getattr(cfg, k) for k in (cfg.sub_configs or {})]):
        for sub in (candidate, *[getattr(candidate, k) for k in (getattr(candidate, "sub_configs", None) or {})]):
            try:
                return info.cls(sub)
            except Exception:  # noqa: BLE001 - try the next sub-config
                continue
    pytest.skip(f"{info.class_name}: no sub-config builds it alone")


DENSE = [i for i in discover_fused_dense_mlp_classes()]


@pytest.mark.parametrize("info", DENSE, ids=lambda i: f"{i.model_type}.{i.class_name}")
def test_dense_mlp_split_is_exact_zero_copy_and_names_the_activated_half_gate(info):
    mlp = _mlp_instance(info).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for p in mlp.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    fused_weight = mlp.gate_up_proj.weight.detach().clone()
    x = torch.randn(2, 5, mlp.gate_up_proj.in_features)
    call = (lambda m: m(x, layer_idx=next(iter(m.layer_dic)))) if hasattr(mlp, "layer_dic") else (lambda m: m(x))
    with torch.no_grad():
        ref = call(mlp)
    storage = mlp.gate_up_proj.weight.untyped_storage().data_ptr()

    report = dq.convert_model(mlp)
    assert [r.kind for r in report.converted] == ["dense_mlp"] and is_split(mlp)
    assert isinstance(mlp.gate_proj, nn.Linear) and isinstance(mlp.up_proj, nn.Linear)
    assert isinstance(mlp.gate_up_proj, FusedGateUp) and "gate_up_proj" not in dict(mlp.named_modules())
    assert mlp.gate_proj.weight.untyped_storage().data_ptr() == storage  # views, no copy
    half = fused_weight.shape[0] // 2
    gate_first = info.class_name != "Phi4MultimodalAudioMLP"  # it activates the second half
    gate_rows, up_rows = (fused_weight[:half], fused_weight[half:]) if gate_first else (fused_weight[half:], fused_weight[:half])
    assert torch.equal(mlp.gate_proj.weight, gate_rows) and torch.equal(mlp.up_proj.weight, up_rows)
    with torch.no_grad():
        assert torch.equal(call(mlp), ref)

    report = dq.fuse_model(mlp)
    assert report.converted[0].zero_copy and not is_split(mlp)
    assert type(mlp.gate_up_proj) is nn.Linear and torch.equal(mlp.gate_up_proj.weight, fused_weight)
    assert "gate_proj" not in mlp._modules and "up_proj" not in mlp._modules


def test_split_dense_switch_and_filter():
    model, inputs = build_tiny_model("phi3")
    assert not dq.convert_model(model, split_dense=False)
    assert not any(is_split(m) for m in model.modules())
    report = dq.convert_model(model, filter=["-:layers\\.1\\."])
    assert [r.path for r in report.converted] == ["model.layers.0.mlp"]
    assert [r.reason for r in report.skipped] == ["excluded by filter"]
    assert is_split(model.model.layers[0].mlp) and not is_split(model.model.layers[1].mlp)


def test_quantized_half_refuses_to_fuse():
    model, _ = build_tiny_model("glm4")
    dq.convert_model(model)
    mlp = model.model.layers[0].mlp
    mlp.up_proj = nn.Sequential(mlp.up_proj)  # stands in for a quantized module
    with pytest.raises(dq.FuseError, match="model.layers.0.mlp.up_proj"):
        dq.fuse_model(model)
    assert is_split(model.model.layers[1].mlp), "nothing may change before the error"


def test_longcat_identity_experts_are_preserved():
    skip_unless_longcat_identity_experts_in_block()
    model, _ = build_tiny_model("longcat_flash")
    fused = model.model.layers[0].mlp.experts
    routed, total = fused.num_routed_experts, fused.total_experts
    assert total > routed
    dq.convert_model(model)
    block = model.model.layers[0].mlp.experts
    assert len(block) == routed and block.total_experts == total
    x = torch.randn(4, block[0].projection("up").in_features)
    index = torch.tensor([[routed, routed + 1]] * 4)  # identity experts only
    weights = torch.rand(4, 2)
    with torch.no_grad():
        assert torch.equal(block(x, index, weights), x * weights[:, :1] + x * weights[:, 1:])


@pytest.mark.parametrize("model_type", ["llama4", "jetmoe", "aria", "dbrx"])
def test_adapters_restate_their_call_contract_as_routing(model_type):
    """forward_override (the calibration hook) sees (hidden, top_k_index, top_k_weights) whatever
    the family's own call looks like, and its result is what the block returns."""
    model, inputs = build_tiny_model(model_type)
    with torch.no_grad():
        ref = model(**inputs).logits
    dq.convert_model(model)
    blocks = [m for m in model.modules() if isinstance(m, dq.DefusedExperts)]
    assert blocks
    seen = []

    def override(block, hidden, index, weights):
        seen.append((hidden.dim(), index.dim(), weights.shape == index.shape, int(index.max()) < len(block)))
        return block.routed_forward(hidden, index, weights)

    for block in blocks:
        block.forward_override = override
    with torch.no_grad():
        out = model(**inputs).logits
    exact = all(b.exact for b in dq.find_fused_blocks(model))
    if exact:
        assert torch.equal(out, ref)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-5)
    assert seen and all(s == (2, 2, True, True) for s in seen), seen


def test_jetmoe_experts_are_single_linears_named_linear():
    model, _ = build_tiny_model("jetmoe")
    dq.convert_model(model)
    keys = [k for k in model.state_dict() if ".input_linear." in k or ".output_linear." in k]
    assert keys and all(k.endswith(".linear.weight") for k in keys), keys[:4]
    block = model.model.layers[0].mlp.input_linear
    assert block[0].projection("up") is block[0].linear and block[0].projection("down") is None


def test_irregular_blocks_are_zero_copy_views():
    for model_type in ("dbrx", "llama4", "aria", "longcat_flash", "jetmoe", "step3p7"):
        model, _ = build_tiny_model(model_type)
        storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
        report = dq.convert_model(model)
        assert report.experts_blocks and all(r.zero_copy or "[E,in,out]" in r.layout or "[E*I" in r.layout
                                               for r in report.experts_blocks), model_type
        for block in (m for m in model.modules() if isinstance(m, dq.DefusedExperts)):
            for expert in block:
                for linear in expert.children():
                    assert linear.weight.untyped_storage().data_ptr() in storages, model_type
