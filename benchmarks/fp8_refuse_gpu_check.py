"""Check on CUDA that a re-fused FP8 checkpoint loads into Transformers' ``FP8Experts``.

Builds a small random qwen3_moe whose FP8 block grids are larger than 1x1 (hidden 256,
moe_intermediate 256: gate/up scales ``[2, 2]`` per expert), quantizes it with llm-compressor
``FP8_BLOCK`` behind ``DefuseModifier(refuse="fp8_fused")`` (data-free, runs anywhere), and also
writes the dequantized reference with ``refuse_checkpoint(..., "dequantized")``. Then, on CUDA:

1. loads the fused FP8 checkpoint with stock ``AutoModelForCausalLM.from_pretrained``;
2. checks the experts are ``FP8Experts`` (attention ``FP8Linear``) and that every loaded expert
   tensor equals the file bit for bit;
3. dequantizes the loaded experts (``weight * scale_inv`` per 128x128 block) and compares them with
   the dequantized reference checkpoint (must be equal);
4. runs the FP8 model's forward (``FP8Experts`` eager expert loop, ``FP8Linear`` attention) and
   compares its logits with those of the compressed-tensors
   checkpoint (loaded on the CPU through defuser-quant's pre-load patch, where stock Transformers
   5.17 cannot load FP8 block grids larger than 1x1; same weights, same dynamic per-group FP8
   activation quantization), saved as ``ct_logits.pt`` by the build step, and with the
   dequantized reference (no activation quantization: expect a looser match). Transformers runs
   FP8 matmuls through the hub kernel ``kernels-community/finegrained-fp8`` (``kernels`` package),
   which cannot be fetched offline; then the script puts a plain-torch stand-in for the kernel's
   ``matmul_2d`` entry point in its place (same math: per-token 1x128 dynamic FP8 activation
   groups, 128x128 weight blocks; not its speed) and says so in the summary under ``kernel``.

Without CUDA it stops after writing and checking the files (a smoke run). Steps 1-4 need only
torch, transformers and safetensors, so the checkpoints can be written where llm-compressor is
installed and checked on a GPU machine that lacks it:

    .venv/bin/python benchmarks/fp8_refuse_gpu_check.py [--workdir DIR] [--keep]
    .venv/bin/python benchmarks/fp8_refuse_gpu_check.py --build-only --workdir DIR   # CPU side
    python3 benchmarks/fp8_refuse_gpu_check.py --check-only --workdir DIR            # GPU side

Prints one JSON summary line; exit code 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no hub lookups (and their timeouts) on an offline GPU box
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _source import use_source_checkout  # noqa: E402

use_source_checkout()  # a plain checkout on PYTHONPATH (the GPU machine) maps defuser_quant.integrations here

HIDDEN, MOE_I, EXPERTS, LAYERS, BLOCK = 256, 256, 8, 2, 128


def build(path: Path) -> None:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=512, hidden_size=HIDDEN, intermediate_size=512, moe_intermediate_size=MOE_I,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=EXPERTS,
        num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    Qwen3MoeForCausalLM(config).to(torch.bfloat16).save_pretrained(path)


def quantize(base: Path, out: Path, fused: Path) -> None:
    import defuser_quant.integrations.llmcompressor as dq_llmc
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import QuantizationModifier

    recipe = [
        dq_llmc.DefuseModifier(refuse="fp8_fused", refuse_output_dir=str(fused)),
        QuantizationModifier(targets="Linear", scheme="FP8_BLOCK", ignore=["lm_head", "re:.*mlp.gate$"]),
    ]
    oneshot(model=str(base), recipe=recipe, output_dir=str(out))


def input_ids() -> torch.Tensor:
    return torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(0))


def save_ct_logits(out: Path, target: Path) -> None:
    """Logits of the compressed-tensors checkpoint, per-expert modules built at load (CPU)."""
    from transformers import AutoModelForCausalLM

    from defuser_quant import replace_fused_blocks, restore_fused_blocks

    replace_fused_blocks("qwen3_moe")
    try:
        model = AutoModelForCausalLM.from_pretrained(out).eval()
    finally:
        restore_fused_blocks("qwen3_moe")
    with torch.no_grad():
        torch.save(model(input_ids()).logits.float(), target)


def _compare(got: torch.Tensor, want: torch.Tensor) -> dict:
    cos = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0).item()
    return {"cos": cos, "max_abs_diff": (got - want).abs().max().item(), "ref_max_abs": want.abs().max().item()}


def read(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def block_dequant(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (BLOCK, BLOCK),
                  dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    scale = scale_inv.float().repeat_interleave(block[0], -2)[..., : weight.shape[-2], :]
    scale = scale.repeat_interleave(block[1], -1)[..., : weight.shape[-1]]
    return (weight.float() * scale).to(dtype)


def check_files(fused: Path) -> dict:
    tensors = read(fused)
    config = json.loads((fused / "config.json").read_text())["quantization_config"]
    key = "model.layers.0.mlp.experts"
    shapes = {k: (list(tensors[f"{key}.{k}"].shape), str(tensors[f"{key}.{k}"].dtype)) for k in
              ("gate_up_proj", "gate_up_proj_scale_inv", "down_proj", "down_proj_scale_inv")}
    expected = {
        "gate_up_proj": ([EXPERTS, 2 * MOE_I, HIDDEN], "torch.float8_e4m3fn"),
        "gate_up_proj_scale_inv": ([EXPERTS, 2 * MOE_I // BLOCK, HIDDEN // BLOCK], "torch.float32"),
        "down_proj": ([EXPERTS, HIDDEN, MOE_I], "torch.float8_e4m3fn"),
        "down_proj_scale_inv": ([EXPERTS, HIDDEN // BLOCK, MOE_I // BLOCK], "torch.float32"),
    }
    return {"quantization_config": config, "expert_tensors": shapes, "layout_ok": shapes == expected}


def _emulated_fp8_matmul(input, weight, weight_scale_inv, block_size, output_dtype=None, activation_scale=None):
    """Plain-torch stand-in for the hub kernel's ``matmul_2d``: FP8 activations x FP8 block weights.

    Dynamic activations are quantized per token and per ``block_k`` columns to e4m3 (scale = absmax /
    448), static ones with the given per-tensor scale; weights are dequantized per block.
    """
    fp8 = torch.float8_e4m3fn
    k = input.shape[-1]
    x = input.reshape(-1, k).float()
    if activation_scale is not None:
        scale = activation_scale.float()
        x = (x / scale).clamp(-448, 448).to(fp8).float() * scale
    else:
        group = block_size[1] if block_size is not None else k
        xg = x.view(x.shape[0], -1, group)
        scale = xg.abs().amax(-1, keepdim=True).clamp(min=1e-12) / torch.finfo(fp8).max
        x = ((xg / scale).to(fp8).float() * scale).view_as(x)
    if block_size is None:
        w = weight.float() * weight_scale_inv.float()
    else:
        w = block_dequant(weight, weight_scale_inv, block_size, dtype=torch.float32)
    out = x @ w.T
    return out.to(output_dtype or input.dtype).view(*input.shape[:-1], weight.shape[0])


def _fp8_kernel_source() -> str:
    """Load the hub kernel, or install the torch stand-in where it cannot be fetched; says which."""
    from transformers.integrations import finegrained_fp8

    try:
        finegrained_fp8.load_finegrained_fp8_kernel()
        return "hub kernels-community/finegrained-fp8"
    except Exception as exc:  # ImportError without `kernels`, hub errors offline
        def unsupported(*_args, **_kwargs):
            raise NotImplementedError("the torch stand-in implements matmul_2d only; load with experts_implementation='eager'")

        finegrained_fp8._FINEGRAINED_FP8 = finegrained_fp8.FineGrainedFP8(
            matmul=_emulated_fp8_matmul, batched_matmul=unsupported, grouped_matmul=unsupported)
        return f"torch stand-in for matmul_2d (hub kernel unavailable: {type(exc).__name__})"


def check_cuda(fused: Path, dequantized: Path) -> dict:
    from transformers import AutoModelForCausalLM

    result: dict = {}
    files = read(fused)
    os.environ.setdefault("TRANSFORMERS_DISABLE_DEEPGEMM_LINEAR", "1")  # DeepGEMM is another hub kernel
    result["kernel"] = _fp8_kernel_source()
    model = AutoModelForCausalLM.from_pretrained(fused, device_map="cuda", experts_implementation="eager").eval()
    result["experts_implementation"] = "eager (FP8Experts' per-expert loop)"
    experts = model.model.layers[0].mlp.experts
    result["experts_class"] = type(experts).__name__
    result["q_proj_class"] = type(model.model.layers[0].self_attn.q_proj).__name__
    mismatched = []
    for layer in range(LAYERS):
        block = model.model.layers[layer].mlp.experts
        for name, param in block.named_parameters():
            key = f"model.layers.{layer}.mlp.experts.{name}"
            if key in files:
                a, b = param.detach().cpu(), files[key]
                if a.dtype != b.dtype or not torch.equal(a.view(torch.uint8), b.view(torch.uint8)):
                    mismatched.append(key)
    result["loaded_bit_exact"] = not mismatched
    result["mismatched"] = mismatched[:5]
    reference = AutoModelForCausalLM.from_pretrained(dequantized, dtype=torch.bfloat16).to("cuda").eval()
    deq_equal = True
    for layer in range(LAYERS):
        ours, ref = model.model.layers[layer].mlp.experts, reference.model.layers[layer].mlp.experts
        for name in ("gate_up_proj", "down_proj"):
            got = block_dequant(getattr(ours, name).detach(), getattr(ours, f"{name}_scale_inv").detach())
            deq_equal &= torch.equal(got, getattr(ref, name).detach())
    result["dequantized_experts_equal_reference"] = bool(deq_equal)
    ids = input_ids().cuda()
    try:
        with torch.no_grad():
            got, want = model(ids).logits.float().cpu(), reference(ids).logits.float().cpu()
        result["forward"] = {"vs_dequantized": _compare(got, want)}
        ct_logits = fused.parent / "ct_logits.pt"
        if ct_logits.exists():
            result["forward"]["vs_compressed_tensors"] = _compare(got, torch.load(ct_logits))
            result["forward"]["ok"] = result["forward"]["vs_compressed_tensors"]["cos"] > 0.995
    except Exception as exc:  # report the failure in the summary (ok: false) rather than lose the other checks
        result["forward"] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}", "ok": False}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None, help="where to write the checkpoints (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--build-only", action="store_true", help="write and check the files, skip the CUDA checks")
    mode.add_argument("--check-only", action="store_true", help="CUDA checks on files a --build-only run wrote")
    args = parser.parse_args()
    if args.check_only and args.workdir is None:
        parser.error("--check-only needs --workdir")
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fp8_refuse_"))
    workdir.mkdir(parents=True, exist_ok=True)
    base, out, fused = workdir / "base", workdir / "ct_fp8_block", workdir / "fp8_fused"
    dequantized = workdir / "dequantized"
    summary: dict = {"workdir": str(workdir), "cuda": torch.cuda.is_available()}
    ok = True
    try:
        if not args.check_only:
            import defuser_quant.integrations.llmcompressor as dq_llmc

            build(base)
            quantize(base, out, fused)
            dq_llmc.refuse_checkpoint(out, dequantized, "dequantized")
            save_ct_logits(out, workdir / "ct_logits.pt")
        summary["files"] = check_files(fused)
        ok &= summary["files"]["layout_ok"]
        if torch.cuda.is_available() and not args.build_only:
            summary["device"] = torch.cuda.get_device_name()
            cuda = check_cuda(fused, dequantized)
            summary["cuda_checks"] = cuda
            ok &= cuda["experts_class"] == "FP8Experts" and cuda["loaded_bit_exact"]
            ok &= cuda["dequantized_experts_equal_reference"] and cuda["forward"].get("ok", True)
        else:
            summary["cuda_checks"] = "skipped: " + ("--build-only" if args.build_only else "no CUDA device")
    except Exception as exc:
        summary["error"] = f"{type(exc).__name__}: {exc}"
        summary["traceback"] = traceback.format_exc()[-2000:]
        ok = False
    summary["ok"] = bool(ok)
    print(json.dumps(summary, default=str))
    if not args.keep and args.workdir is None and ok:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
