"""Seeded random search over fused-experts layouts.

Each case builds an experts class decorated with Transformers' own ``use_experts_implementation``
(gated or not, concatenated or interleaved gate/up, ``[E, out, in]`` or transposed, with or
without biases), with random E, H, I, dtype, token count and ragged routing (top-k from 1 to E,
skewed to a few experts, some experts never hit). It checks:

* the class's eager forward (the loop Transformers' families use) agrees with Transformers'
  generic ``batched_mm`` forward, so the reference is right;
* ``convert_model`` -> forward equals that fused eager forward;
* ``fuse_model`` gives back the very fused tensors, bit for bit and without a copy (with
  ``cleanup_original=False`` the fused tensors stay readable and unchanged meanwhile; layouts
  that need a relayout then hold per-expert copies, so only those re-fuse by copying).

The first cases enumerate every flag combination; the rest draw them at random.
"""

from __future__ import annotations

import functools
import itertools
import random
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from transformers.activations import ACT2FN
from transformers.integrations.moe import use_experts_implementation

import defuser_quant as dq

FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
TOLERANCE = {"fp32": (1e-5, 1e-5), "bf16": (2e-2, 5e-2), "fp64": (1e-12, 1e-12)}  # (rtol, atol), as tests/test_defuse.py
RANDOM_CASES = 40


@dataclass(frozen=True)
class Case:
    seed: int
    has_gate: bool
    has_bias: bool
    is_transposed: bool
    is_concatenated: bool
    experts: int
    hidden: int
    inter: int
    dtype: str
    tokens: int
    top_k: int
    skew: bool
    keep_original: bool  # convert_model(cleanup_original=False)

    def __str__(self) -> str:
        flags = "".join(n[3] if getattr(self, n) else "-" for n in FLAGS)  # g/b/t/c
        extra = ("-skew" if self.skew else "") + ("-keep" if self.keep_original else "")
        return f"s{self.seed}-{flags}-E{self.experts}H{self.hidden}I{self.inter}-{self.dtype}-T{self.tokens}k{self.top_k}{extra}"


def _draw(seed: int, flags: tuple[bool, ...] | None = None) -> Case:
    rng = random.Random(seed)
    flags = flags or tuple(rng.random() < 0.5 for _ in FLAGS)
    experts = rng.randint(1, 9)
    return Case(
        seed, *flags, experts=experts, hidden=rng.choice([8, 16, 24, 40, 64]), inter=rng.choice([4, 8, 12, 24, 32, 48]),
        dtype=rng.choice(list(DTYPES)), tokens=rng.randint(1, 40), top_k=rng.randint(1, experts), skew=rng.random() < 0.4,
        keep_original=rng.random() < 0.3,
    )


CASES = [_draw(i, combo) for i, combo in enumerate(itertools.product([True, False], repeat=4))]
CASES += [_draw(len(CASES) + i) for i in range(RANDOM_CASES)]


