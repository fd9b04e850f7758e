"""Tiny models of a few families used across the core tests (the zoo covers every family)."""

from __future__ import annotations

import torch
from transformers import (
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

COMMON = dict(
    vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    head_dim=16, num_experts_per_tok=2, max_position_embeddings=64,
)


def qwen3_moe_config(**kw) -> Qwen3MoeConfig:
    return Qwen3MoeConfig(**{**COMMON, "intermediate_size": 64, "moe_intermediate_size": 32, "num_experts": 8, **kw})


def mixtral_config(**kw) -> MixtralConfig:
    return MixtralConfig(**{**COMMON, "intermediate_size": 32, "num_local_experts": 8, **kw})


def gpt_oss_config(**kw) -> GptOssConfig:
    return GptOssConfig(**{**COMMON, "intermediate_size": 32, "num_local_experts": 8, **kw})


FAMILIES = {
    "qwen3_moe": (qwen3_moe_config, Qwen3MoeForCausalLM),
    "mixtral": (mixtral_config, MixtralForCausalLM),
    "gpt_oss": (gpt_oss_config, GptOssForCausalLM),
}
# Families whose per-expert arithmetic equals the fused eager loop bit for bit (same matmul
# orientation); gpt_oss computes x @ W on a transposed, interleaved tensor in the fused loop.
EXACT = {"qwen3_moe", "mixtral"}


def randomize_experts(model: torch.nn.Module, seed: int = 0) -> None:
    """Give 3-D expert tensors (and their biases) visible random values."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 3 or name.endswith("_proj_bias"):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * 0.1)


def build(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, **config_kw):
    """(model, input_ids) for ``family``: eager experts, eval mode, random experts."""
    make_config, cls = FAMILIES[family]
    config = make_config(**config_kw)
    config._experts_implementation = "eager"
    torch.manual_seed(seed)
    model = cls(config).eval()
    randomize_experts(model, seed)
    model = model.to(dtype)
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(seed + 1))
    return model, ids


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}
