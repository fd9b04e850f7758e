"""Pre-load patching: build per-expert Linear modules directly while ``from_pretrained`` loads.

``replace_fused_blocks(model_type)`` registers, through Transformers' own hooks,

* a constructor override on each fused experts class of the family, so that building it from
  a config builds ``DefusedExperts`` instead (see ``_install_constructor`` for why this is not
  ``register_patch_mapping``), and
* a checkpoint conversion mapping (``register_checkpoint_conversion_mapping``) from which the
  family's per-expert -> fused merges are removed, so per-expert checkpoints load straight into
  the per-expert Linears (no 2D->3D->2D round trip, no doubled RAM), plus converters that split
  fused checkpoint tensors (``experts.gate_up_proj``) into per-expert weights.
"""

from __future__ import annotations

import functools
import importlib
import logging
from typing import Any

import torch
from torch import nn

from .defuse import STANDARD, adapter_for_class, build_defused
from .defused import DefusedExperts
from .errors import UnmodelledStructureError, UnsupportedModelError
from .dense import split_dense_mlp
from .families import adapter_of, dense_entry_for, experts_entry_for, shared_expert_list
from . import load_check
from .generated import pickled_through
from .naming import stock_loads_per_expert
from .layout import ExpertLayout, declared_flags_of_class, is_fused_experts_class, unmodelled_class_structure
from .tensors import pop_tensor
from .split_ops import (
    collapse_doubled_prefix,
    dense_split_converters,
    doubled_expert_segments,
    expert_list_converters,
    fused_split_converters,
    is_dense_merge,
    is_expert_merge,
)

logger = logging.getLogger(__name__)

_PATCHED: dict[str, dict[str, Any]] = {}


def modeling_module_of(model_type: str):
    """The ``transformers.models.*.modeling_*`` module that defines ``model_type``."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    if model_type not in CONFIG_MAPPING_NAMES:
        import difflib

        close = difflib.get_close_matches(model_type, CONFIG_MAPPING_NAMES, n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnsupportedModelError(f"unknown model type {model_type!r}: Transformers has no config for it.{hint}")
    config_cls_name = CONFIG_MAPPING_NAMES[model_type]
    from transformers.models.auto import configuration_auto

    config_cls = getattr(configuration_auto, "CONFIG_MAPPING")[model_type]
    package = config_cls.__module__.rsplit(".", 1)[0]
    leaf = package.rsplit(".", 1)[1]
    try:
        return importlib.import_module(f"{package}.modeling_{leaf}")
    except ImportError as exc:
        raise UnsupportedModelError(f"{model_type!r} ({config_cls_name}) has no importable modeling module: {exc}") from exc


def fused_experts_classes(model_type: str) -> list[type[nn.Module]]:
    """Experts classes decorated with ``use_experts_implementation`` in ``model_type``'s modeling file."""
    module = modeling_module_of(model_type)
    return [
        obj
        for obj in vars(module).values()
        if isinstance(obj, type) and obj.__module__ == module.__name__ and is_fused_experts_class(obj)
    ]


def _defined_classes(model_type: str) -> list[type]:
    module = modeling_module_of(model_type)
    return [obj for obj in vars(module).values() if isinstance(obj, type) and obj.__module__ == module.__name__]


def irregular_experts_classes(model_type: str) -> list[type[nn.Module]]:
    """Undecorated experts classes of ``model_type``'s modeling file with an entry in ``families.py``."""
    return [c for c in _defined_classes(model_type) if experts_entry_for(c) is not None]


def dense_mlp_classes(model_type: str) -> list[type[nn.Module]]:
    """Fused dense ``gate_up_proj`` MLP classes of ``model_type``'s modeling file (``families.py``)."""
    return [c for c in _defined_classes(model_type) if dense_entry_for(c) is not None]


