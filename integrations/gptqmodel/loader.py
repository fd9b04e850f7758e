"""What GPTQModel's loader calls instead of the ``defuser`` package.

``gptqmodel.models.loader`` calls ``defuser.replace_fused_blocks(model_type)`` right after
reading the config and ``_convert_model_with_defuser(cls, model, cleanup_original)`` once the
model (or its meta-device shell) exists, looking both names up at call time. The plugin rebinds
them to :class:`DefuserQuantShim`; nothing in the ``defuser`` package or Transformers' classes
is modified.

* pre-load: our ``replace_fused_blocks`` builds per-expert ``nn.Linear`` directly (no fused
  round trip), and the patch is lifted again as soon as the model is built;
* post-load: ``convert_model`` (a no-op for blocks already built defused), then the expert
  projections are renamed to what the model definition expects (``integrations.gptqmodel.naming``), and the
  definition is checked to cover every expert projection, so none is silently left in float.

Model types our core does not handle (no fused experts, or irregular families) are handed to
Defuser unchanged when ``delegate_unsupported`` is on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from defuser_quant.core import convert_model, replace_fused_blocks, restore_fused_blocks
from defuser_quant.core.defused import DefusedExperts
from defuser_quant.core.errors import DefuserQuantError, UnsupportedModelError

from .naming import align_projection_names, parse_token

logger = logging.getLogger(__name__)


class DefinitionMismatchError(DefuserQuantError):
    """A GPTQModel model definition does not list the defused expert projections."""


@dataclass
class DefuserQuantShim:
    """Stands in for the ``defuser`` module inside ``gptqmodel.models.loader``.

    Attributes:
        defuser: the real ``defuser`` module (for delegated model types), or None.
        delegate_unsupported: hand model types our core cannot defuse to ``defuser``.
        strict: raise ``DefinitionMismatchError`` when a definition misses expert projections.
    """

    defuser: Any = None
    delegate_unsupported: bool = True
    strict: bool = True
    patched: set[str] = field(default_factory=set)
    delegated: set[str] = field(default_factory=set)
    calls: list[tuple[str, str]] = field(default_factory=list)

    # -- the two functions gptqmodel.models.loader calls as ``defuser.<name>`` -----------------
    def replace_fused_blocks(self, model_type: str) -> bool:
        """Pre-load patch for ``model_type``; lifted again by ``convert_model`` once the model is built."""
        self.calls.append(("replace_fused_blocks", model_type))
        try:
            patched = replace_fused_blocks(model_type)
        except UnsupportedModelError as exc:
            return self._delegate_replace(model_type, exc)
        if patched:
            self.patched.add(model_type)
        return patched

    def convert_model(self, model: nn.Module, cleanup_original: bool = False, **kwargs: Any) -> bool:
        """Defuse ``model`` in place (``cleanup_original`` is accepted and ignored: we keep no originals)."""
        return self.convert_for_definition(None, model)

    # -- what the plugin installs as ``loader._convert_model_with_defuser`` ----------------------
    def convert_with_definition(self, cls: type, model: nn.Module, cleanup_original: bool = False) -> bool:
        """``_convert_model_with_defuser`` replacement: same contract, our core underneath."""
        converted = self.convert_for_definition(cls, model)
        for module_path in getattr(cls, "defuser_module_paths", None) or ():
            try:
                module = model.get_submodule(module_path)
            except AttributeError:
                logger.warning("GPTQModel definition %s: defuser module path %r not found", cls.__name__, module_path)
                continue
            converted = self.convert_for_definition(cls, module) or converted
        after_conversion = getattr(cls, "after_defuser_conversion", None)
        if callable(after_conversion):
            after_conversion(model)
        return converted

    def convert_for_definition(self, cls: type | None, model: nn.Module) -> bool:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        self._lift_preload_patches()
        self.calls.append(("convert_model", str(model_type)))
        if model_type in self.delegated and self.defuser is not None:
            return bool(self.defuser.convert_model(model, cleanup_original=False))
        report = convert_model(model)
        blocks = [m for m in model.modules() if isinstance(m, DefusedExperts)]
        if cls is not None and blocks:
            align_projection_names(model, getattr(cls, "module_tree", None))
            check_definition(cls, model, strict=self.strict)
        for block in blocks:
            attach_apply_gate(block)
        return bool(report) or bool(blocks)

    # -- helpers --------------------------------------------------------------------------------
    def _delegate_replace(self, model_type: str, exc: Exception) -> bool:
        if self.delegate_unsupported and self.defuser is not None:
            logger.info("%s: not handled by defuser-quant (%s); delegating to Defuser", model_type, exc)
            self.delegated.add(model_type)
            return bool(self.defuser.replace_fused_blocks(model_type))
        logger.debug("%s: nothing to patch before load (%s)", model_type, exc)
        return False

    def _lift_preload_patches(self) -> None:
        for model_type in sorted(self.patched):
            restore_fused_blocks(model_type)
        self.patched.clear()

    def restore(self) -> None:
        """Lift every pre-load patch this shim still holds."""
        self._lift_preload_patches()


class _ApplyGate:
    """``experts._apply_gate(cat(gate, up))`` as GPTQModel's MoE lifecycle (routing bypass) calls it."""

    def __init__(self, block: DefusedExperts):
        self.gate_fn = block[0].gate_fn if len(block) else None

    def __call__(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return self.gate_fn(gate, up)


def attach_apply_gate(block: DefusedExperts) -> None:
    """Give ``block`` the family's exact activation under the name GPTQModel's bypass looks for.

    Without it, ``ExpertsRoutingBypass`` falls back to SiLU for every family.
    """
    if block.layout.has_gate and len(block) and "_apply_gate" not in block.__dict__:
        block.__dict__["_apply_gate"] = _ApplyGate(block)


def _strip(name: str) -> str:
    return parse_token(name)[0][0] if parse_token(name)[0] else name


def covered_module_names(cls: type, config: Any) -> set[str]:
    """Every layer-relative module name ``cls``'s module tree makes GPTQModel quantize."""
    blocks = cls.simple_layer_modules(config, None)
    return {_strip(name) for block in blocks for name in block}


def uncovered_projections(cls: type, model: nn.Module) -> list[str]:
    """Expert projections of ``model`` that ``cls``'s module tree does not list (full paths)."""
    config = getattr(model, "config", None)
    layer_roots = list(cls.extract_layers_node())
    try:
        covered = covered_module_names(cls, config)
    except Exception as exc:  # a definition that cannot expand for this config
        logger.debug("cannot expand %s for this config: %s", cls.__name__, exc)
        covered = set()
    missing = []
    for path, block in model.named_modules():
        if not isinstance(block, DefusedExperts):
            continue
        relative = None
        for root in layer_roots:
            prefix = f"{root}."
            if path.startswith(prefix):
                relative = path[len(prefix):].split(".", 1)[1] if "." in path[len(prefix):] else ""
                break
        for index, expert in enumerate(block):
            for name in expert.names.as_tuple():
                if relative is None or f"{relative}.{index}.{name}" not in covered:
                    missing.append(f"{path}.{index}.{name}")
    return missing


def check_definition(cls: type, model: nn.Module, *, strict: bool = True) -> list[str]:
    """Check ``cls`` lists every defused expert projection; raise (strict) or warn otherwise."""
    missing = uncovered_projections(cls, model)
    if missing:
        model_type = getattr(getattr(model, "config", None), "model_type", "?")
        message = (
            f"GPTQModel's definition {cls.__name__} for {model_type!r} does not list {len(missing)} defused expert "
            f"projection(s) (e.g. {missing[:3]}); GPTQModel would leave them in float. Register a definition "
            f"derived from the defused structure with defuser_quant.integrations.gptqmodel."
            f"register_generated_definition({model_type!r}, config, replace=True) before GPTQModel.load"
        )
        if strict:
            raise DefinitionMismatchError(message)
        logger.warning(message)
    return missing
