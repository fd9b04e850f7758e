"""The test-support model zoo builds a tiny model for every MoE family Transformers ships."""

from __future__ import annotations

import time

import pytest
import torch
import transformers
from packaging.version import Version

from model_zoo import (
    KNOWN_UNBUILDABLE,
    TINY,
    TINY_CONFIG_OVERRIDES,
    build_tiny_model,
    buildable_model_types,
    discover_experts_classes,
    discover_fused_dense_mlp_classes,
    dense_mlp_model_types,
    discover_irregular_experts_classes,
    experts_model_types,
    irregular_model_types,
    find_fused_experts_modules,
    longcat_identity_experts_in_block,
    tiny_config,
    torch_threads,
)

ALL_TYPES = experts_model_types()
BUILDABLE = buildable_model_types()
TOTAL_BUDGET_S = 60.0
_ELAPSED: dict[str, float] = {}




@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):
        yield


# ------------------------------------------------------------------------------------ discovery


def test_discovers_decorated_experts_classes_with_layout_facts():
    infos = discover_experts_classes()
    assert len(infos) >= 50, [i.class_name for i in infos]
    assert len(ALL_TYPES) >= 45
    for info in infos:
        assert set(info.layout) == {"has_gate", "has_bias", "is_transposed", "is_concatenated"}
        assert all(isinstance(v, bool) for v in info.layout.values()), info
        assert info.cls.__module__ == f"transformers.models.{info.module_name}.modeling_{info.module_name}"
        assert info.param_names, info  # fused nn.Parameters created in __init__
    # every non-default layout the decorator supports is represented by some family
    assert any(not i.has_gate for i in infos)
    assert any(i.has_bias for i in infos)
    assert any(i.is_transposed for i in infos)
    assert any(not i.is_concatenated for i in infos)


def test_discovers_irregular_experts_and_fused_dense_mlps():
    decorated = {(i.module_name, i.class_name) for i in discover_experts_classes()}
    irregular = discover_irregular_experts_classes()
    dense = discover_fused_dense_mlp_classes()
    # 7 in Transformers 5.17; 5.24 decorated aria's class, 5.25 longcat_flash's and step3p7's
    assert len(irregular) >= (5 if longcat_identity_experts_in_block() else 4)
    # every family with an active explicit entry is among them (the entries cover undecorated classes only)
    from defuser_quant.core.families import EXPERTS_ENTRIES, entry_active

    assert {e.module for e in EXPERTS_ENTRIES if entry_active(e)} <= {i.module_name for i in irregular}
    assert len(dense) >= 8
    for info in irregular:
        assert info.kind == "irregular" and info.param_names
        assert (info.module_name, info.class_name) not in decorated
        assert info.has_gate is None  # no decorator facts: needs an explicit layout entry
    for info in dense:
        assert info.kind == "dense_mlp" and info.param_names == ("gate_up_proj", "down_proj")


def test_every_family_is_buildable_or_known_unbuildable():
    for model_type in ALL_TYPES:
        assert model_type in BUILDABLE or KNOWN_UNBUILDABLE.get(model_type, "").strip(), model_type
    assert set(KNOWN_UNBUILDABLE) <= set(ALL_TYPES), "stale KNOWN_UNBUILDABLE entries"
    for model_type, fields in TINY_CONFIG_OVERRIDES.items():
        assert fields.get("_reason", "").strip(), f"override for {model_type} has no reason"
        if "_needs" in fields and Version(transformers.__version__) < Version(fields["_needs"]):
            continue  # a family of a newer Transformers than this one
        assert model_type in ALL_TYPES + irregular_model_types() + dense_mlp_model_types(), f"stale override for {model_type}"


# ---------------------------------------------------------------------------------------- build


@pytest.mark.parametrize("model_type", BUILDABLE)
def test_tiny_model_builds_and_runs(model_type):
    start = time.perf_counter()
    model, inputs = build_tiny_model(model_type)
    experts = find_fused_experts_modules(model)
    calls, hit = [], set()

    def record(module, args, kwargs, name):
        calls.append(name)
        top_k_index = kwargs.get("top_k_index", args[1] if len(args) > 1 else None)
        if isinstance(top_k_index, torch.Tensor) and not top_k_index.is_floating_point():
            hit.update((name, e) for e in top_k_index.flatten().tolist())

    hooks = [
        m.register_forward_pre_hook(lambda mod, a, k, name=n: record(mod, a, k, name), with_kwargs=True)
        for n, m in experts
    ]
    try:
        with torch.no_grad():
            out = model(**inputs)
    finally:
        for h in hooks:
            h.remove()
    _ELAPSED[model_type] = time.perf_counter() - start

    assert not model.training
    assert inputs["input_ids"].shape == (TINY["batch"], TINY["seq"])
    result = out.logits if getattr(out, "logits", None) is not None else out[0]
    assert torch.isfinite(result).all()

    # fused experts are present, 3-D, randomly initialized (not all-zero, not identical) and the
    # forward routed tokens through them
    assert experts, f"{model_type}: no fused experts module"
    params3d = [p for _, m in experts for p in m.parameters(recurse=False) if p.dim() == 3]
    assert params3d, f"{model_type}: no 3-D expert parameters"
    for p in params3d:
        assert p.dtype == torch.float32
        assert p.abs().sum() > 0
        assert p.shape[0] == 1 or not torch.equal(p[0], p[1])
    assert calls, f"{model_type}: forward never called the experts"
    if hit:  # routing is not degenerate: 32 tokens x top-2 reach most experts of some layer
        per_module = {n: sum(1 for m, _ in hit if m == n) for n in calls}
        assert max(per_module.values()) >= TINY["experts"] // 2, per_module

    # tiny and eager
    assert sum(p.numel() for p in model.parameters()) < 2_000_000
    assert model.config._experts_implementation == "eager"


def test_build_is_seeded():
    model_type = BUILDABLE[0]
    a, inputs_a = build_tiny_model(model_type, seed=0)
    b, inputs_b = build_tiny_model(model_type, seed=0)
    c, _ = build_tiny_model(model_type, seed=1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(inputs_a["input_ids"], inputs_b["input_ids"])
    name, experts = find_fused_experts_modules(a)[0]
    pname = next(n for n, p in experts.named_parameters(recurse=False) if p.dim() == 3)
    assert not torch.equal(sa[f"{name}.{pname}"], sc[f"{name}.{pname}"])


def test_tiny_config_has_tiny_moe_shape():
    cfg = tiny_config("qwen3_moe") if "qwen3_moe" in BUILDABLE else tiny_config(BUILDABLE[0])
    text = cfg.get_text_config(decoder=True)
    assert text.hidden_size == TINY["hidden"]
    assert text.num_hidden_layers == TINY["layers"]
    assert str(cfg.dtype).endswith("float32")
    assert cfg._attn_implementation == "eager"


def test_all_families_build_and_run_within_budget():
    """Runs last in this module: the parametrized test above recorded each family's time."""
    missing = [t for t in BUILDABLE if t not in _ELAPSED]
    if missing:
        pytest.skip(f"only {len(_ELAPSED)} of {len(BUILDABLE)} families ran in this session")
    total = sum(_ELAPSED.values())
    slowest = sorted(_ELAPSED.items(), key=lambda kv: -kv[1])[:5]
    print(f"\n{len(_ELAPSED)} families built+ran in {total:.1f} s; slowest: {slowest}")
    assert total < TOTAL_BUDGET_S, slowest
