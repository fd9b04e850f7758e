"""Fine-grained FP8 (``quant_method: fp8``) checkpoints: experts defused into per-expert ``FP8Linear``
views of Transformers' ``FP8Experts``, forward equal to ``FP8Experts``' own, refusals, and the
explicit dequantize path.

On the CPU, FP8 matmuls run through a plain-torch stand-in for Transformers' hub kernel
(``fp8_checkpoints.torch_fp8_kernels``), and a device with FP8 kernels is simulated for the
``load`` tests (``torch.cuda.is_available``/``get_device_capability`` patched) so Transformers builds
its ``FP8Experts`` exactly as on a GPU. The ``cuda`` tests at the end run on a real GPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, FineGrainedFP8Config, Qwen3MoeConfig

import defuser_quant as dq
from defuser_quant.assets import TINY_MOE_PATH
from defuser_quant.core.discovery import find_fused_blocks
from defuser_quant.core.errors import FuseError
from defuser_quant.loading import LoadError
from defuser_quant.loading.fp8 import DefusedFP8Experts, defuse_fp8_experts, is_fp8_experts
from defuser_quant.loading.load import expert_projections, is_quantized_module
from fp8_checkpoints import dequantize_blocks, quantize_blocks, torch_fp8_kernels, write_fused_fp8

IDS = torch.arange(1, 33).unsqueeze(0)
BLOCK = (32, 32)  # small blocks: the tiny model's grids are 4x4 per expert projection, not 1x1


def _u8(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8) if t.element_size() == 1 else t


def _nbytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


# ----- one FP8Experts block, built on the CPU with real FP8 data --------------------------------


def _config(**kw) -> Qwen3MoeConfig:
    # top-3 routing: three outputs per token, so float32 vs bfloat16 accumulation shows
    base = dict(hidden_size=64, moe_intermediate_size=64, num_experts=4, num_experts_per_tok=3, hidden_act="silu")
    config = Qwen3MoeConfig(**{**base, **kw})
    config._experts_implementation = "eager"
    return config


def fp8_experts(config=None, block=BLOCK, has_gate=True, scheme="dynamic", scale_fmt="float", seed=0, fp4=False) -> nn.Module:
    """A Transformers ``FP8Experts`` (decorated the way its FP8 loader does) holding quantized random weights."""
    import inspect

    from transformers.integrations.finegrained_fp8 import ALL_FP8_EXPERTS_FUNCTIONS, FP8Experts
    from transformers.integrations.moe import use_experts_implementation

    config = config or _config()
    extra = {}
    if fp4:  # Transformers 5.17 reads config.expert_dtype, later ones take it from the quantization config
        if "expert_dtype" in inspect.signature(FP8Experts.__init__).parameters:
            extra["expert_dtype"] = "fp4"
        else:
            config.expert_dtype = "fp4"
    cls = use_experts_implementation(experts_class=FP8Experts, experts_interface=ALL_FP8_EXPERTS_FUNCTIONS, has_gate=has_gate)
    module = cls(config=config, block_size=block, activation_scheme=scheme, scale_fmt=scale_fmt, has_gate=has_gate, **extra)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("gate_up_proj" if has_gate else "up_proj", "down_proj"):
            weight = getattr(module, name)
            if weight.dtype != torch.float8_e4m3fn or block is None:
                continue  # FP4 or per-tensor experts: only refused, never run
            q, scale = quantize_blocks(torch.randn(weight.shape, generator=gen) * 0.2, block, pow2=scale_fmt == "ue8m0")
            weight.data = q
            getattr(module, f"{name}_scale_inv").data = scale.to(getattr(module, f"{name}_scale_inv").dtype)
        if scheme == "static":
            for name in ("gate_up_proj_activation_scale", "down_proj_activation_scale"):
                getattr(module, name).data = torch.rand(config.num_experts, generator=gen) * 0.01 + 0.001
    return module


class Holder(nn.Module):
    def __init__(self, *blocks: nn.Module):
        super().__init__()
        self.layers = nn.ModuleList(nn.Module() for _ in blocks)
        for layer, block in zip(self.layers, blocks):
            layer.experts = block


def _routing(config, tokens=24, seed=1):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, config.hidden_size, generator=gen).to(torch.bfloat16)
    index = torch.stack([torch.randperm(config.num_experts, generator=gen)[: config.num_experts_per_tok] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, config.num_experts_per_tok, generator=gen), -1)
    return hidden, index, weights


def test_defused_fp8_experts_are_views_of_the_fused_tensors():
    block = fp8_experts()
    fused = {n: p.detach() for n, p in block.named_parameters()}
    model = Holder(block)
    assert defuse_fp8_experts(model) == ["layers.0.experts"]
    defused = model.layers[0].experts
    assert isinstance(defused, DefusedFP8Experts) and len(defused) == 4
    inter, rows = 64, 64 // BLOCK[0]
    for e, expert in enumerate(defused):
        pieces = {
            "gate_proj": (fused["gate_up_proj"][e, :inter], fused["gate_up_proj_scale_inv"][e, :rows]),
            "up_proj": (fused["gate_up_proj"][e, inter:], fused["gate_up_proj_scale_inv"][e, rows:]),
            "down_proj": (fused["down_proj"][e], fused["down_proj_scale_inv"][e]),
        }
        for name, (weight, scale) in pieces.items():
            linear = getattr(expert, name)
            assert type(linear).__name__ == "FP8Linear" and linear.weight.dtype == torch.float8_e4m3fn
            assert linear.block_size == BLOCK
            assert torch.equal(_u8(linear.weight), _u8(weight)) and torch.equal(linear.weight_scale_inv, scale)
            # zero copy: the very bytes of the fused tensors
            assert linear.weight.data_ptr() == weight.data_ptr() and linear.weight_scale_inv.data_ptr() == scale.data_ptr()
            assert torch.equal(dequantize_blocks(linear.weight, linear.weight_scale_inv), dequantize_blocks(weight, scale))
        # per-expert dequantized == the fused tensor dequantized, then sliced
        full = dequantize_blocks(fused["gate_up_proj"], fused["gate_up_proj_scale_inv"])[e]
        gate_up = torch.cat([dequantize_blocks(expert.gate_proj.weight, expert.gate_proj.weight_scale_inv),
                             dequantize_blocks(expert.up_proj.weight, expert.up_proj.weight_scale_inv)])
        assert torch.equal(gate_up, full)
    assert not dict(block.named_parameters(recurse=False))  # the shell gave its tensors to the views
    assert all(is_quantized_module(m) for m in expert_projections(model).values())
    assert [b.defused for b in find_fused_blocks(model, dense=False)] == [True]


@pytest.mark.parametrize("variant", ["silu", "ungated", "swiglu_oai", "limit", "static", "ue8m0", "gelu"])
def test_defused_forward_equals_fp8experts_forward(variant):
    config = _config(
        **({"swiglu_alpha": 1.702, "swiglu_limit": 0.05} if variant == "swiglu_oai" else {}),
        **({"swiglu_limit": 0.05} if variant == "limit" else {}),
        **({"hidden_act": "gelu"} if variant in ("gelu", "ungated") else {}),
    )
    block = fp8_experts(config, has_gate=variant != "ungated", scheme="static" if variant == "static" else "dynamic",
                        scale_fmt="ue8m0" if variant == "ue8m0" else "float")
    hidden, index, weights = _routing(config)
    index[0, 0] = config.num_experts  # an expert-parallel sentinel: skipped by both
    with torch_fp8_kernels():
        want = block(hidden, index, weights)
        model = Holder(block)
        defuse_fp8_experts(model)
        got = model.layers[0].experts(hidden, index, weights)
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, want)
    if variant == "static":
        scales = [e.gate_proj.activation_scale for e in model.layers[0].experts]
        assert all(s.dim() == 0 for s in scales) and scales[1].data_ptr() == scales[0].data_ptr() + 4


def test_ue8m0_scales_stay_ue8m0_views():
    block = fp8_experts(scale_fmt="ue8m0")
    scale = block.gate_up_proj_scale_inv.detach()
    assert scale.dtype == torch.float8_e8m0fnu
    model = Holder(block)
    defuse_fp8_experts(model)
    gate = model.layers[0].experts[2].gate_proj
    assert gate.weight_scale_inv.dtype == torch.float8_e8m0fnu and gate.weight_scale_inv.data_ptr() == scale[2].data_ptr()


def _with_extra(name):
    def edit(block):
        block.register_parameter(name, nn.Parameter(torch.zeros(4, 128), requires_grad=False))
    return edit


@pytest.mark.parametrize("make, edit, message", [
    (lambda: fp8_experts(_config(moe_intermediate_size=48)), None,
     "intermediate size 48 is not a multiple of the block size 32, so a scale block spans gate and up"),
    (lambda: fp8_experts(block=None), None, "per tensor"),
    (lambda: fp8_experts(fp4=True), None, "gate_up_proj is torch.int8, not float8_e4m3fn"),
    (fp8_experts, _with_extra("gate_up_proj_bias"), "expert biases"),
    (fp8_experts, _with_extra("router_bias"), r"holds \['router_bias'\]"),
    (fp8_experts, lambda b: b.add_module("norm", nn.LayerNorm(4)), "child module 'norm'"),
    (fp8_experts, lambda b: setattr(b, "is_concatenated", False), "transposed or interleaved"),
    (fp8_experts, lambda b: setattr(b.down_proj_scale_inv, "data", b.down_proj_scale_inv.data.bfloat16()),
     "scales are torch.float32 and torch.bfloat16"),
])
def test_unmodelled_fp8_variants_are_refused_and_nothing_changes(make, edit, message):
    good, bad = fp8_experts(), make() if make is not fp8_experts else fp8_experts(seed=3)
    if edit is not None:
        edit(bad)
    model = Holder(good, bad)
    with pytest.raises(LoadError, match=message) as info:
        defuse_fp8_experts(model)
    assert "layers.1.experts" in str(info.value) and "FineGrainedFP8Config(dequantize=True)" in str(info.value)
    # all or nothing: the good block (validated first) was not converted either
    assert is_fp8_experts(model.layers[0].experts) and "gate_up_proj" in dict(model.layers[0].experts.named_parameters())


def test_fp8_defused_blocks_are_not_refused_silently_by_fuse_model():
    model = Holder(fp8_experts())
    defuse_fp8_experts(model)
    defused = model.layers[0].experts
    with pytest.raises(FuseError, match=r"layers\.0\.experts\.0\.gate_proj is a FP8Linear, not nn\.Linear"):
        dq.fuse_model(model)
    assert model.layers[0].experts is defused  # left as it was


# ----- defuser_quant.load ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp8_fused(tmp_path_factory) -> Path:
    return write_fused_fp8(Path(TINY_MOE_PATH), tmp_path_factory.mktemp("fp8") / "fused", block=BLOCK)


@pytest.fixture(scope="module")
def fp8_per_expert(tmp_path_factory) -> Path:
    return write_fused_fp8(Path(TINY_MOE_PATH), tmp_path_factory.mktemp("fp8") / "per_expert", block=BLOCK, per_expert=True)


@pytest.fixture
def fp8_device(monkeypatch):
    """Transformers sees a device with FP8 kernels (compute capability 9.0) and keeps FP8 weights."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))


