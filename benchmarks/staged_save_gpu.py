"""Shard write time of a GPU-resident compressed MoE checkpoint: safetensors' per-tensor copies vs
``integrations/llmcompressor/staged_save.host_copies`` (chunked copies), same files.

Builds on the GPU the tensors a GPTQ W4A16 (group 128) compressed-tensors checkpoint of
``--layers`` Qwen3-30B-A3B-shape layers holds (per expert projection ``weight_packed`` int32,
``weight_scale`` bf16, ``weight_shape`` int64; attention and norms in bf16; embedding and lm_head
151,936 x 2048 bf16), then times ``safetensors.torch.save_file`` of the whole dict as
transformers calls it, plain and staged, alternately, ``--repeats`` times each, and checks that the
files are byte-identical. Writes JSON with the command.

    python benchmarks/staged_save_gpu.py --output $OUT/staged_save_gpu.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _source import use_source_checkout  # noqa: E402

use_source_checkout()


def checkpoint_tensors(layers: int, device: str) -> dict[str, torch.Tensor]:
    experts, hidden, inter, vocab, heads, kv, head_dim = 128, 2048, 768, 151936, 32, 4, 128
    g = torch.Generator(device=device).manual_seed(0)

    def rand(shape, dtype):
        if dtype.is_floating_point:
            return torch.randn(shape, generator=g, device=device).to(dtype)
        return torch.randint(-(2**30), 2**30, shape, generator=g, device=device, dtype=dtype)

    out = {"model.embed_tokens.weight": rand((vocab, hidden), torch.bfloat16), "lm_head.weight": rand((vocab, hidden), torch.bfloat16),
           "model.norm.weight": rand((hidden,), torch.bfloat16)}
    for layer in range(layers):
        p = f"model.layers.{layer}"
        for name, shape in (("q_proj", (heads * head_dim, hidden)), ("k_proj", (kv * head_dim, hidden)),
                            ("v_proj", (kv * head_dim, hidden)), ("o_proj", (hidden, heads * head_dim))):
            out[f"{p}.self_attn.{name}.weight_packed"] = rand((shape[0], shape[1] // 8), torch.int32)
            out[f"{p}.self_attn.{name}.weight_scale"] = rand((shape[0], shape[1] // 128), torch.bfloat16)
            out[f"{p}.self_attn.{name}.weight_shape"] = torch.tensor(shape, device=device)
        for norm in ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm"):
            out[f"{p}.{norm}.weight"] = rand((head_dim if "q_norm" in norm or "k_norm" in norm else hidden,), torch.bfloat16)
        out[f"{p}.mlp.gate.weight"] = rand((experts, hidden), torch.bfloat16)
        for e in range(experts):
            for name, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter))):
                q = f"{p}.mlp.experts.{e}.{name}"
                out[f"{q}.weight_packed"] = rand((shape[0], shape[1] // 8), torch.int32)
                out[f"{q}.weight_scale"] = rand((shape[0], shape[1] // 128), torch.bfloat16)
                out[f"{q}.weight_shape"] = torch.tensor(shape, device=device)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--output", default=str(Path(__file__).resolve().parent / "results" / "staged_save_gpu.json"))
    args = parser.parse_args()
    from safetensors.torch import save_file

    from defuser_quant.integrations.llmcompressor.staged_save import CHUNK_BYTES, host_copies

    tensors = checkpoint_tensors(args.layers, args.device)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    times: dict[str, list[float]] = {"plain": [], "staged": []}
    digests: dict[str, set[str]] = {"plain": set(), "staged": set()}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for variant in ("plain", "staged"):
                path = Path(tmp) / f"{variant}.safetensors"
                torch.cuda.synchronize() if args.device.startswith("cuda") else None
                t0 = time.perf_counter()
                save_file(host_copies(tensors) if variant == "staged" else tensors, str(path), metadata={"format": "pt"})
                times[variant].append(time.perf_counter() - t0)
                digests[variant].add(hashlib.sha256(path.read_bytes()).hexdigest())
                path.unlink()
    result = {
        "command": "python " + " ".join(sys.argv),
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "tensors": len(tensors),
        "bytes": nbytes,
        "chunk_bytes": CHUNK_BYTES,
        "seconds": times,
        "median_s": {k: round(statistics.median(v), 3) for k, v in times.items()},
        "identical_files": len(digests["plain"] | digests["staged"]) == 1,
    }
    result["speedup"] = round(result["median_s"]["plain"] / result["median_s"]["staged"], 2)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "seconds"}))


if __name__ == "__main__":
    main()