@functools.lru_cache(maxsize=None)
def split_class_for(mlp_cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``mlp_cls`` whose constructor splits ``gate_up_proj`` right after building it."""
    gate_first = dense_entry_for(mlp_cls).gate_first

    def __init__(self, *args, **kwargs) -> None:
        mlp_cls.__init__(self, *args, **kwargs)
        split_dense_mlp(self, gate_first)

    body = {"__init__": __init__, "__module__": __name__, "_defuser_quant_split_of": mlp_cls}
    return type(mlp_cls.__name__, (mlp_cls,), {**body, **pickled_through(split_class_for, mlp_cls)})


@functools.lru_cache(maxsize=None)
def defused_class_for(fused_cls: type[nn.Module]) -> type[DefusedExperts]:
    """A ``DefusedExperts`` subclass constructible like ``fused_cls``, standing in for it."""
    entry = experts_entry_for(fused_cls)
    adapter = adapter_of(entry) if entry is not None else STANDARD

    def __init__(self: DefusedExperts, config, *args, **kwargs) -> None:
        shell = object.__new__(fused_cls)  # bypass the constructor override below
        with torch.device("meta"):
            shell.__init__(config, *args, **kwargs)
        layout = adapter.layout(shell)
        adapter.check(shell, layout, fused_cls.__name__)
        tensors = adapter.tensors(shell, layout)
        # Materialise real-shaped fused tensors in the ambient device/dtype only as far as
        # needed to carve them: on "meta" (how from_pretrained builds models) this is free.
        fused = {}
        for plan in tensors:
            _, _, template = pop_tensor(shell, plan.path)
            fused[plan.path] = torch.empty(template.shape, dtype=template.dtype)
            if isinstance(template, nn.Parameter):
                fused[plan.path] = nn.Parameter(fused[plan.path], requires_grad=template.requires_grad)
        names = adapter.names(layout, getattr(config, "model_type", None), _name_source(fused_cls))
        built = build_defused(shell, layout, names, fused, undo=[], tensors=tensors, adapter=adapter)
        nn.Module.__init__(self)
        self.__dict__.update({k: v for k, v in built.__dict__.items()})

    base = adapter.block_class
    body = {"__init__": __init__, "__module__": __name__, **pickled_through(defused_class_for, fused_cls)}
    return type(f"Defused{fused_cls.__name__}", (base,), body)


# fused class -> the model types whose patch covers it, in patch order. Model types may share
# classes (qwen3_5_moe and qwen3_5_moe_text): the class stays patched until every one is restored.
_ACTIVE: dict[type[nn.Module], list[str]] = {}
# class -> [its original _tied_weights_keys, how many patched model types untied it]
_UNTIED: dict[type, list] = {}


def _name_source(fused_cls: type[nn.Module]) -> str | None:
    """The (top-level) model type the latest active patch of ``fused_cls`` came from."""
    types = _ACTIVE.get(fused_cls)
    return types[-1] if types else None


def _build_replacement(fused_cls: type[nn.Module], args: tuple, kwargs: dict) -> nn.Module:
    """What ``fused_cls(*args, **kwargs)`` builds while patched: a defused experts block (complete;
    not a ``fused_cls`` instance, so Python does not call ``__init__`` again) or an uninitialised
    split-MLP subclass instance (Python then runs its ``__init__``, which splits)."""
    if dense_entry_for(fused_cls) is not None and experts_entry_for(fused_cls) is None and not is_fused_experts_class(fused_cls):
        return nn.Module.__new__(split_class_for(fused_cls))
    return defused_class_for(fused_cls)(*args, **kwargs)


def _install_constructor(fused_cls: type[nn.Module], model_type: str) -> None:
    """Make ``fused_cls(config)`` build the defused block instead, while ``fused_cls`` is active.

    Overriding ``__new__`` (rather than swapping the class name in the modeling module, as
    ``transformers.monkey_patching`` does) keeps ``isinstance(m, <FusedClass>)`` checks such as
    ``_init_weights`` false for the defused block, so they never look for fused tensors; and it
    avoids ``apply_patches()``, which in 5.17 imports every optional vision module via ``dir()``
    and fails without torchvision. Subclasses and ``cls.__new__(cls)`` (copy, pickle) are
    untouched. The override stays installed once set (CPython cannot cleanly delete a
    ``__new__`` assigned after class creation); restoring just deactivates it.
    """
    _ACTIVE.setdefault(fused_cls, []).append(model_type)
    if fused_cls.__dict__.get("_defuser_quant_new"):
        return

    def __new__(cls, *args, **kwargs):
        if cls is fused_cls and _ACTIVE.get(fused_cls) and (args or kwargs):
            return _build_replacement(fused_cls, args, kwargs)
        return super(fused_cls, cls).__new__(cls)

    fused_cls.__new__ = __new__  # type: ignore[method-assign]
    fused_cls._defuser_quant_new = True


def _remove_constructor(fused_cls: type[nn.Module], model_type: str) -> None:
    types = _ACTIVE.get(fused_cls, [])
    if model_type in types:
        types.remove(model_type)
    if not types:
        _ACTIVE.pop(fused_cls, None)


_FUSED_KEY = __import__("re").compile(r"(gate_up_proj|up_proj|down_proj)(_bias)?\$?$")


def _untie_fused_keys(model_type: str) -> list[type]:
    """Drop ``_tied_weights_keys`` entries naming fused expert tensors (they no longer exist in a
    defused model, and Transformers raises when a tie pattern matches nothing); the per-expert
    ``.weight`` patterns of the same families keep the experts tied. Returns the classes changed
    (counted per model type: ``_retie_fused_keys`` restores a class when its last one is restored)."""
    changed = []
    for obj in vars(modeling_module_of(model_type)).values():
        if not isinstance(obj, type):
            continue
        if obj in _UNTIED:
            _UNTIED[obj][1] += 1
            changed.append(obj)
            continue
        keys = obj.__dict__.get("_tied_weights_keys")
        if isinstance(keys, dict) and any(_FUSED_KEY.search(k) for k in keys):
            _UNTIED[obj] = [keys, 1]
            obj._tied_weights_keys = {k: v for k, v in keys.items() if not _FUSED_KEY.search(k)}
            changed.append(obj)
    return changed


def _retie_fused_keys(owners: list[type]) -> None:
    for owner in owners:
        entry = _UNTIED[owner]
        entry[1] -= 1
        if entry[1] == 0:
            owner._tied_weights_keys = entry[0]
            del _UNTIED[owner]


def _conversion_mapping(
    model_type: str, classes: list[type[nn.Module]], dense: list[type[nn.Module]], names_type: str | None = None
) -> list:
    """``model_type``'s conversion mapping with expert merges replaced by per-expert splits named
    as the patched blocks name their projections (``names_type``'s mapping, default its own)."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    existing = get_checkpoint_conversion_mapping(model_type) or []
    kept = [t for t in existing if not is_expert_merge(t) and not (dense and is_dense_merge(t))]
    shared = shared_expert_list(model_type)
    lists = []
    if shared is not None and classes:
        adapter = adapter_for_class(classes[0])
        layout = adapter.layout(None) if experts_entry_for(classes[0]) else ExpertLayout.from_flags(declared_flags_of_class(classes[0]))
        lists = expert_list_converters(shared.groups, adapter.names(layout, model_type, None))
    split = fused_split_converters(names_type or model_type, classes, existing)
    renamings = [t for t in kept if not hasattr(t, "operations")]
    collapses = [collapse_doubled_prefix()] if any("language_model" in "".join(t.target_patterns) for t in renamings) else []
    collapses += [collapse_doubled_prefix(seg, "experts") for seg in doubled_expert_segments(renamings)]
    if collapses:
        # Renamings go first, in order: the collapses run after the family's own.
        at = kept.index(renamings[-1]) + 1
        kept[at:at] = collapses
    return kept + lists + split + (dense_split_converters() if dense else [])


# conversion mapping key -> [the mapping before we registered ours, whether the user had registered
# it, how many patched model types use ours]: keys are shared (a sub-model's type or class key).
_MAPPINGS: dict[str, list] = {}


def _scoped_mapping_keys(model_type: str, dense: bool) -> list[str]:
    """Other keys Transformers looks this model's conversion mappings up under, whose mapping
    merges experts (or dense MLPs): sub-model types (``inkling2_text``) and class names
    (``UnlimitedOcrTextModel``) of the modeling file. Transformers applies each to its sub-model,
    so a merge left there would build fused tensors the patched model does not have."""
    from transformers.conversion_mapping import get_checkpoint_conversion_mapping

    keys = _sub_config_types(model_type)
    for cls in _defined_classes(model_type):
        sub_type = getattr(getattr(cls, "config_class", None), "model_type", None)
        keys += [cls.__name__] + ([sub_type] if isinstance(sub_type, str) and sub_type else [])
    found = []
    for key in dict.fromkeys(keys):
        if key == model_type:
            continue
        previous = _MAPPINGS[key][0] if key in _MAPPINGS else get_checkpoint_conversion_mapping(key)
        if any(is_expert_merge(t) or (dense and is_dense_merge(t)) for t in previous or []):
            found.append(key)
    return found


def _sub_config_types(model_type: str) -> list[str]:
    """Model types of the sub-configs ``model_type``'s config declares (``text_config`` ...), nested.
    Sub-models are not always given their own ``config_class`` (mistral_large4's text model before
    Transformers 5.24), but Transformers looks their conversion mapping up by their config's type."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        pending = [CONFIG_MAPPING[model_type]]
    except KeyError:
        return []
    found: list[str] = []
    while pending:
        for sub in (getattr(pending.pop(), "sub_configs", None) or {}).values():
            sub_type = getattr(sub, "model_type", None)
            if isinstance(sub_type, str) and sub_type and sub_type not in found and sub_type != model_type:
                found.append(sub_type)
                pending.append(sub)
    return found


def _register_mapping(key: str, build) -> None:
    """Register ``build()`` (computed from the unpatched mapping) under ``key``, counted."""
    from transformers import conversion_mapping

    if key in _MAPPINGS:
        _MAPPINGS[key][2] += 1
        return
    previous = conversion_mapping.get_checkpoint_conversion_mapping(key)
    user = key in conversion_mapping.USER_REGISTERED_MAPPINGS
    conversion_mapping.register_checkpoint_conversion_mapping(key, build(), overwrite=True)
    _MAPPINGS[key] = [previous, user, 1]


def _unregister_mapping(key: str) -> None:
    from transformers import conversion_mapping

    entry = _MAPPINGS.get(key)
    if entry is None:
        return
    entry[2] -= 1
    if entry[2]:
        return
    del _MAPPINGS[key]
    previous, user = entry[0], entry[1]
    cache = conversion_mapping._checkpoint_conversion_mapping_cache
    if previous is None:
        cache.pop(key, None)
    else:
        cache[key] = previous
    if not user:
        conversion_mapping.USER_REGISTERED_MAPPINGS.discard(key)


def replace_fused_blocks(model_type: str, *, split_dense: bool = True) -> bool:
    """Patch ``model_type`` so ``from_pretrained``/``from_config`` build defused experts.

    Covers the experts classes decorated with ``@use_experts_implementation``, the irregular
    classes of ``families.py`` and (``split_dense``, on by default) the fused dense
    ``gate_up_proj`` MLPs, which are built split into ``gate_proj``/``up_proj``.
    Returns True when something was patched (False when already patched). Raises
    ``UnsupportedModelError`` for an unknown model type or one without any of these.
    Undo with ``restore_fused_blocks``.
    """
    if model_type in _PATCHED:
        return False
    experts = fused_experts_classes(model_type) + irregular_experts_classes(model_type)
    dense = dense_mlp_classes(model_type) if split_dense else []
    classes = experts + dense
    refused = {c.__name__: extras for c in experts if experts_entry_for(c) is None and (extras := unmodelled_class_structure(c))}
    if refused:
        what = "; ".join(f"{name} has {', '.join(extras)}" for name, extras in refused.items())
        raise UnmodelledStructureError(
            f"{model_type!r}: {what}, which "
            "defuser-quant does not model (a defused block would compute something else); nothing was patched. "
            "Load the model without replace_fused_blocks, or add an explicit entry in defuser_quant/core/families.py."
        )
    if not classes:
        raise UnsupportedModelError(
            f"{model_type!r} has no fused experts class (decorated with @use_experts_implementation or listed in "
            "defuser_quant/core/families.py) and no fused dense MLP: nothing for replace_fused_blocks or convert_model "
            "to do; see the supported families table in the README."
        )
    keys = [model_type, *_scoped_mapping_keys(model_type, bool(dense))]
    # The blocks take their projection names from their own (sub-)config type's mapping, falling
    # back to the top type's: the split converters of every key must use the same names.
    names_type = next((k for k in keys if stock_loads_per_expert(k)), model_type)
    for cls in classes:
        _install_constructor(cls, model_type)
    for key in keys:
        _register_mapping(key, lambda k=key: _conversion_mapping(k, experts, dense, names_type))
    untied = _untie_fused_keys(model_type)
    _PATCHED[model_type] = {"classes": classes, "mapping_keys": keys, "tied_keys": untied}
    load_check.install()  # expert keys that do not load raise instead of leaving random experts
    logger.info("patched %s: %s", model_type, ", ".join(c.__name__ for c in classes))
    return True


def is_patched(model_type: str) -> bool:
    """True while ``replace_fused_blocks(model_type)`` is in effect."""
    return model_type in _PATCHED


def restore_fused_blocks(model_type: str | None = None) -> None:
    """Undo ``replace_fused_blocks`` for ``model_type`` (or every patched type)."""
    for mt in [model_type] if model_type else list(_PATCHED):
        state = _PATCHED.pop(mt, None)
        if state is None:
            continue
        for cls in state["classes"]:
            _remove_constructor(cls, mt)
        _retie_fused_keys(state["tied_keys"])
        for key in state["mapping_keys"]:
            _unregister_mapping(key)
    if not _PATCHED:
        load_check.uninstall()
