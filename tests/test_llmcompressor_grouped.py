"""The grouped calibration forward inside llm-compressor 0.14 (compressed-tensors 0.19 wrappers):
real ``oneshot`` runs of the shipped tiny model, per-expert loop vs grouped, same Hessians and the
same checkpoint; and the wrappers' refusals when a forward is not plain."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("llmcompressor")

from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import defuser_quant.integrations.llmcompressor as dq_llmc  # noqa: E402
from defuser_quant import DefusedExperts, convert_model  # noqa: E402
from defuser_quant.assets import TINY_MOE_PATH  # noqa: E402
from defuser_quant.calibration import grouped as grouped_forward  # noqa: E402
from defuser_quant.calibration import routing_mode  # noqa: E402
from defuser_quant.calibration.data import CalibrationDataConfig, build_calibration_samples, to_hf_dataset  # noqa: E402
from defuser_quant.calibration.grouped import recording_grouped_use, why_not_grouped  # noqa: E402
from defuser_quant.integrations.llmcompressor.grouped import compressed_tensors_grouping  # noqa: E402
from defuser_quant.integrations.llmcompressor.hessians import last_batching  # noqa: E402

SAMPLES, SEQ = 8, 32
IGNORE = ["lm_head", "re:.*mlp.gate$"]
PLANS_BUILT: dict[int, list[bool]] = {}


@pytest.fixture(scope="module")
def calibration():
    tokenizer = AutoTokenizer.from_pretrained(TINY_MOE_PATH)
    data = to_hf_dataset(build_calibration_samples(CalibrationDataConfig(num_samples=SAMPLES, seq_len=SEQ), tokenizer))
    return tokenizer, data


def _oneshot(calibration, out, routing: str, grouped: bool, monkeypatch, device: str = "cpu",
             **fields) -> tuple[dict, dq_llmc.DefuseModifier]:
    """One GPTQ W4A16 oneshot; returns every module's Hessian and sample count right before its solve
    (and, in ``PLANS_BUILT[id(modifier)]``, one entry per grouped planning: whether the plan was kept)."""
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    tokenizer, data = calibration
    seen: dict[str, tuple[torch.Tensor, float]] = {}
    original = GPTQModifier.compress_modules

    def snapshot(self):
        for module, hessian in self._hessians.items():
            seen[self._module_names[module]] = (hessian.clone(), float(self._num_samples[module]))
        return original(self)

    monkeypatch.setattr(GPTQModifier, "compress_modules", snapshot)
    built: list[bool] = []
    build = grouped_forward._build_plan

    def counted(*args):
        live, plan, reason = build(*args)
        built.append(plan is not None)
        return live, plan, reason

    monkeypatch.setattr(grouped_forward, "_build_plan", counted)
    model = AutoModelForCausalLM.from_pretrained(TINY_MOE_PATH, dtype=torch.bfloat16).to(device)
    defuse = dq_llmc.DefuseModifier(routing=routing, grouped=grouped, **fields)
    oneshot(
        model=model, processor=tokenizer, dataset=data, output_dir=str(out), num_calibration_samples=SAMPLES,
        max_seq_length=SEQ, shuffle_calibration_samples=False,
        recipe=[defuse, GPTQModifier(targets="Linear", scheme="W4A16", ignore=IGNORE)],
    )
    monkeypatch.setattr(GPTQModifier, "compress_modules", original)
    monkeypatch.setattr(grouped_forward, "_build_plan", build)
    PLANS_BUILT[id(defuse)] = built
    return seen, defuse


@pytest.mark.parametrize("routing", ["routed", "all"])
def test_grouped_under_oneshot_gives_the_loops_hessians_and_checkpoint(calibration, tmp_path, monkeypatch, routing, caplog):
    loop, loop_modifier = _oneshot(calibration, tmp_path / "loop", routing, False, monkeypatch)
    with caplog.at_level("INFO", logger="defuser_quant.integrations.llmcompressor.modifier"):
        grouped, grouped_modifier = _oneshot(calibration, tmp_path / "grouped", routing, True, monkeypatch)
    shared = [r.getMessage() for r in caplog.records if "shared one accumulator" in r.getMessage()]
    assert shared == (["GPTQ Hessians: 4 group(s) of equal gate/up Hessians shared one accumulator each (896 adds to "
                       "an accumulator in place of a Hessian)"] if routing == "all" else []), shared
    assert loop_modifier.grouped_use is None
    use = grouped_modifier.grouped_use
    # every block call grouped: 4 layers x 8 batches, calibration and propagation (+ forced calls for "all")
    assert use.fallbacks == {} and use.grouped == 4 * SAMPLES * (3 if routing == "all" else 2), use
    # GPTQ's Hessian hooks ran batched, but for each expert projection's first call (the hook allocates)
    batching = last_batching()
    calls = sum(int(samples) for name, (_, samples) in loop.items() if ".mlp.experts." in name)
    reached = sum(1 for name, (_, samples) in loop.items() if ".mlp.experts." in name and samples > 0)
    assert (batching.batched, batching.by_hook) == (calls - reached, reached), batching
    # all: each layer's gate/up Hessians share one accumulator, written before GPTQ solves the layer
    assert batching.shared_groups == batching.settles == (4 if routing == "all" else 0), batching
    # the pipelines' offload caches hand back the stored weights: each block planned once, kept
    assert PLANS_BUILT[id(grouped_modifier)] == [True] * 4 and PLANS_BUILT[id(loop_modifier)] == []
    experts = [name for name in loop if ".mlp.experts." in name]
    assert len(experts) == 4 * 16 * 3 and sorted(grouped) == sorted(loop)
    for name, (hessian, samples) in loop.items():
        assert grouped[name][1] == samples, name
        torch.testing.assert_close(grouped[name][0], hessian, rtol=1e-6, atol=1e-6 * hessian.abs().max().item())
    # on the CPU grouped_mm is bit-equal to the per-expert matmuls: the very same checkpoint
    assert sum(torch.equal(grouped[n][0], loop[n][0]) for n in experts) == len(experts)
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("loop", "grouped"))
    assert sorted(a) == sorted(b)
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
    assert grouped_modifier.coverage.totals == loop_modifier.coverage.totals


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
@pytest.mark.parametrize("routing", ["routed", "all"])
def test_grouped_under_oneshot_on_cuda_matches_the_loop_within_bf16_rounding(calibration, tmp_path, monkeypatch, routing):
    """On CUDA grouped_mm and the per-expert matmuls may round differently: the gate/up inputs of
    layer 0 are the same rows (equal Hessians), everything after within bf16 rounding."""
    loop, _ = _oneshot(calibration, tmp_path / "loop", routing, False, monkeypatch, device="cuda")
    grouped, modifier = _oneshot(calibration, tmp_path / "grouped", routing, True, monkeypatch, device="cuda")
    assert modifier.grouped_use.fallbacks == {} and modifier.grouped_use.grouped > 0
    assert sorted(grouped) == sorted(loop)
    for name, (hessian, samples) in loop.items():
        assert grouped[name][1] == samples, name
        error = ((grouped[name][0] - hessian).norm() / hessian.norm()).item()
        assert error < 2e-2, (name, error)
        if name.startswith("model.layers.0.mlp.experts.") and not name.endswith("down_proj"):
            assert error < 1e-5, (name, error)  # the same rows: equal up to the GPU's accumulation order
    ids = torch.arange(48).reshape(1, 48).cuda()
    logits = []
    for folder in ("loop", "grouped"):
        model = AutoModelForCausalLM.from_pretrained(tmp_path / folder, dtype=torch.bfloat16).cuda().eval()
        with torch.no_grad():
            logits.append(model(ids).logits.float())
    cosine = torch.nn.functional.cosine_similarity(logits[0].flatten(), logits[1].flatten(), dim=0).item()
    assert cosine > 0.99, cosine


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")
def test_round_47_opt_ins_on_cuda_change_no_hessian_count_or_tensor(calibration, tmp_path, monkeypatch):
    """On a GPU, ``routing: all`` with the calibration and propagation passes sync-free (counts on the device) and
    the save's stacked packing: the Hessians, sample counts, coverage counts and checkpoint of the run with neither."""
    synced, default = _oneshot(calibration, tmp_path / "default", "all", True, monkeypatch, device="cuda",
                               batched_compress=False)
    free, opted = _oneshot(calibration, tmp_path / "opted", "all", True, monkeypatch, device="cuda",
                           sync_free_calibration=True, sync_free_propagation=True, batched_compress=True)
    assert default.grouped_use.without_sync == 0 and opted.grouped_use.without_sync == 2 * 4 * SAMPLES  # 4 layers
    stacked = opted.compression_batching
    assert stacked["mismatched"] == 0 and stacked["modules"] > 0 and default.compression_batching is None
    assert sorted(free) == sorted(synced)
    for name, (hessian, samples) in synced.items():
        assert free[name][1] == samples and torch.equal(free[name][0], hessian), name
    assert opted.coverage.model_dump() == default.coverage.model_dump()
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("default", "opted"))
    assert sorted(a) == sorted(b) and [k for k in a if not torch.equal(a[k], b[k])] == []