@functools.lru_cache(maxsize=None)
def experts_class(has_gate: bool, has_bias: bool, is_transposed: bool, is_concatenated: bool) -> type[nn.Module]:
    """A fused experts class with the given layout and the eager loop Transformers' families use."""
    in_name = "gate_up_proj" if has_gate else "up_proj"

    class SyntheticExperts(nn.Module):
        def __init__(self, config):
            super().__init__()
            e, h, i = config.num_experts, config.hidden_size, config.intermediate_size
            width = 2 * i if has_gate else i
            self.num_experts = e
            setattr(self, in_name, nn.Parameter(torch.empty((e, h, width) if is_transposed else (e, width, h))))
            self.down_proj = nn.Parameter(torch.empty((e, i, h) if is_transposed else (e, h, i)))
            if has_bias:
                setattr(self, f"{in_name}_bias", nn.Parameter(torch.empty(e, width)))
                self.down_proj_bias = nn.Parameter(torch.empty(e, h))
            self.act_fn = ACT2FN["silu"]

        def _project(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            if is_transposed:  # gpt_oss: x @ W (+ b)
                out = x @ weight
                return out + bias if bias is not None else out
            return F.linear(x, weight, bias)

        def forward(self, hidden_states, top_k_index, top_k_weights):
            final = torch.zeros_like(hidden_states)
            with torch.no_grad():
                mask = F.one_hot(top_k_index, num_classes=self.num_experts).permute(2, 1, 0)
                hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
            for expert in hit:
                expert = expert[0]
                top_k_pos, token_idx = torch.where(mask[expert])
                x = hidden_states[token_idx]
                bias = getattr(self, f"{in_name}_bias")[expert] if has_bias else None
                projected = self._project(x, getattr(self, in_name)[expert], bias)
                h = self._apply_gate(projected) if has_gate else self.act_fn(projected)
                out = self._project(h, self.down_proj[expert], self.down_proj_bias[expert] if has_bias else None)
                out = out * top_k_weights[token_idx, top_k_pos, None]
                final.index_add_(0, token_idx, out.to(final.dtype))
            return final

    if has_gate and not is_concatenated:

        def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:
            return self.act_fn(gate_up[..., 0::2]) * gate_up[..., 1::2]

        SyntheticExperts._apply_gate = _apply_gate
    return use_experts_implementation(
        SyntheticExperts, has_gate=has_gate, has_bias=has_bias, is_transposed=is_transposed, is_concatenated=is_concatenated
    )


def _build(case: Case):
    config = SimpleNamespace(
        num_experts=case.experts, hidden_size=case.hidden, intermediate_size=case.inter, _experts_implementation="eager"
    )
    cls = experts_class(case.has_gate, case.has_bias, case.is_transposed, case.is_concatenated)
    holder = nn.Module()
    holder.experts = cls(config)
    gen = torch.Generator().manual_seed(case.seed)
    dtype = DTYPES[case.dtype]
    with torch.no_grad():
        for p in holder.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    holder.to(dtype)
    x = torch.randn(case.tokens, case.hidden, generator=gen).to(dtype)
    logits = torch.randn(case.tokens, case.experts, generator=gen)
    if case.skew:  # most tokens go to the first experts; the last ones may get none
        logits += torch.linspace(3.0, -3.0, case.experts)
    weights, index = torch.topk(logits.softmax(-1), case.top_k, dim=-1)
    return holder, x, index, weights.to(dtype)


def _run(block, x, index, weights) -> torch.Tensor:
    with torch.no_grad():
        return block(x, index, weights)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_defuse_matches_fused_eager_and_fuse_round_trips(case: Case):
    holder, x, index, weights = _build(case)
    fused = holder.experts
    rtol, atol = TOLERANCE[case.dtype]
    ref = _run(fused, x, index, weights)
    fused.config._experts_implementation = "batched_mm"  # Transformers' own generic forward
    torch.testing.assert_close(_run(fused, x, index, weights), ref, rtol=rtol * 10, atol=atol * 10)
    fused.config._experts_implementation = "eager"
    before = {n: p.detach().clone() for n, p in fused.named_parameters()}
    pointers = {n: p.data_ptr() for n, p in fused.named_parameters()}

    report = dq.convert_model(holder, cleanup_original=not case.keep_original)
    block = holder.experts
    if case.keep_original:  # the fused tensors stay readable and unchanged
        assert all(torch.equal(getattr(block, n), t) for n, t in before.items())
    assert isinstance(block, dq.DefusedExperts) and len(block) == case.experts
    assert report.converted[0].layout == fused_layout(case)
    torch.testing.assert_close(_run(block, x, index, weights), ref, rtol=rtol, atol=atol)

    back = dq.fuse_model(holder)
    # zero copy unless the original was kept while its pieces needed a relayout (then they are copies)
    zero_copy = not (case.keep_original and (case.is_transposed or (case.has_gate and not case.is_concatenated)))
    assert type(holder.experts) is type(fused) and back.converted[0].zero_copy == zero_copy
    after = dict(holder.experts.named_parameters())
    assert after.keys() == before.keys()
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name
        assert not zero_copy or after[name].data_ptr() == pointers[name], f"{name} was copied"
    assert torch.equal(_run(holder.experts, x, index, weights), ref)


def fused_layout(case: Case) -> str:
    """The layout description the report must give (independent of the flags' reader)."""
    kind = "gated/" + ("concat" if case.is_concatenated else "interleaved") if case.has_gate else "ungated"
    kind += "/[E,in,out]" if case.is_transposed else "/[E,out,in]"
    return kind + ("/bias" if case.has_bias else "")


def test_the_search_covers_every_flag_combination_and_ragged_routing():
    assert {tuple(getattr(c, f) for f in FLAGS) for c in CASES} == set(itertools.product([True, False], repeat=4))
    assert {c.dtype for c in CASES} == set(DTYPES)
    assert any(c.top_k == c.experts for c in CASES) and any(c.top_k == 1 for c in CASES)
    assert any(c.keep_original and c.is_transposed for c in CASES) and any(c.keep_original and not c.is_transposed for c in CASES)
    unhit = 0
    for case in CASES:
        _, _, index, _ = _build(case)
        unhit += len(set(range(case.experts)) - set(index.flatten().tolist())) > 0
    assert unhit >= 5  # experts without a single token are part of the search
