"""A self-contained demonstration: defuse a tiny MoE, check the math, round-trip it."""

from __future__ import annotations

import logging
import tempfile
import time

import torch

logger = logging.getLogger(__name__)


def _tiny_model():
    from transformers import AutoModelForCausalLM

    from ..assets import TINY_MOE_PATH

    if (TINY_MOE_PATH / "config.json").exists():
        model = AutoModelForCausalLM.from_pretrained(TINY_MOE_PATH, experts_implementation="eager", dtype=torch.float32)
        return model.eval(), f"shipped tiny model ({TINY_MOE_PATH.name})"
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    config = Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=2, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
    )
    config._experts_implementation = "eager"
    torch.manual_seed(0)
    return Qwen3MoeForCausalLM(config).eval(), "random tiny qwen3_moe"


def run_demo(console=None) -> dict:
    """Defuse, compare with the fused model, re-fuse, save and reload; returns the facts."""
    from rich.console import Console
    from rich.table import Table
    from transformers import AutoModelForCausalLM

    from ..core import convert_model, fuse_model

    console = console or Console()
    model, origin = _tiny_model()
    ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        fused_logits = model(ids).logits
    before = {k: v.clone() for k, v in model.state_dict().items()}
    t0 = time.perf_counter()
    report = convert_model(model)
    seconds = time.perf_counter() - t0
    with torch.no_grad():
        defused_logits = model(ids).logits
    table = Table(title=f"defuser-quant demo: {origin}")
    for col in ("block", "fused class", "layout", "experts", "zero copy"):
        table.add_column(col)
    for r in report.converted:
        table.add_row(r.path, r.class_name, r.layout, str(r.num_experts), "yes" if r.zero_copy else "no")
    console.print(table)
    linears = sum(1 for n, _ in model.named_modules() if ".experts." in n and n.rsplit(".", 1)[-1].endswith("proj"))
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp, experts_implementation="eager", dtype=torch.float32).eval()
        with torch.no_grad():
            reloaded_logits = reloaded(ids).logits
    fuse_model(model)
    after = model.state_dict()
    facts = {
        "blocks": len(report.converted),
        "expert_linears": linears,
        "defuse_seconds": seconds,
        "logits_identical": bool(torch.equal(defused_logits, fused_logits)),
        "max_abs_diff": float((defused_logits - fused_logits).abs().max()),
        "round_trip_identical": all(torch.equal(before[k], after[k]) for k in before),
        "saved_reloaded_identical": bool(torch.equal(reloaded_logits, fused_logits)),
    }
    console.print(
        f"defused {facts['blocks']} blocks into {facts['expert_linears']} per-expert nn.Linear in "
        f"{1000 * seconds:.1f} ms; defused logits identical to fused: {facts['logits_identical']} "
        f"(max |diff| {facts['max_abs_diff']:.2e}); re-fuse bit-identical: {facts['round_trip_identical']}; "
        f"save_pretrained -> stock from_pretrained identical: {facts['saved_reloaded_identical']}"
    )
    return facts
