"""llm-compressor integration: the ``DefuseModifier`` recipe modifier and re-fusing.

Importing this module (it needs ``llmcompressor==0.14.0.1``) calls :func:`register`, which

* registers ``DefuseModifier`` with llm-compressor's ``ModifierFactory``, so recipes (YAML or
  the ``recipe.yaml`` oneshot writes) resolve it by name, and
* makes llm-compressor's MoE linearization build defuser-quant ``DefusedExperts`` (zero copy)
  instead of copying experts into its ``LinearExperts2D`` (see ``integrations.llmcompressor.linearize``),
* wraps ``Oneshot.apply_recipe_modifiers`` so that, only when the recipe lists ``DefuseModifier``,
  our defusion also wins over llm-compressor's own linearizer for the irregular classes it
  registers (llama4; see ``integrations.llmcompressor.recipe_scope``). Other recipes run stock.

``import defuser_quant.integrations`` alone imports nothing from llm-compressor.

Python::

    import defuser_quant.integrations.llmcompressor as dq_llmc
    from llmcompressor import oneshot
    from llmcompressor.modifiers.gptq import GPTQModifier

    oneshot(model=path, dataset=ds, recipe=[
        dq_llmc.DefuseModifier(routing="all", coverage_report="coverage.json"),
        GPTQModifier(targets="Linear", scheme="W4A16", ignore=["lm_head", "re:.*mlp.gate$"]),
    ], output_dir=out)
"""

from __future__ import annotations

import logging

from .compat import (
    LLMCOMPRESSOR_VERSION,
    LlmCompressorUnavailableError,
    check_llmcompressor,
)

check_llmcompressor()

from .linearize import (  # noqa: E402
    adopt_linear_experts,
    install_linearize_hook,
    linearize_hook_installed,
    uninstall_linearize_hook,
)
from .modifier import DefuseModifier, RecipeOrderError  # noqa: E402
from .recipe_scope import install_oneshot_hook, oneshot_hook_installed, uninstall_oneshot_hook  # noqa: E402
from .refuse import REFUSE_MODES, RefuseError, RefuseMode, check_refusable, refuse_checkpoint  # noqa: E402

__all__ = [
    "LLMCOMPRESSOR_VERSION",
    "REFUSE_MODES",
    "DefuseModifier",
    "LlmCompressorUnavailableError",
    "RecipeOrderError",
    "RefuseError",
    "RefuseMode",
    "adopt_linear_experts",
    "check_llmcompressor",
    "check_refusable",
    "install_linearize_hook",
    "install_oneshot_hook",
    "is_registered",
    "linearize_hook_installed",
    "oneshot_hook_installed",
    "refuse_checkpoint",
    "register",
    "uninstall_linearize_hook",
    "uninstall_oneshot_hook",
    "unregister",
]

logger = logging.getLogger(__name__)
MODIFIER_NAME = "DefuseModifier"


def _factory() -> type:
    from llmcompressor.modifiers.factory import ModifierFactory

    return ModifierFactory


def is_registered() -> bool:
    """True when recipes resolve ``DefuseModifier`` and linearization builds ``DefusedExperts``."""
    return (
        _factory()._registered_registry.get(MODIFIER_NAME) is DefuseModifier
        and linearize_hook_installed()
        and oneshot_hook_installed()
    )


def register() -> None:
    """Register ``DefuseModifier`` by name and install the linearization hook (idempotent)."""
    check_llmcompressor()
    _factory().register(MODIFIER_NAME, DefuseModifier)
    install_linearize_hook()
    install_oneshot_hook()
    logger.debug("DefuseModifier registered with llm-compressor")


def unregister() -> None:
    """Undo :func:`register`: recipes no longer resolve ``DefuseModifier``; stock linearization."""
    registered = _factory()._registered_registry
    if registered.get(MODIFIER_NAME) is DefuseModifier:
        del registered[MODIFIER_NAME]
    uninstall_linearize_hook()
    uninstall_oneshot_hook()


register()
