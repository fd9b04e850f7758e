"""While a ``oneshot`` recipe lists ``DefuseModifier``, our defusion wins over llm-compressor's own
linearizers for the irregular experts classes it registers (llama4's ``Llama4TextExperts``).

Why: ``Oneshot.apply_recipe_modifiers`` linearizes every MoE block (``linearize_moe``) *before* it
initializes the recipe, so ``DefuseModifier.on_initialize`` comes too late to claim a block. For
classes decorated with ``@use_experts_implementation`` the registry hook (``linearize.py``) already
answers our blocks; for an undecorated class llm-compressor registers its own hand-written class
(``Llama4LinearExperts``), which in 0.14 fails on a text-only model (it reads
``config.text_config``) and which ``DefuseModifier`` cannot adopt (it records neither the fused
class nor the config). :func:`install_oneshot_hook` wraps ``Oneshot.apply_recipe_modifiers``: when
the recipe holds a ``DefuseModifier`` it runs the original inside :func:`defuse_recipe_scope`, where
the registry hook answers our blocks for those classes too (exact, zero copy). Any other recipe
runs the original unchanged: stock behaviour, stock errors included.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .linearize import defuse_recipe_scope, in_defuse_recipe_scope

__all__ = [
    "defuse_recipe_scope",
    "in_defuse_recipe_scope",
    "install_oneshot_hook",
    "oneshot_hook_installed",
    "recipe_has_defuse_modifier",
    "uninstall_oneshot_hook",
]

logger = logging.getLogger(__name__)


def _leaves(value: Any) -> Iterator[Any]:
    if isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def recipe_has_defuse_modifier(recipe: Any, stage: str | None = None) -> bool:
    """True when ``recipe`` (whatever ``oneshot`` accepts: modifiers, a ``Recipe``, YAML text or a
    path) lists a ``DefuseModifier`` (in ``stage`` when given, for YAML).

    Modifier objects are looked at directly; YAML is parsed only when its text names
    ``DefuseModifier``, so a stock recipe is never touched. A recipe that does not parse answers
    False: the stock path parses it again and reports its own error.
    """
    from llmcompressor.recipe import Recipe

    from .modifier import DefuseModifier

    if not recipe:
        return False
    if isinstance(recipe, Recipe):
        return any(isinstance(m, DefuseModifier) for m in recipe.modifiers)
    if not isinstance(recipe, str):
        return any(isinstance(m, DefuseModifier) for m in _leaves(recipe))
    try:
        text = Path(recipe).read_text(encoding="utf-8") if Path(recipe).is_file() else recipe
    except (OSError, ValueError):  # a YAML string too long or odd for a file name
        text = recipe
    if "DefuseModifier" not in text:
        return False
    try:
        parsed = Recipe.create_instance(path_or_modifiers=recipe, target_stage=stage)
    except Exception:  # noqa: BLE001 - the stock path reports it
        logger.debug("recipe did not parse; oneshot runs as stock", exc_info=True)
        return False
    return any(isinstance(m, DefuseModifier) for m in parsed.modifiers)


def _oneshot_class() -> type:
    from llmcompressor.entrypoints.oneshot import Oneshot

    return Oneshot


_WRAPPED = "__defuser_quant_wrapped__"


def oneshot_hook_installed() -> bool:
    """True when ``Oneshot.apply_recipe_modifiers`` is our wrapper."""
    return hasattr(_oneshot_class().__dict__["apply_recipe_modifiers"], _WRAPPED)


def install_oneshot_hook() -> bool:
    """Wrap ``Oneshot.apply_recipe_modifiers`` (see the module docstring); False when already done."""
    oneshot_cls = _oneshot_class()
    if oneshot_hook_installed():
        return False
    original = oneshot_cls.__dict__["apply_recipe_modifiers"]

    @functools.wraps(original)
    def apply_recipe_modifiers(self: Any, calibration_dataloader: Any, recipe_stage: str | None = None) -> Any:
        if not recipe_has_defuse_modifier(getattr(self, "recipe", None), recipe_stage):
            return original(self, calibration_dataloader, recipe_stage=recipe_stage)
        with defuse_recipe_scope():
            return original(self, calibration_dataloader, recipe_stage=recipe_stage)

    setattr(apply_recipe_modifiers, _WRAPPED, original)
    oneshot_cls.apply_recipe_modifiers = apply_recipe_modifiers
    return True


def uninstall_oneshot_hook() -> bool:
    """Put llm-compressor's own ``Oneshot.apply_recipe_modifiers`` back; False when not installed."""
    oneshot_cls = _oneshot_class()
    if not oneshot_hook_installed():
        return False
    oneshot_cls.apply_recipe_modifiers = getattr(oneshot_cls.__dict__["apply_recipe_modifiers"], _WRAPPED)
    return True