# ----- the wrappers' refusals, on compressed-tensors' real wrappers ------------------------------


def _wrapped_block(scheme: str) -> tuple[torch.nn.Module, DefusedExperts]:
    """The tiny model defused, its experts given compressed-tensors' quantized forward and offload wrapper."""
    from compressed_tensors.offload import set_onload_device
    from compressed_tensors.quantization import QuantizationConfig, apply_quantization_config, preset_name_to_scheme

    model = AutoModelForCausalLM.from_pretrained(TINY_MOE_PATH, dtype=torch.bfloat16)
    convert_model(model)
    config = QuantizationConfig(config_groups={"g": preset_name_to_scheme(scheme, ["Linear"])}, ignore=IGNORE)
    apply_quantization_config(model, config)
    set_onload_device(model, torch.device("cpu"))
    block = next(m for m in model.modules() if isinstance(m, DefusedExperts))
    assert "forward" in block[0].gate_proj.__dict__ and hasattr(block[0].gate_proj, "_original_forward_func")
    return model, block


@pytest.mark.parametrize(
    ("scheme", "why"),
    [("W4A16", "fake-quantizes its weight"), ("W8A8", "quantizes its input activations"), ("FP8_DYNAMIC", "quantizes its input")],
)
def test_wrapped_forward_is_grouped_only_while_quantization_is_disabled(scheme, why):
    from llmcompressor.utils.helpers import DisableQuantization

    model, block = _wrapped_block(scheme)
    x = torch.randn(4, block[0].gate_proj.in_features, dtype=torch.bfloat16)
    assert "expert 0 module has an instance forward (offload_module.<locals>.forward) no registered wrapper" in (
        why_not_grouped(block, x)
    )  # unknown until registered
    with compressed_tensors_grouping():
        assert why in why_not_grouped(block, x)  # quantization on: not plain, the loop runs
        with DisableQuantization(model):
            assert why_not_grouped(block, x) is None
            ids = torch.arange(24).reshape(2, 12)
            with torch.no_grad():
                ref = model(ids).logits
                with recording_grouped_use() as use, routing_mode(model, "all", grouped=True):
                    got = model(ids).logits
            assert use.grouped == 2 * 4 and use.fallbacks == {}  # 4 blocks, routed + forced
            torch.testing.assert_close(got, ref, rtol=0, atol=0)
            assert grouped_forward._PLANS.get(block) is not None  # kept: the next check is the kept plan's
        assert why in why_not_grouped(block, x)  # quantization back on: the kept plan's re-check sees it
    assert "no registered wrapper" in why_not_grouped(block, x)  # unregistered on exit


