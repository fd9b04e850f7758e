"""Every experts family in the installed Transformers: defuse, compare, round trip, save/load.

The list comes from discovery (classes decorated with ``@use_experts_implementation``,
undecorated classes holding fused expert weights, dense MLPs with a fused ``gate_up_proj``), not
from a list of names: a family added to Transformers shows up here by itself and must either
pass or be listed in ``KNOWN_EXCEPTIONS`` with a reason.
"""

from __future__ import annotations

import copy

import pytest
import torch

import defuser_quant as dq
from model_zoo import (
    run_main_output,
    KNOWN_UNBUILDABLE,
    build_tiny_model,
    dense_mlp_model_types,
    experts_model_types,
    irregular_model_types,
    torch_threads,
)

DECORATED_TYPES = experts_model_types()
MODEL_TYPES = sorted(set(DECORATED_TYPES) | set(irregular_model_types()) | set(dense_mlp_model_types()))
# model_type -> reason. Families the core does not handle yet; keep empty unless truly needed.
KNOWN_EXCEPTIONS: dict[str, str] = {
    "esmfold2": "a protein folding model: no text forward to build generically; its EsmFold2SwiGLU MLP is "
    "tested module by module in tests/test_irregular.py",
}
# (model_type, checkpoint layout) -> reason, for the pre-load path only; convert_model covers them.
PRELOAD_EXCEPTIONS: dict[tuple[str, str], str] = {
}


def _refused(model_type: str) -> str:
    """Why conversion refuses ``model_type`` (the families table's reason), else ''."""
    from defuser_quant.tools.families_table import supported_families

    return next((r.refused for r in supported_families() if model_type in r.model_types and r.refused), "")


def _assert_refused(model_type: str, model) -> None:
    """A refused family: both paths raise naming what is not modelled, the model is left as it was."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(dq.LayoutError, match="does not model"):
        dq.convert_model(model)
    after = model.state_dict()
    assert not any(b.defused for b in dq.find_fused_blocks(model))
    assert all(torch.equal(before[k], after[k]) for k in before)
    with pytest.raises(dq.UnsupportedModelError, match="does not model"):
        dq.replace_fused_blocks(model.config.model_type)


def _assert_match(out, ref, exact: bool, what: str, tolerance: tuple[float, float] = (1e-6, 1e-5)):
    """Bit-equal when ``exact``, else within ``(rtol, atol)``."""
    if exact:
        assert torch.equal(out, ref), f"{what}: max |diff| {(out - ref).abs().max()}"
    else:
        torch.testing.assert_close(out, ref, rtol=tolerance[0], atol=tolerance[1], msg=what)


def _every_expert_call(defused: dq.DefusedExperts, original: torch.nn.Module, gen: torch.Generator) -> tuple:
    """Arguments for one call of the block that routes rows to every expert (and every identity
    expert), in the block's own call contract."""
    num_experts = len(defused)
    hidden = defused[0].projection("up").in_features
    family = defused.family
    if family == "llama4":  # rows grouped per expert
        return (torch.randn(3 * num_experts, hidden, generator=gen),)
    if family == "jetmoe":  # rows grouped per expert, sizes given
        sizes = [1 + e % 3 for e in range(num_experts)]
        return torch.randn(sum(sizes), hidden, generator=gen), sizes
    states = torch.randn(3 * num_experts, hidden, generator=gen)
    if family == "aria":  # routes from logits itself
        return states, torch.randn(states.shape[0], num_experts, generator=gen)
    total = getattr(original, "total_experts", num_experts)  # longcat_flash identity experts
    index = torch.arange(states.shape[0] * 2).reshape(-1, 2) % total
    return states, index, torch.rand(index.shape, generator=gen)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with torch_threads(1):  # tiny models: threads only add overhead
        yield


def test_every_discovered_family_is_supported_or_explained():
    assert len(DECORATED_TYPES) >= 50, DECORATED_TYPES  # transformers 5.17 has 54 such model types
    assert len(MODEL_TYPES) >= 65, MODEL_TYPES
    unexplained = [t for t in KNOWN_EXCEPTIONS if not KNOWN_EXCEPTIONS[t]]
    assert not unexplained
    assert set(KNOWN_EXCEPTIONS) <= set(MODEL_TYPES), "stale exception entries"
    assert {t for t, _ in PRELOAD_EXCEPTIONS} <= set(MODEL_TYPES), "stale pre-load exception entries"


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, dict):
        return {k: _to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to(v, device) for v in value)
    return value


