"""Held-out perplexity, the job's before/after quality check."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch


@torch.no_grad()
def perplexity(model: Any, batches: Sequence[dict[str, torch.Tensor]], device: str | torch.device | None = None) -> float:
    """Token-level perplexity of ``model`` over ``batches`` (``input_ids``/``attention_mask``)."""
    if device is None:
        device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    for batch in batches:
        ids = batch["input_ids"].to(device)
        mask = batch.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(device)
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        shift_logits, shift_labels = logits[:, :-1], ids[:, 1:]
        shift_mask = mask[:, 1:].bool()
        nll = torch.nn.functional.cross_entropy(
            shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1), reduction="none"
        ).view_as(shift_labels)
        total_nll += float(nll[shift_mask].sum())
        total_tokens += int(shift_mask.sum())
    if total_tokens == 0:
        raise ValueError("no tokens to evaluate perplexity on")
    return math.exp(total_nll / total_tokens)