def test_offload_to_another_device_and_unknown_wrappers_are_refused():
    from llmcompressor.utils.helpers import DisableQuantization

    model, block = _wrapped_block("W4A16")
    x = torch.randn(4, block[0].gate_proj.in_features, dtype=torch.bfloat16)
    with compressed_tensors_grouping(), DisableQuantization(model):
        assert why_not_grouped(block, x) is None
        params = block[3].up_proj._parameters
        params.onload_device = torch.device("meta")
        assert "expert 3 up projection onloads its input from cpu to meta" in why_not_grouped(block, x)
        params.onload_device = torch.device("cpu")
        inner = block[5].down_proj._original_forward_func
        block[5].down_proj._original_forward_func = lambda self, t: inner(self, t) * 2
        assert "expert 5 down projection has an instance forward (" in why_not_grouped(block, x)
        block[5].down_proj._original_forward_func = inner
        assert why_not_grouped(block, x) is None


def test_a_kept_plans_wrapper_chains_are_derived_once_and_their_changes_still_seen(monkeypatch):
    """The kept plan's re-check reuses what it derived from the very same forward objects (no chain derived
    again while nothing changed), and a changed object at either level of the chain is still refused."""
    from llmcompressor.utils.helpers import DisableQuantization

    model, block = _wrapped_block("W4A16")
    x = torch.randn(4, block[0].gate_proj.in_features, dtype=torch.bfloat16)
    derived = []
    level = grouped_forward._chain_level
    monkeypatch.setattr(grouped_forward, "_chain_level", lambda *a: derived.append(1) or level(*a))
    with compressed_tensors_grouping(), DisableQuantization(model):
        assert why_not_grouped(block, x) is None  # planned
        assert why_not_grouped(block, x) is None  # the kept plan's first re-check derives the chains
        first = len(derived)
        assert first > 0
        assert why_not_grouped(block, x) is None
        assert len(derived) == first  # nothing changed: nothing derived again
        down = block[5].down_proj
        inner = down._original_forward_func
        down._original_forward_func = lambda self, t: inner(self, t) * 2  # the offload wrapper's next function
        assert "expert 5 down projection has an instance forward (" in why_not_grouped(block, x)
        down._original_forward_func = inner
        assert why_not_grouped(block, x) is None
        outer = block[7].up_proj.forward
        block[7].up_proj.forward = lambda t: outer(t)  # the first function of the chain
        assert "expert 7 up projection has an instance forward (" in why_not_grouped(block, x)
        block[7].up_proj.forward = outer
        assert why_not_grouped(block, x) is None
        block[2].gate_proj.quantization_enabled = True  # the wrapper's own check still runs on every call
        assert "expert 2 gate projection fake-quantizes its weight" in why_not_grouped(block, x)


