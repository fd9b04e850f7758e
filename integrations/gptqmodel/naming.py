"""Per-expert projection names as a GPTQModel model definition expects them.

Our core names defused projections after the family's original checkpoints (mixtral:
``w1/w3/w2``), GPTQModel's definitions list ``gate_proj|w1`` with the *first* alias as the
runtime module name, and its AWQ scaling and MoE lifecycle code look for "gate"/"up"/"down" in
module names. So inside GPTQModel the experts are renamed to the definition's runtime names;
the weights are untouched and checkpoints keep the names stock GPTQModel + Defuser write.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from typing import Any

from torch import nn

from defuser_quant.core.defused import DefusedExperts
from defuser_quant.core.naming import ProjectionNames

logger = logging.getLogger(__name__)

EXPERT_KEY = "#"
ROLE_KEYWORDS = {"gate": ("gate", "w1"), "up": ("up", "w3"), "down": ("down", "w2")}


def parse_token(token: str) -> tuple[list[str], list[str]]:
    """``"gate_proj|w1:0:in=x"`` -> (``["gate_proj", "w1"]``, ``["0", "in=x"]``)."""
    name, *flags = token.split(":")
    return [a for a in name.split("|") if a], [f for f in flags if f]


def _walk(node: Any, in_experts: bool = False) -> Iterator[tuple[bool, str]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, in_experts or key == EXPERT_KEY)
    elif isinstance(node, (list, tuple)):
        for item in node:
            yield from _walk(item, in_experts)
    elif isinstance(node, str):
        yield in_experts, node


def expert_leaf_aliases(module_tree: Sequence[Any] | None) -> list[list[str]]:
    """Alias lists of every leaf listed under an expert-index (``"#"``) key of a module tree."""
    if not module_tree:
        return []
    variants = module_tree if all(isinstance(v, (list, tuple)) for v in module_tree) else [module_tree]
    leaves = []
    for variant in variants:
        for item in variant:
            if isinstance(item, dict):
                leaves += [parse_token(tok)[0] for in_experts, tok in _walk(item) if in_experts]
    return [a for a in leaves if a]


def target_names(current: ProjectionNames, aliases: list[list[str]]) -> ProjectionNames | None:
    """The runtime names ``aliases`` assign to ``current``'s roles, or None when they do not cover them."""
    targets = {}
    for role in ("gate", "up", "down"):
        name = getattr(current, role)
        if name is None:
            targets[role] = None
            continue
        match = next((a[0] for a in aliases if name in a), None)
        if match is None:
            keywords = ROLE_KEYWORDS[role]
            match = next((a[0] for a in aliases if any(k in a[0] for k in keywords)), None)
        if match is None:
            return None
        targets[role] = match
    return ProjectionNames(**targets)


def align_projection_names(model: nn.Module, module_tree: Sequence[Any] | None) -> int:
    """Rename the projections of every ``DefusedExperts`` block to ``module_tree``'s runtime names.

    Returns the number of blocks renamed. Blocks whose roles the tree does not name are left
    alone (the definition check reports them).
    """
    aliases = expert_leaf_aliases(module_tree)
    if not aliases:
        return 0
    renamed = 0
    for path, block in model.named_modules():
        if not isinstance(block, DefusedExperts):
            continue
        names = target_names(block.names, aliases)
        if names is None or names == block.names:
            continue
        logger.debug("%s: experts renamed %s -> %s", path, block.names.as_tuple(), names.as_tuple())
        block.rename_projections(names)
        renamed += 1
    if renamed:
        logger.info("renamed expert projections of %d block(s) to the GPTQModel definition's names", renamed)
    return renamed