def test_fused_fp8_checkpoint_has_the_layout_transformers_loads(fp8_fused):
    from safetensors import safe_open

    with safe_open(str(fp8_fused / "model.safetensors"), "pt") as f:
        assert f.get_slice("model.layers.0.mlp.experts.gate_up_proj").get_dtype() == "F8_E4M3"
        assert f.get_slice("model.layers.0.mlp.experts.gate_up_proj_scale_inv").get_shape() == [16, 8, 4]
    assert json.loads((fp8_fused / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
def test_load_keeps_experts_fp8_and_equals_stock_fp8experts(layout, fp8_fused, fp8_per_expert, fp8_device):
    path = fp8_fused if layout == "fused" else fp8_per_expert
    stock = AutoModelForCausalLM.from_pretrained(fp8_fused)  # FP8Experts, as on a GPU
    assert is_fp8_experts(stock.model.layers[0].mlp.experts)
    model = dq.load(path)
    projections = expert_projections(model)
    assert len(projections) == 4 * 16 * 3
    assert all(type(m).__name__ == "FP8Linear" and m.weight.dtype == torch.float8_e4m3fn for m in projections.values())
    assert isinstance(model.model.layers[0].mlp.experts, DefusedFP8Experts)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "FP8Linear"
    assert _nbytes(model) == _nbytes(stock)  # the same bytes: views, nothing dequantized or copied
    assert _nbytes(model) < 0.75 * _nbytes(AutoModelForCausalLM.from_pretrained(TINY_MOE_PATH))
    with torch_fp8_kernels():
        ours = _logits(model)
        for impl in ("grouped_mm", "eager"):  # Transformers' default FP8 experts forward, then its eager loop
            stock.set_experts_implementation(impl)
            assert torch.equal(ours, _logits(stock)), impl
        reference = _logits(AutoModelForCausalLM.from_pretrained(TINY_MOE_PATH))
    assert torch.nn.functional.cosine_similarity(ours.flatten(), reference.flatten(), dim=0) > 0.99  # still the model


def test_saving_a_loaded_model_writes_per_expert_fp8_that_loads_back(fp8_fused, fp8_device, tmp_path):
    from safetensors import safe_open

    model = dq.load(fp8_fused)
    model.save_pretrained(tmp_path / "resaved")
    with safe_open(str(tmp_path / "resaved" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_slice("model.layers.0.mlp.experts.3.up_proj.weight").get_dtype() == "F8_E4M3"
    assert "model.layers.0.mlp.experts.3.up_proj.weight_scale_inv" in keys
    assert not any(k.endswith("experts.gate_up_proj") for k in keys)  # the per-expert FP8 layout (DeepSeek/Qwen releases')
    again = dq.load(tmp_path / "resaved")
    mine, theirs = model.state_dict(), again.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(_u8(mine[k]), _u8(theirs[k])) for k in mine)
    with torch_fp8_kernels():
        assert torch.equal(_logits(again), _logits(model))


def test_without_fp8_kernels_load_refuses_with_one_line(fp8_fused):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(LoadError) as info:
        dq.load(fp8_fused)
    message = str(info.value)
    assert "\n" not in message
    assert "no CUDA or XPU device" in message and "FineGrainedFP8Config(dequantize=True)" in message


def test_an_old_gpu_is_refused_too(fp8_fused, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    with pytest.raises(LoadError, match=r"compute capability 8\.0, below the 8\.9"):
        dq.load(fp8_fused)


def test_a_patched_family_is_refused(fp8_fused, fp8_device):
    dq.replace_fused_blocks("qwen3_moe")
    with pytest.raises(LoadError, match="call restore_fused_blocks"):
        dq.load(fp8_fused)


def test_a_missing_scale_is_refused(fp8_fused, fp8_device, tmp_path):
    from quantized_checkpoints import broken_copy

    broken = broken_copy(fp8_fused, tmp_path / "b", lambda t: t.pop("model.layers.2.mlp.experts.down_proj_scale_inv"))
    with pytest.raises(LoadError, match=r"1 missing keys: model\.layers\.2\.mlp\.experts\.down_proj_scale_inv"):
        dq.load(broken)


def _stock_dequantized(path: Path, **kw):
    """Stock Transformers' dequantizing load (what it does by itself on a CPU), on any machine."""
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=FineGrainedFP8Config(dequantize=True), **kw)


def _stock_with_scales_applied(path: Path) -> nn.Module:
    """Stock Transformers' dequantizing load, with the fused expert scales it leaves unused applied by hand."""
    from safetensors.torch import load_file

    stock, info = _stock_dequantized(path, output_loading_info=True)
    assert any(k.endswith("experts.gate_up_proj_scale_inv") for k in info["unexpected_keys"])  # what load fixes
    tensors = load_file(str(path / "model.safetensors"))
    with torch.no_grad():
        for name, param in stock.named_parameters():
            if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                param.copy_(dequantize_blocks(tensors[name], tensors[f"{name}_scale_inv"], param.dtype))
    return stock


def test_dequantize_on_request_loads_float_experts_defused(fp8_fused, fp8_per_expert):
    from safetensors.torch import load_file

    config = FineGrainedFP8Config(dequantize=True)
    model = dq.load(fp8_fused, quantization_config=config)
    projections = expert_projections(model)
    assert len(projections) == 192 and all(type(m) is nn.Linear and m.weight.dtype == torch.bfloat16 for m in projections.values())
    tensors = load_file(str(fp8_fused / "model.safetensors"))
    expert = model.model.layers[1].mlp.experts[5]
    key = "model.layers.1.mlp.experts"
    gate_up = dequantize_blocks(tensors[f"{key}.gate_up_proj"], tensors[f"{key}.gate_up_proj_scale_inv"], torch.bfloat16)[5]
    assert torch.equal(torch.cat([expert.gate_proj.weight, expert.up_proj.weight]), gate_up)
    down = dequantize_blocks(tensors[f"{key}.down_proj"], tensors[f"{key}.down_proj_scale_inv"], torch.bfloat16)[5]
    assert torch.equal(expert.down_proj.weight, down)
    ours = _logits(model)
    # the same as Transformers' own dequantization of the per-expert layout (its Fp8Dequantize runs there)
    assert torch.equal(ours, _logits(dq.load(fp8_per_expert, quantization_config=config)))
    assert torch.equal(ours, _logits(_stock_with_scales_applied(fp8_fused)))
    # stock Transformers alone loads the fused FP8 experts without their scales: far off
    stock = _stock_dequantized(fp8_fused)
    assert (_logits(stock) - ours).abs().max() > 1


def test_scales_are_never_applied_twice(fp8_fused):
    """A Transformers that dequantized the fused experts itself (values no longer the raw FP8 ones)
    while still reporting the scales unexpected is refused, not scaled a second time."""
    from defuser_quant.loading.fp8 import _apply_fused_scales

    stock, info = _stock_dequantized(fp8_fused, output_loading_info=True)
    unexpected = set(info["unexpected_keys"])
    assert "model.layers.0.mlp.experts.gate_up_proj_scale_inv" in unexpected
    already = _stock_with_scales_applied(fp8_fused)
    with pytest.raises(LoadError, match=r"experts\.(gate_up|down)_proj did not load as its raw FP8 values"):
        _apply_fused_scales(already, fp8_fused, unexpected)
    assert len(_apply_fused_scales(stock, fp8_fused, unexpected)) == 8  # 4 layers x (gate_up, down)


# ----- CUDA: the real thing (skipped without a GPU) ---------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (run on the device machine)")


@pytest.fixture(scope="module")
def fp8_block128(tmp_path_factory) -> Path:
    """A random qwen3_moe (hidden 256, moe_intermediate 256: 4x2 and 2x2 scale grids per expert) in
    fused FP8 with 128x128 blocks, the block DeepGEMM and the Triton kernels are tuned for."""
    from transformers import Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=256, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=8, num_experts_per_tok=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    tmp = tmp_path_factory.mktemp("fp8_cuda")
    Qwen3MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(tmp / "float")
    return write_fused_fp8(tmp / "float", tmp / "fp8", block=(128, 128))


def _fp8_kernels():
    import contextlib

    from fp8_checkpoints import hub_fp8_kernel_available

    return contextlib.nullcontext("hub kernel") if hub_fp8_kernel_available() else torch_fp8_kernels()


@cuda
def test_cuda_load_keeps_experts_fp8_and_matches_stock(fp8_block128, record_property):
    stock = AutoModelForCausalLM.from_pretrained(fp8_block128, device_map="cuda")
    assert is_fp8_experts(stock.model.layers[0].mlp.experts)
    model = dq.load(fp8_block128, device_map="cuda")
    projections = expert_projections(model)
    assert len(projections) == 2 * 8 * 3
    assert all(type(m).__name__ == "FP8Linear" and m.weight.dtype == torch.float8_e4m3fn and m.weight.is_cuda
               for m in projections.values())
    assert _nbytes(model) == _nbytes(stock)  # parameter memory: the same bytes, nothing dequantized or copied
    ids = IDS.cuda()
    diffs = {}
    with _fp8_kernels() as kernel, torch.no_grad():
        ours = model(input_ids=ids).logits.float()
        for impl in ("grouped_mm", "eager"):
            stock.set_experts_implementation(impl)
            diffs[impl] = (ours - stock(input_ids=ids).logits.float()).abs().max().item()
    scale = ours.abs().max().item()
    record_property("fp8_kernel", "hub" if kernel == "hub kernel" else "torch stand-in")
    record_property("max_abs_logit_diff_vs_stock", diffs)
    print(f"\nFP8 load vs stock FP8Experts on {torch.cuda.get_device_name()}: max abs logit diff {diffs}, "
          f"max |logit| {scale:.3f}, parameter bytes {_nbytes(model)}")
    assert all(d <= 0.02 * scale for d in diffs.values()), diffs


@cuda
def test_cuda_dequantize_on_request_equals_the_cpu_result(fp8_block128):
    config = FineGrainedFP8Config(dequantize=True)
    on_gpu = dq.load(fp8_block128, device_map="cuda", quantization_config=config)
    on_cpu = dq.load(fp8_block128, quantization_config=config)
    gpu_weights = {k: v.cpu() for k, v in on_gpu.state_dict().items()}
    cpu_weights = on_cpu.state_dict()
    assert gpu_weights.keys() == cpu_weights.keys()
    assert all(torch.equal(gpu_weights[k], cpu_weights[k]) for k in cpu_weights)
    assert all(type(m) is nn.Linear and m.weight.is_cuda for m in expert_projections(on_gpu).values())