def _first_problem(check, modules, x):
    return next(((i, p) for i, p in enumerate(check(m, x) for m in modules) if p), None)


def test_bulk_wrapper_checks_agree_with_the_per_module_ones():
    """What a kept plan asks on every call (the bulk forms) equals asking each module, state by state."""
    from llmcompressor.utils.helpers import DisableQuantization

    from defuser_quant.integrations.llmcompressor import grouped as ct

    model, block = _wrapped_block("W4A16")
    x = torch.randn(4, block[0].gate_proj.in_features, dtype=torch.bfloat16)
    ups = [expert.up_proj for expert in block]
    pairs = [(ct._quantized_why_not_plain_all, ct._quantized_why_not_plain), (ct._offload_why_not_plain_all, ct._offload_why_not_plain)]
    seen = {}

    def agree(state):
        seen[state] = []
        for bulk, single in pairs:
            got, want = bulk(ups, x), _first_problem(single, ups, x)
            assert got == want, state
            seen[state].append(got)

    with compressed_tensors_grouping():
        agree("on")  # quantization on everywhere: expert 0 is the first not plain
        with DisableQuantization(model):
            agree("off")
            ups[5].quantization_enabled = True  # one module switched back on
            agree("one on")
            del ups[5].__dict__["quantization_enabled"]  # not an instance attribute: read as getattr would
            agree("attribute gone")
            ups[5].quantization_enabled = False
            ups[3]._parameters.onload_device = torch.device("meta")
            agree("other device")
            ups[3]._parameters.onload_device = torch.device("cpu")
            inner = ups[6].__dict__.pop("_original_forward_func")
            agree("no original")
            ups[4]._parameters.onload_device = torch.device("meta")  # two problems: the lower index is reported
            agree("no original and other device")
            ups[4]._parameters.onload_device = torch.device("cpu")
            ups[6]._original_forward_func = inner
            agree("restored")
        for bulk, _ in pairs:
            assert bulk([], x) is None  # no modules: nothing to refuse
        assert ct._peek_offload_caches([], "weight") == []
        caches = [m._parameters for m in ups]
        for name in ("weight", "bias"):
            assert ct._peek_offload_caches(caches, name) == [ct._peek_offload_cache(c, name) for c in caches]
        caches[2].onload_device = torch.device("meta")  # one read would copy
        assert ct._peek_offload_caches(caches, "weight")[2] is grouped_forward.MOVED
        assert ct._peek_offload_caches(caches, "weight") == [ct._peek_offload_cache(c, "weight") for c in caches]
        caches[2].onload_device = torch.device("cpu")
    assert seen["on"][0][0] == 0 and seen["off"] == [None, None] == seen["restored"]
    assert seen["one on"][0][0] == 5 and seen["attribute gone"][0][0] == 5  # getattr's default: enabled
    assert seen["other device"] == [None, (3, seen["other device"][1][1])] and "meta" in seen["other device"][1][1]
    assert seen["no original"][1][0] == 6 and seen["no original and other device"][1][0] == 4


