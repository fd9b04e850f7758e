"""Make llm-compressor's own MoE linearization build defuser-quant's ``DefusedExperts``.

Why this mechanism: ``oneshot`` calls ``linearize_moe(model)`` *before* it parses the recipe
whenever the model still holds fused experts, so a ``DefuseModifier`` named in a YAML recipe
always runs too late to pre-empt it; and ``linearize_moe`` copies every expert into new
``nn.Linear`` modules (a full copy of the expert weights). Both of llm-compressor's MoE paths,
post-load ``linearize_moe`` and the pre-load ``load_quantizable_moe``, ask one table which class
replaces a fused experts class: ``LinearExperts2D.get_registration(cls)`` reads
``LinearExperts2D._registry``, its documented extension point. ``install_linearize_hook``
replaces that table with one that answers, for every fused experts class our core can defuse,
a ``DefusedExperts`` subclass whose

* ``from_experts_module(experts, config)`` runs ``convert_model`` on that block (zero copy: the
  per-expert weights are views of the fused storage), and whose
* constructor builds a defused block from a config (what ``load_quantizable_moe``'s patch
  mapping calls while loading).

So linearization happens once, by our core, whatever the entry point. Classes our core does not
handle keep llm-compressor's own entries; so do the undecorated classes llm-compressor registers a
hand-written class for (llama4's ``Llama4TextExperts``), except inside :func:`defuse_recipe_scope`,
which ``recipe_scope.py`` enters while a ``oneshot`` recipe lists ``DefuseModifier``. ``adopt_linear_experts`` converts blocks that
llm-compressor linearized before the hook was installed.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from defuser_quant.core import DefusedExperts, DefuserQuantError, convert_model
from defuser_quant.core.defused import DefusedExpert, FusedTensorSpec, GateFunction
from defuser_quant.core.families import experts_entry_for
from defuser_quant.core.generated import pickled_through
from defuser_quant.core.layout import fused_tensor, is_fused_experts_class, layout_of
from defuser_quant.core.naming import projection_names
from defuser_quant.core.patching import defused_class_for

from .stock_face import FollowCalibrationFlag, as_stock_linear_experts, linear_experts_face

__all__ = [
    "adopt_linear_experts",
    "defuse_recipe_scope",
    "in_defuse_recipe_scope",
    "install_linearize_hook",
    "linearize_hook_installed",
    "uninstall_linearize_hook",
]

logger = logging.getLogger(__name__)


class _ConfigHolder(nn.Module):
    """A parent for one experts block, so ``convert_model`` can replace it in place."""

    def __init__(self, experts: nn.Module, config: Any):
        super().__init__()
        self.config = config
        self.experts = experts


def _defuse_one(experts: nn.Module, config: Any) -> nn.Module:
    holder = _ConfigHolder(experts, config)
    convert_model(holder)
    return holder.experts


@functools.lru_cache(maxsize=None)
def linear_experts_class_for(fused_cls: type[nn.Module]) -> type[DefusedExperts]:
    """The class our registry answers for ``fused_cls``: config-constructible, with ``from_experts_module``.

    Its blocks are also stock ``LinearExperts2D`` instances and follow llm-compressor's
    all-experts flag (``stock_face``), so stock recipes and ``repack_moe`` work on them.

    ``from_experts_module`` falls back to llm-compressor's own linearization (with a warning)
    when our core cannot defuse the block.
    """

    def from_experts_module(cls: type, experts: nn.Module, config: Any) -> nn.Module:
        try:
            return as_stock_linear_experts(_defuse_one(experts, config))
        except DefuserQuantError as exc:
            stock = _stock_class(type(experts))
            logger.warning(
                "defuser-quant cannot defuse %s (%s); using llm-compressor's %s for it", type(experts).__name__, exc,
                stock.__name__,
            )
            return stock.from_experts_module(experts, config)

    base = defused_class_for(fused_cls)

    def __init__(self: DefusedExperts, config: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, config, *args, **kwargs)
        self.forward_override = FollowCalibrationFlag()

    body = {
        "__init__": __init__,
        "from_experts_module": classmethod(from_experts_module),
        "__module__": __name__,
        **pickled_through(linear_experts_class_for, fused_cls),
    }
    return type(base.__name__, (base, linear_experts_face()), body)


_scope_depth = 0


@contextlib.contextmanager
def defuse_recipe_scope() -> Iterator[None]:
    """Inside: the registry also answers our blocks for the irregular classes llm-compressor registers
    (entered by ``recipe_scope``'s ``oneshot`` wrapper when the recipe lists ``DefuseModifier``)."""
    global _scope_depth
    _scope_depth += 1
    try:
        yield
    finally:
        _scope_depth -= 1


def in_defuse_recipe_scope() -> bool:
    """True inside :func:`defuse_recipe_scope`."""
    return _scope_depth > 0


def _handles(registry: dict, key: object) -> bool:
    if not isinstance(key, type) or issubclass(key, DefusedExperts):
        return False
    if is_fused_experts_class(key):
        return True
    # an undecorated class llm-compressor registers its own linearizer for (llama4): ours only while
    # a oneshot recipe lists DefuseModifier (recipe_scope.py); otherwise stock, stock bugs included
    return in_defuse_recipe_scope() and key in registry and experts_entry_for(key) is not None


class DefuserFirstRegistry(dict):
    """``LinearExperts2D._registry`` that answers defuser-quant classes for fused experts classes
    (and, inside a ``DefuseModifier`` recipe, for the irregular classes llm-compressor registers)."""

    def get(self, key: Any, default: Any = None) -> Any:
        if _handles(self, key):
            return linear_experts_class_for(key)
        return super().get(key, default)


def _stock_class(fused_cls: type[nn.Module]) -> type:
    """llm-compressor's own class for ``fused_cls`` (registered or generic), bypassing our registry."""
    base = _linear_experts_base()
    ours = base.__dict__["_registry"]
    plain = dict(ours)
    base._registry = plain
    try:
        return base.get_linear_experts_cls(fused_cls)
    finally:
        base._registry = ours
        dict.update(ours, plain)  # keep what llm-compressor cached meanwhile


def _linear_experts_base() -> type:
    from llmcompressor.modeling.moe.linear_experts import LinearExperts2D

    return LinearExperts2D


def linearize_hook_installed() -> bool:
    """True when llm-compressor's linearization builds ``DefusedExperts``."""
    return isinstance(_linear_experts_base().__dict__.get("_registry"), DefuserFirstRegistry)


def install_linearize_hook() -> bool:
    """Make llm-compressor's MoE linearization build ``DefusedExperts``; False when already installed."""
    base = _linear_experts_base()
    if linearize_hook_installed():
        return False
    base._registry = DefuserFirstRegistry(base._registry)
    logger.debug("llm-compressor MoE linearization now builds defuser-quant DefusedExperts")
    return True


def uninstall_linearize_hook() -> bool:
    """Restore llm-compressor's own linearization table; False when the hook was not installed."""
    base = _linear_experts_base()
    if not linearize_hook_installed():
        return False
    base._registry = dict(base._registry)
    return True


def _source_of(module: nn.Module) -> tuple[type[nn.Module], Any]:
    fused_cls = getattr(module, "_source_experts_cls", None)
    config = getattr(module, "_source_config", None)
    if fused_cls is None:  # built by load_quantizable_moe: find the fused class it stands for
        registry = _linear_experts_base()._registry
        fused_cls = next((k for k, v in dict.items(registry) if v is type(module)), None)
    irregular = fused_cls is not None and experts_entry_for(fused_cls) is not None  # e.g. Llama4LinearExperts
    if irregular or fused_cls is not None and config is None and not hasattr(module, "config"):
        raise DefuserQuantError(
            f"{type(module).__name__} is llm-compressor's own linearization of {fused_cls.__name__}, which "
            "DefuseModifier cannot adopt (no config recorded, or a call contract of its own). Give oneshot the "
            "model with its experts still fused (load it with from_pretrained, not under load_quantizable_moe, "
            "and do not call linearize_moe): with "
            f"DefuseModifier in the recipe, defuser-quant defuses {fused_cls.__name__} itself"
        )
    if fused_cls is None:
        raise DefuserQuantError(
            f"cannot tell which fused experts class {type(module).__name__} was linearized from; load the model "
            "after `import defuser_quant.integrations.llmcompressor` so llm-compressor builds defuser-quant blocks"
        )
    return fused_cls, config if config is not None else module.config


def _adopt(module: nn.Module, model_type: str | None) -> DefusedExperts:
    """A ``DefusedExperts`` around the ``nn.Linear`` children of one ``LinearExperts2D`` (no copy)."""
    from llmcompressor.modeling.moe.linear_experts import ExpertMLPWithGate, ExpertMLPWithoutGate

    fused_cls, config = _source_of(module)
    shell = object.__new__(fused_cls)  # bypasses a pre-load constructor override
    with torch.device("meta"):
        shell.__init__(config)
    layout = layout_of(shell)
    if layout is None or layout.has_gate and not layout.is_concatenated:
        raise DefuserQuantError(f"{type(module).__name__}: cannot adopt llm-compressor's linearization of this layout")
    specs = {}
    for name in layout.fused_names:
        tensor = fused_tensor(shell, name)
        specs[name] = FusedTensorSpec(name, tuple(tensor.shape), False, False, not isinstance(tensor, nn.Parameter))
        (shell._parameters if name in shell._parameters else shell._buffers).pop(name)
    names = projection_names(getattr(config, "model_type", None) or model_type, layout.has_gate)
    gate_fn = GateFunction(shell, layout)
    experts = []
    for index in range(module.num_experts):
        expert = module[index]
        if not isinstance(expert, (ExpertMLPWithGate, ExpertMLPWithoutGate)):
            raise DefuserQuantError(f"{type(module).__name__}: expert {index} is a {type(expert).__name__}; cannot adopt it")
        projections = {names.up: expert.up_proj, names.down: expert.down_proj}
        if layout.has_gate:
            projections[names.gate] = expert.gate_proj
        experts.append(DefusedExpert(names, projections, gate_fn))
    return DefusedExperts(shell, layout, names, experts, specs)


def adopt_linear_experts(model: nn.Module) -> list[str]:
    """Replace every llm-compressor ``LinearExperts2D`` of ``model`` by a ``DefusedExperts``.

    The per-expert ``nn.Linear`` modules llm-compressor built are reused as they are (no copy).
    Returns the adopted module paths.
    """
    base = _linear_experts_base()
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    adopted = []
    for path, module in list(model.named_modules()):
        if isinstance(module, base) and not isinstance(module, DefusedExperts):  # ours are LinearExperts2D too
            model.set_submodule(path, _adopt(module, model_type))
            adopted.append(path)
    if adopted:
        logger.info("adopted %d block(s) linearized by llm-compressor into DefusedExperts", len(adopted))
    return adopted