def _defuse_matches_then_fuses_back(
    model_type: str, model, inputs, kernel_exact: bool = True, tolerance: tuple[float, float] = (1e-6, 1e-5)
):
    """``convert_model`` defuses every fused block; the model output and every expert of every block
    (rows routed to all of them) match the fused model, bit for bit where the block is exact and
    ``kernel_exact`` (the fused side ran the eager loop), else within ``tolerance``; ``fuse_model``
    gives back bit-identical parameters. Returns the conversion report, the fused model's output
    and its state before conversion."""
    fused_blocks = {b.path: b for b in dq.find_fused_blocks(model)}
    assert fused_blocks, f"{model_type}: no fused experts block or fused dense MLP found"
    originals = {p: copy.deepcopy(model.get_submodule(p)) for p, b in fused_blocks.items() if b.kind == "experts"}
    ref = run_main_output(model, inputs)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    report = dq.convert_model(model)
    assert sorted(r.path for r in report.converted) == sorted(fused_blocks)
    assert all(b.defused for b in dq.find_fused_blocks(model))
    exact = kernel_exact and all(b.exact for b in fused_blocks.values())
    _assert_match(run_main_output(model, inputs), ref, exact, f"{model_type} model output", tolerance)

    # Every expert, including rarely routed ones: route rows to all experts block by block.
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(1)
    for path, original in originals.items():
        defused = model.get_submodule(path)
        args = _to(_every_expert_call(defused, original, gen), device)
        with torch.no_grad():
            got, want = defused(*args), original(*args)
        _assert_match(got, want, kernel_exact and fused_blocks[path].exact, f"{model_type} {path}", tolerance)

    dq.fuse_model(model)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before), f"{model_type}: round trip changed parameters"
    return report, ref, before


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_family_defuse_matches_round_trips_and_saves(model_type, tmp_path):
    if model_type in KNOWN_EXCEPTIONS or model_type in KNOWN_UNBUILDABLE:
        pytest.xfail(KNOWN_EXCEPTIONS.get(model_type) or KNOWN_UNBUILDABLE[model_type])
    model, inputs = build_tiny_model(model_type)
    if _refused(model_type):
        return _assert_refused(model_type, model)
    report, ref, before = _defuse_matches_then_fuses_back(model_type, model, inputs)

    dq.convert_model(model)
    if all(r.stock_loads_per_expert for r in report.converted):
        model.save_pretrained(tmp_path)
    else:
        with dq.temporarily_fused(model):
            model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path, experts_implementation="eager", attn_implementation="eager").eval()
    assert not any(b.defused for b in dq.find_fused_blocks(loaded))
    reloaded = loaded.state_dict()
    assert reloaded.keys() == before.keys()
    assert all(torch.equal(before[k], reloaded[k]) for k in before), f"{model_type}: checkpoint content changed"
    # Logits: some families are not bit-deterministic across instances even with equal weights
    # (zaya differs by ~1e-7 after a plain stock save/load), so compare with a tight tolerance.
    torch.testing.assert_close(run_main_output(loaded, inputs), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_family_preload_patch_loads_fused_and_per_expert_checkpoints(model_type, tmp_path):
    if model_type in KNOWN_EXCEPTIONS or model_type in KNOWN_UNBUILDABLE:
        pytest.xfail(KNOWN_EXCEPTIONS.get(model_type) or KNOWN_UNBUILDABLE[model_type])
    model, inputs = build_tiny_model(model_type)
    if _refused(model_type):
        return _assert_refused(model_type, model)
    ref = run_main_output(model, inputs)
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    model.save_pretrained(tmp_path / "stock")  # the family's own checkpoint format
    model.save_pretrained(tmp_path / "fused", save_original_format=False)
    patched_type = model.config.model_type
    assert dq.replace_fused_blocks(patched_type)  # tests/conftest.py restores it after the test
    for layout in ("stock", "fused"):
        if (model_type, layout) in PRELOAD_EXCEPTIONS:
            continue
        loaded = type(model).from_pretrained(
            tmp_path / layout, experts_implementation="eager", attn_implementation="eager"
        ).eval()
        blocks = dq.find_fused_blocks(loaded)
        assert blocks and all(b.defused for b in blocks), f"{model_type}/{layout}: not defused at load"
        # A fresh instance is not always bit-deterministic against the original (zaya, dots1,
        # qwen3_5_moe differ by ~1e-7 after a plain stock reload): weights are compared exactly below.
        torch.testing.assert_close(run_main_output(loaded, inputs), ref, rtol=1e-5, atol=1e-5, msg=f"{model_type}/{layout}")
        dq.fuse_model(loaded)
        refused = loaded.state_dict()
        assert refused.keys() == expected.keys()
        assert all(torch.equal(*_comparable(loaded, k, expected[k], refused[k])) for k in expected), (
            f"{model_type}/{layout}: weights differ"
        )


def _comparable(model, key: str, expected: torch.Tensor, refused: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """longcat_flash keeps ``gate_up_proj`` slabs for its identity experts that nothing reads; a
    block loaded per expert re-fuses them as zeros (one loaded from a fused checkpoint aliases the
    loaded tensor and keeps them). Everything else compares whole."""
    owner = model.get_submodule(key.rpartition(".")[0])
    routed = getattr(owner, "num_routed_experts", None)
    if routed is None or not key.endswith("gate_up_proj") or torch.equal(expected, refused):
        return expected, refused
    assert not refused[routed:].any(), key
    return expected[:routed], refused[:routed]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
@pytest.mark.parametrize("experts_implementation", ["eager", "grouped_mm"])
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_cuda_family_defuse_matches_and_round_trips(model_type, experts_implementation):
    """Every family on CUDA: the defused model against the fused one run with the eager loop and
    with Transformers' grouped_mm kernel (decorated families), then a bit-exact fuse back."""
    if model_type in KNOWN_EXCEPTIONS or model_type in KNOWN_UNBUILDABLE:
        pytest.xfail(KNOWN_EXCEPTIONS.get(model_type) or KNOWN_UNBUILDABLE[model_type])
    if _refused(model_type):
        pytest.skip(f"refused on every device: {_refused(model_type)}")
    if experts_implementation != "eager" and model_type not in DECORATED_TYPES:
        pytest.skip("no experts implementation to choose: the block has a single forward")
    model, inputs = build_tiny_model(model_type, experts_implementation=experts_implementation)
    model, inputs = model.cuda(), _to(inputs, "cuda")
    # grouped_mm: the same math in another kernel and summation order
    _defuse_matches_then_fuses_back(
        model_type, model, inputs, kernel_exact=experts_implementation == "eager", tolerance=(1e-4, 1e-5)
    )