def test_offload_cache_reads_are_peeked_without_onloading():
    """The parameter-store peek follows ``OffloadCache.__getitem__``: the stored tensor while a read returns
    it unchanged (same device, onloading disabled, kept onloaded), MOVED when a read would copy."""
    from compressed_tensors.offload import disable_offloading, disable_onloading

    from defuser_quant.integrations.llmcompressor.grouped import _peek_offload_cache

    _, block = _wrapped_block("W4A16")
    with compressed_tensors_grouping():
        cache = block[1].gate_proj._parameters
        stored = cache.offloaded_values["weight"]
        assert _peek_offload_cache(cache, "weight") is stored is cache["weight"]
        assert _peek_offload_cache(cache, "bias") is None
        cache.onload_device = torch.device("meta")  # a read would copy to another device
        assert _peek_offload_cache(cache, "weight") is grouped_forward.MOVED
        assert cache["weight"] is not stored
        with disable_onloading():
            assert _peek_offload_cache(cache, "weight") is stored is cache["weight"]
        with disable_offloading():
            onloaded = cache["weight"]  # kept onloaded until the context ends
            assert onloaded.is_meta and _peek_offload_cache(cache, "weight") is onloaded
        assert _peek_offload_cache(cache, "weight") is grouped_forward.MOVED
        cache.onload_device = torch.device("cpu")


# ----- GPTQ's Hessian hooks, batched per role -----------------------------------------------------


def _gptq_hooked_block(seed: int = 0):
    """A defused tiny block whose expert projections carry GPTQModifier's real (wrapped) Hessian hook."""
    import copy

    from llmcompressor.modifiers.gptq import GPTQModifier

    model = AutoModelForCausalLM.from_pretrained(TINY_MOE_PATH, dtype=torch.float32)
    convert_model(model)
    block = next(m for m in model.modules() if isinstance(m, DefusedExperts))
    blocks = [block, copy.deepcopy(block)]
    modifiers = [GPTQModifier(targets="Linear", scheme="W4A16"), GPTQModifier(targets="Linear", scheme="W4A16")]
    for b, modifier in zip(blocks, modifiers):
        for expert in b:
            for linear in expert.children():
                modifier.register_hook(linear, modifier.calibrate_module, "forward")
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(40, block[0].gate_proj.in_features, generator=gen)
    weights, index = torch.rand(40, len(block), generator=gen).topk(2, dim=1)
    return blocks, modifiers, (x, index, weights)


def _hessians(block, modifier) -> list[tuple[torch.Tensor, float]]:
    return [(modifier._hessians[m].clone(), float(modifier._num_samples[m])) for e in block for m in e.children()
            if m in modifier._num_samples]


def test_batched_gptq_hessians_equal_the_hooks_and_respect_disabled_hooks():
    from llmcompressor.modifiers.utils.hooks import HooksMixin

    from defuser_quant.calibration.grouped import grouped_routed_forward
    from defuser_quant.integrations.llmcompressor.hessians import batched_gptq_hessians

    (grouped, looped), (m_grouped, m_loop), (x, index, weights) = _gptq_hooked_block()
    with torch.no_grad(), batched_gptq_hessians() as recognised:
        assert recognised
        for call in range(3):  # the first call allocates through the hook, the next two run batched
            out = grouped_routed_forward(grouped, x, index, weights)
            ref = looped.routed_forward(x, index, weights)
            assert torch.equal(out, ref)
        with HooksMixin.disable_hooks():  # switched-off hooks: nothing accumulates, in both
            grouped_routed_forward(grouped, x * 3, index, weights)
            looped.routed_forward(x * 3, index, weights)
    batching = last_batching()
    got, want = _hessians(grouped, m_grouped), _hessians(looped, m_loop)
    assert len(got) == len(want) > 0 and batching.by_hook == len(want) and batching.batched == 2 * len(want)
    assert batching.products * 3 == batching.batched * 2  # gate and up share each expert's product; down has its own
    for (h, n), (h_ref, n_ref) in zip(got, want, strict=True):
        assert n == n_ref == 3 and torch.equal(h, h_ref)


def test_batched_gptq_hessians_honour_hooks_kept_enabled():
    """Inside ``disable_hooks(keep=...)`` only the kept hooks accumulate, batched as by the hooks themselves."""
    from llmcompressor.modifiers.utils.hooks import HooksMixin

    from defuser_quant.calibration.grouped import grouped_routed_forward
    from defuser_quant.integrations.llmcompressor.hessians import batched_gptq_hessians

    (grouped, looped), (m_grouped, m_loop), (x, index, weights) = _gptq_hooked_block()
    with torch.no_grad(), batched_gptq_hessians():
        for _ in range(2):  # the first call allocates through the hook, the second runs batched
            grouped_routed_forward(grouped, x, index, weights)
            looped.routed_forward(x, index, weights)
        linears = [m for block in (grouped, looped) for e in block for m in e.children()]
        kept_ids = {key for m in linears[::2] for key in m._forward_hooks}  # a handle's id is its key there
        keep = {handle for modifier in (m_grouped, m_loop) for handle in modifier._hooks if handle.id in kept_ids}
        with HooksMixin.disable_hooks(keep=keep):
            grouped_routed_forward(grouped, x * 3, index, weights)
            looped.routed_forward(x * 3, index, weights)
    got, want = _hessians(grouped, m_grouped), _hessians(looped, m_loop)
    assert len(got) == len(want) > 0 and {n for _, n in want} == {2.0, 3.0}  # kept hooks saw the third batch
    for (h, n), (h_ref, n_ref) in zip(got, want, strict=True):
        assert n == n_ref and torch.equal(h, h_ref)


def test_a_modifier_that_overrides_calibrate_module_is_not_batched():
    from llmcompressor.modifiers.gptq import GPTQModifier

    from defuser_quant.calibration.grouped import grouped_routed_forward
    from defuser_quant.integrations.llmcompressor.hessians import batched_gptq_hessians

    class Doubling(GPTQModifier):
        def calibrate_module(self, module, args, _output):
            super().calibrate_module(module, (args[0] * 2,), _output)

    (grouped, looped), _, (x, index, weights) = _gptq_hooked_block()
    modifiers = [Doubling(targets="Linear", scheme="W4A16"), Doubling(targets="Linear", scheme="W4A16")]
    for block, modifier in zip((grouped, looped), modifiers):
        for expert in block:
            for linear in expert.children():
                linear._forward_hooks.clear()
                modifier.register_hook(linear, modifier.calibrate_module, "forward")
    with torch.no_grad(), batched_gptq_hessians():
        for _ in range(2):
            grouped_routed_forward(grouped, x, index, weights)
            looped.routed_forward(x, index, weights)
    assert last_batching().batched == 0  # the override is called, hook by hook
    got, want = _hessians(grouped, modifiers[0]), _hessians(looped, modifiers[1])
    assert len(got) == len(want) > 0
    for (h, n), (h_ref, n_ref) in zip(got, want, strict=True):
        assert n == n_ref == 2 and torch.equal(h, h_ref)


@pytest.mark.parametrize("budget", [1, 1 << 40])
def test_batched_hessian_adds_are_the_hooks_whatever_the_product_budget(monkeypatch, budget):
    """Products wait for one multi-tensor add per budget's worth: a flush per product or one per input give the hook's Hessians."""
    from defuser_quant.integrations.llmcompressor import hessians

    monkeypatch.setattr(hessians, "PRODUCT_BUDGET", budget)
    test_batched_gptq_hessians_equal_the_hooks_and_respect_disabled_hooks()


def test_batched_hessians_of_some_experts_only_equal_the_hooks():
    """GPTQ hooks on every other expert: the queued spans leave gaps in the rows (no single split of them)."""
    from defuser_quant.calibration.gram import _tiles
    from defuser_quant.calibration.grouped import grouped_routed_forward
    from defuser_quant.integrations.llmcompressor.hessians import batched_gptq_hessians

    (grouped, looped), (m_grouped, m_loop), (x, index, weights) = _gptq_hooked_block()
    for block in (grouped, looped):
        for e, expert in enumerate(block):
            if e % 2:
                for linear in expert.children():
                    linear._forward_hooks.clear()
    with torch.no_grad(), batched_gptq_hessians():
        for _ in range(3):
            assert torch.equal(grouped_routed_forward(grouped, x, index, weights), looped.routed_forward(x, index, weights))
    assert last_batching().batched > 0
    got, want = _hessians(grouped, m_grouped), _hessians(looped, m_loop)
    assert len(got) == len(want) > 0
    for (h, n), (h_ref, n_ref) in zip(got, want, strict=True):
        assert n == n_ref == 3 and torch.equal(h, h_ref)
    assert _tiles([(0, 2), (2, 3)], 5) and not _tiles([(0, 2), (3, 2)], 5) and not _tiles([(0, 2), (2, 3)], 6)
