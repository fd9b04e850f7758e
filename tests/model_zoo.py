"""Tiny random models for every Mixture-of-Experts family in the installed Transformers.

Test support only. Everything here is found by structure, not from a list of model names:

* :func:`discover_experts_classes` finds every class decorated with
  ``transformers.integrations.moe.use_experts_implementation`` (the decorated ``__init__`` is a
  closure over ``has_gate / has_bias / is_transposed / is_concatenated``; the values are read
  from the closure cells).
* :func:`discover_irregular_experts_classes` finds undecorated ``*Expert*`` classes that hold
  fused expert weights (3-D ``nn.Parameter``, or 2-D with the expert count folded into a dim).
* :func:`discover_fused_dense_mlp_classes` finds dense MLPs with a fused ``gate_up_proj``
  ``nn.Linear``.
* :func:`tiny_config` shrinks the family's default config generically (recursively through
  sub-configs) by field-name patterns; :data:`TINY_CONFIG_OVERRIDES` holds the few per-family
  fixes the generic shrink cannot derive, each with its reason.
* :func:`build_tiny_model` returns ``(model, inputs)`` for a text-only forward.

Typical use in a parametrized test::

    from model_zoo import buildable_model_types, build_tiny_model

    @pytest.mark.parametrize("model_type", buildable_model_types())
    def test_something(model_type):
        model, inputs = build_tiny_model(model_type)
        out = model(**inputs)
"""

from __future__ import annotations

import ast
import contextlib
import copy
import functools
import importlib
import importlib.util
import inspect
import math
import pkgutil
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

__all__ = [
    "ExpertsClassInfo",
    "KNOWN_UNBUILDABLE",
    "TINY_CONFIG_OVERRIDES",
    "TINY",
    "build_tiny_model",
    "buildable_model_types",
    "discover_experts_classes",
    "discover_fused_dense_mlp_classes",
    "discover_irregular_experts_classes",
    "dense_mlp_model_types",
    "experts_model_types",
    "irregular_model_types",
    "find_fused_experts_modules",
    "auto_class_for",
    "model_class_for",
    "tiny_config",
    "torch_threads",
]

_LAYOUT_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")

# Target sizes of the generic shrink.
TINY = {
    "hidden": 64,
    "layers": 2,
    "heads": 4,
    "kv_heads": 2,
    "head_dim": 16,
    "intermediate": 64,
    "moe_intermediate": 32,
    "experts": 8,
    "top_k": 2,
    "vocab": 256,
    "max_positions": 256,
    "batch": 2,
    "seq": 16,
}


# --------------------------------------------------------------------------------------------
# discovery
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertsClassInfo:
    """One fused-experts (or fused dense MLP) class found in the installed Transformers."""

    model_type: str  # top-level model type of the family (what tiny_config/build_tiny_model take)
    module_name: str  # transformers.models.<module_name>
    class_name: str
    cls: type = field(repr=False, compare=False)
    kind: str = "decorated"  # "decorated" | "irregular" | "dense_mlp"
    # Layout facts. For decorated classes they come from the decorator closure; for the
    # irregular kind they are None (those need an explicit layout entry in the core); dense
    # fused MLPs are nn.Linear [2I, H] with gate/up concatenated (chunk), bias left None.
    has_gate: bool | None = None
    has_bias: bool | None = None
    is_transposed: bool | None = None
    is_concatenated: bool | None = None
    # Names of the fused tensors created in __init__ (nn.Parameter or the fused nn.Linear).
    param_names: tuple[str, ...] = ()

    @property
    def layout(self) -> dict[str, bool | None]:
        return {k: getattr(self, k) for k in _LAYOUT_FLAGS}


@contextlib.contextmanager
def _quiet():
    """Silence the warnings/log lines Transformers prints while importing and building."""
    from transformers.utils import logging as hf_logging

    old = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            hf_logging.set_verbosity(old)


def _modeling_sources(marker: str) -> list[tuple[str, str, str]]:
    """(module_name, dotted modeling module, source) for each ``transformers.models.<name>``
    whose ``modeling_<name>.py`` contains ``marker``.

    The text test is only a cheap pre-filter so that discovery does not import ~400 modeling
    modules (~15 s); the structural checks run on the imported classes / parsed source.
    """
    import transformers.models as models_pkg

    out = []
    for info in pkgutil.iter_modules(models_pkg.__path__):
        if not info.ispkg:
            continue
        name = info.name
        dotted = f"transformers.models.{name}.modeling_{name}"
        try:
            spec = importlib.util.find_spec(dotted)
        except (ImportError, ValueError):
            continue
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        try:
            with open(spec.origin, encoding="utf-8") as fh:
                src = fh.read()
        except OSError:
            continue
        if marker in src:
            out.append((name, dotted, src))
    return out


def _import(dotted: str):
    try:
        with _quiet():
            return importlib.import_module(dotted)
    except Exception:  # noqa: BLE001 - optional deps, broken modules: skip them
        return None


@functools.lru_cache(maxsize=None)
def _module_to_model_type(module_name: str) -> str:
    """The top-level model type of a ``transformers.models.<module_name>`` package."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING, model_type_to_module_name

    types = [t for t in CONFIG_MAPPING.keys() if model_type_to_module_name(t) == module_name]
    if module_name in types or not types:
        return module_name
    # The top-level config is the one no other config of the package names as a sub-config.
    sub_types = set()
    for t in types:
        cls = CONFIG_MAPPING[t]
        for sub in (getattr(cls, "sub_configs", None) or {}).values():
            if getattr(sub, "model_type", None):
                sub_types.add(sub.model_type)
    tops = [t for t in types if t not in sub_types]
    return (tops or types)[0]


def _init_param_names(class_node: ast.ClassDef) -> list[tuple[str, str]]:
    """``(attribute, expression)`` for each ``self.X = nn.Parameter(...)`` in ``__init__``."""
    out = []
    for fn in class_node.body:
        if isinstance(fn, ast.FunctionDef) and fn.name == "__init__":
            for node in ast.walk(fn):
                if (
                    isinstance(node, ast.Assign)
                    and len(node.targets) == 1
                    and isinstance(node.targets[0], ast.Attribute)
                    and isinstance(node.targets[0].value, ast.Name)
                    and node.targets[0].value.id == "self"
                    and isinstance(node.value, ast.Call)
                ):
                    func = ast.unparse(node.value.func)
                    out.append((node.targets[0].attr, func, node.value))
    return out


def _tensor_ctor_dims(call: ast.Call) -> list[ast.expr] | None:
    """The shape arguments of ``torch.empty/zeros/ones/randn/rand(...)``, else None."""
    if not isinstance(call, ast.Call):
        return None
    func = ast.unparse(call.func)
    if not func.startswith("torch.") or func.rsplit(".", 1)[-1] not in ("empty", "zeros", "ones", "randn", "rand"):
        return None
    args = list(call.args)
    if len(args) == 1 and isinstance(args[0], (ast.Tuple, ast.List)):
        args = list(args[0].elts)
    return args


@functools.lru_cache(maxsize=None)
def _discover_experts_classes() -> tuple[ExpertsClassInfo, ...]:
    """Every class decorated with ``@use_experts_implementation``, with its layout facts."""
    found = []
    for name, dotted, src in _modeling_sources("use_experts_implementation"):
        mod = _import(dotted)
        if mod is None:
            continue
        try:
            tree = ast.parse(src)
            class_nodes = {n.name: n for n in tree.body if isinstance(n, ast.ClassDef)}
        except SyntaxError:
            class_nodes = {}
        for cls_name, cls in vars(mod).items():
            if not inspect.isclass(cls) or cls.__module__ != mod.__name__:
                continue
            init = cls.__dict__.get("__init__")
            code = getattr(init, "__code__", None)
            if code is None or not set(_LAYOUT_FLAGS) <= set(code.co_freevars):
                continue
            cells = dict(zip(code.co_freevars, init.__closure__ or ()))
            flags = {k: bool(cells[k].cell_contents) for k in _LAYOUT_FLAGS}
            params = ()
            if cls_name in class_nodes:
                params = tuple(
                    attr for attr, func, _ in _init_param_names(class_nodes[cls_name]) if func.endswith("Parameter")
                )
            found.append(
                ExpertsClassInfo(
                    model_type=_module_to_model_type(name),
                    module_name=name,
                    class_name=cls_name,
                    cls=cls,
                    kind="decorated",
                    param_names=params,
                    **flags,
                )
            )
    return tuple(sorted(found, key=lambda i: (i.model_type, i.class_name)))


def _scan_classes(marker: str, match: Callable[[str, ast.ClassDef], Any]) -> list[tuple[str, str, type, Any]]:
    """``(module name, class name, class, match result)`` for the ``nn.Module`` classes of the
    modeling sources mentioning ``marker`` whose AST ``match(module name, node)`` accepts (not None)."""
    found = []
    for name, dotted, src in _modeling_sources(marker):
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        hits = [(node.name, hit) for node in tree.body if isinstance(node, ast.ClassDef)
                and (hit := match(name, node)) is not None]
        if not hits:
            continue
        mod = _import(dotted)
        if mod is None:
            continue
        for cls_name, hit in hits:
            cls = getattr(mod, cls_name, None)
            if inspect.isclass(cls) and issubclass(cls, nn.Module):
                found.append((name, cls_name, cls, hit))
    return found


@functools.lru_cache(maxsize=None)
def _discover_irregular_experts_classes() -> tuple[ExpertsClassInfo, ...]:
    """Undecorated ``*Expert*`` classes holding fused expert weights.

    Structure: the class name mentions experts, it is not decorated with
    ``use_experts_implementation``, and its ``__init__`` creates an ``nn.Parameter`` that is
    3-D, or 2-D with the expert count multiplied into a dimension (dbrx's flattened layout).
    """
    decorated = {(i.module_name, i.class_name) for i in _discover_experts_classes()}

    def fused_params(name: str, node: ast.ClassDef) -> tuple[str, ...] | None:
        if "expert" not in node.name.lower() or (name, node.name) in decorated or any(
            "use_experts_implementation" in ast.unparse(d) for d in node.decorator_list
        ):
            return None
        fused = []
        for attr, func, call in _init_param_names(node):
            if not func.endswith("Parameter") or not call.args:
                continue
            dims = _tensor_ctor_dims(call.args[0])
            if dims is None:
                continue
            if len(dims) == 3 or (
                len(dims) == 2 and any(("expert" in ast.unparse(d).lower() and "*" in ast.unparse(d)) for d in dims)
            ):
                fused.append(attr)
        return tuple(fused) or None

    found = [
        ExpertsClassInfo(model_type=_module_to_model_type(name), module_name=name, class_name=cls_name, cls=cls,
                         kind="irregular", param_names=params)
        for name, cls_name, cls, params in _scan_classes("Expert", fused_params)
    ]
    return tuple(sorted(found, key=lambda i: (i.model_type, i.class_name)))


@functools.lru_cache(maxsize=None)
def _discover_fused_dense_mlp_classes() -> tuple[ExpertsClassInfo, ...]:
    """Dense MLP classes whose ``__init__`` builds a fused ``self.gate_up_proj = nn.Linear(...)``
    next to a ``down_proj`` (phi3, glm, glm4, dia, zamba2, phi4_multimodal, ...)."""

    def fused_gate_up(name: str, node: ast.ClassDef) -> bool | None:
        attrs = {attr: func for attr, func, _ in _init_param_names(node)}
        return True if attrs.get("gate_up_proj", "").endswith("Linear") and "down_proj" in attrs else None

    found = [
        ExpertsClassInfo(model_type=_module_to_model_type(name), module_name=name, class_name=cls_name, cls=cls,
                         kind="dense_mlp", has_gate=True, is_concatenated=True, is_transposed=False,
                         param_names=("gate_up_proj", "down_proj"))
        for name, cls_name, cls, _ in _scan_classes("gate_up_proj", fused_gate_up)
    ]
    return tuple(sorted(found, key=lambda i: (i.model_type, i.class_name)))


def discover_experts_classes() -> list[ExpertsClassInfo]:
    """Every class decorated with ``@use_experts_implementation`` (one entry per class; a family
    such as qwen3_omni_moe can have several), sorted by model type. The layout facts come from
    the decorator's closure, never from a list."""
    return list(_discover_experts_classes())


def discover_irregular_experts_classes() -> list[ExpertsClassInfo]:
    """Undecorated fused-experts classes (aria, dbrx, jetmoe, llama4, longcat_flash, ...)."""
    return list(_discover_irregular_experts_classes())


def discover_fused_dense_mlp_classes() -> list[ExpertsClassInfo]:
    """Dense MLPs with a fused ``gate_up_proj`` ``nn.Linear`` (phi3, glm, glm4, dia, ...)."""
    return list(_discover_fused_dense_mlp_classes())


def experts_model_types() -> list[str]:
    """Sorted, de-duplicated model types that have at least one decorated experts class."""
    return sorted({i.model_type for i in discover_experts_classes()})


def irregular_model_types() -> list[str]:
    """Sorted model types with an undecorated fused experts class."""
    return sorted({i.model_type for i in discover_irregular_experts_classes()})


def dense_mlp_model_types() -> list[str]:
    """Sorted model types with a dense MLP holding a fused ``gate_up_proj`` ``nn.Linear``."""
    return sorted({i.model_type for i in discover_fused_dense_mlp_classes()})


def longcat_identity_experts_in_block() -> bool:
    """Whether the installed Transformers keeps longcat_flash's weightless identity experts inside its
    (undecorated, families.py entry) experts block, as 5.17-5.24 do; 5.25 decorated the block and
    handles them in ``LongcatFlashMoE`` instead."""
    from defuser_quant.core.families import EXPERTS_ENTRIES, entry_active

    return any(e.family == "longcat_flash" and entry_active(e) for e in EXPERTS_ENTRIES)


def skip_unless_longcat_identity_experts_in_block() -> None:
    """Skip the calling test where :func:`longcat_identity_experts_in_block` is False."""
    import pytest

    if not longcat_identity_experts_in_block():
        pytest.skip("this Transformers moved longcat_flash's identity experts out of its (now decorated) experts block")


def buildable_model_types() -> list[str]:
    """``experts_model_types()`` minus :data:`KNOWN_UNBUILDABLE`."""
    return [t for t in experts_model_types() if t not in KNOWN_UNBUILDABLE]


# --------------------------------------------------------------------------------------------
# tiny configs
# --------------------------------------------------------------------------------------------

# Families whose tiny model truly cannot be built generically: model_type -> reason.
KNOWN_UNBUILDABLE: dict[str, str] = {}

# Per-family fixes the generic shrink cannot derive. Keys are model types; values are dicts of
# config fields (dotted paths reach into sub-configs: "text_config.foo") applied before the
# generic shrink (so it shrinks what they bring), "_after_shrink" fields applied after it, plus a
# mandatory "_reason". Keep this small: prefer fixing the generic rules.
TINY_CONFIG_OVERRIDES: dict[str, dict[str, Any]] = {
    "deepseek_ocr2": {
        "_reason": "default text config leaves mlp_layer_types None but the decoder indexes it per layer",
        "text_config.mlp_layer_types": ["dense", "sparse"],
    },
    "lfm2_moe": {
        "_reason": "default config leaves layer_types None but the decoder indexes it per layer",
        "layer_types": ["conv", "full_attention"],
    },
    "granitemoehybrid": {
        "_reason": "default layer_types is all-mamba; the forward needs one attention layer for the cache",
        "layer_types": ["mamba", "attention"],
    },
    "diffusion_gemma": {
        "_reason": "default config has no vision_config, but the encoder always builds a vision tower "
        "(gemma4_vision is the type its config falls back to)",
        "vision_config": {"model_type": "gemma4_vision"},
    },
    "qwen4_exp": {
        "_reason": "every full-attention layer builds a QSA indexer, but the default config leaves all "
        "indexer_* fields None",
        "text_config.indexer_n_heads": 2,
        "text_config.indexer_kv_heads": 1,
        "text_config.indexer_head_dim": 16,
        "text_config.indexer_budget": 8,
        "text_config.indexer_compress_ratio": 4,
    },
    "dbrx": {
        "_reason": "ffn_config/attn_config are plain dicts whose serialized form carries keys their config "
        "classes reject (_name_or_path, output_attentions); attn_config also needs rope_theta",
        "ffn_config": {
            "ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2, "ffn_act_fn": {"name": "silu"},
            "moe_normalize_expert_weights": 1.0,
        },
        "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
    },
    "step3p7": {
        "_reason": "the text config's sliding_window defaults to None but the attention reads it",
        "text_config.sliding_window": 16,
    },
    "zamba2": {
        "_reason": "hybrid_layer_ids index the original 54 layers; attention/mamba widths are derived in "
        "__post_init__ but the serialized (shrunk) values win, so they are set after the shrink",
        "layers_block_type": ["linear_attention", "hybrid"],
        "hybrid_layer_ids": [1],
        "_after_shrink": {"attention_hidden_size": 128, "attention_head_dim": 32, "mamba_headdim": 16},
    },
    "mistral_large4": {
        "_needs": "5.24.0",  # the first Transformers tested that has the family
        "_reason": "kv_source_layers names a source layer per layer; the shrink keeps original indices "
        "(transformers 5.24)",
        "_after_shrink": {"text_config.kv_source_layers": [0, 1]},
    },
    "bailing_hybrid": {
        "_needs": "5.24.0",  # the first Transformers tested that has the family
        "_reason": "its group count is num_expert_group (the shrink knows n_group), so topk_group outgrows "
        "the groups (transformers 5.24)",
        "num_expert_group": 1,
        "topk_group": 1,
    },
    "dots3_note": {
        "_needs": "5.24.0",  # the first Transformers tested that has the family
        "_reason": "the vision/audio adapters' widths must equal the towers' and the text model's hidden "
        "sizes, which the shrink changes (transformers 5.24)",
        "_after_shrink": {
            "vision_config.adapter_in_dim": 64, "vision_config.adapter_out_dim": 64,
            "audio_config.adapter_input_size": 64, "audio_config.adapter_out_dim": 64,
        },
    },
    "muse_spark": {
        "_needs": "5.24.0",  # the first Transformers tested that has the family
        "_reason": "the audio tower's widths are a hidden_sizes list the shrink does not know (transformers 5.24)",
        "_after_shrink": {"audio_config.hidden_sizes": [16, 32], "audio_config.depths": [1, 1]},
    },
    "kolibri1_1": {
        "_needs": "5.25.0",  # the first Transformers tested that has the family
        "_reason": "layer_types, index_layers, kv_source_layers and mlp_only_layers name original layer "
        "indices (a default index_layers of [4, 14, 19, 29], both shrunk layers MLP-only), and index_num_heads "
        "(12) outgrows the shrunk query heads per key head; two layers: an indexer, then a sliding-window MoE "
        "layer (transformers 5.25)",
        "_after_shrink": {"layer_types": ["indexed_attention", "sliding_attention"], "index_layers": [0],
                          "kv_source_layers": [0, 1], "mlp_only_layers": [0], "index_num_heads": 1},
    },
    "qwen3_omni_moe": {
        "_reason": "config classes lack fields the model reads (talker: shared_expert_intermediate_size, "
        "spatial_merge_size; thinker: vision_start_token_id); real checkpoints carry them in config.json",
        "talker_config.text_config.shared_expert_intermediate_size": 32,
        "talker_config.spatial_merge_size": 2,
        "thinker_config.vision_start_token_id": 151652,
    },
}


_LAYER_COUNT_KEYS = {
    "num_hidden_layers",
    "num_layers",
    "n_layer",
    "n_layers",
    "encoder_layers",
    "decoder_layers",
    "depth",
}
_HEAD_KEYS = {
    "num_attention_heads",
    "num_heads",
    "n_head",
    "n_heads",
    "encoder_attention_heads",
    "decoder_attention_heads",
}
_EXPERT_COUNT_RE = re.compile(r"^(n|num|moe_num|num_local|n_routed|num_routed|moe_num_routed|num_moe)_experts$")
_SHARED_EXPERT_COUNT_RE = re.compile(r"^(n|num|moe_num)_shared_experts?$")
_TOP_K_RE = re.compile(
    r"^(num_experts_per_tok(en)?|moe_k|moe_top_?k|top_k_experts|num_selected_experts|experts_per_token)$"
)
_FFN_KEYS = {"ffn_dim", "encoder_ffn_dim", "decoder_ffn_dim", "mlp_dim", "ffn_hidden_size"}
_TOKEN_ID_RE = re.compile(r"(token_id|token_index|_id)$")
_TOKEN_IDS_RE = re.compile(r"token_ids$")


def _is_config_dict(d: Any) -> bool:
    return isinstance(d, dict) and "model_type" in d


def _is_moe_like(v: Any) -> bool:
    return isinstance(v, str) and any(s in v.lower() for s in ("moe", "sparse", "expert"))


def _pick_layer_indices(per_layer: list[list], n_orig: int, n: int) -> list[int]:
    """Choose ``n`` of ``n_orig`` layers so that the tiny model keeps a MoE layer and as many
    distinct per-layer values (attention kinds, dense/sparse MLP, ...) as fit. Greedy: the first
    pick is a MoE-like layer (preferring layers with rare values), each next pick adds the most
    unseen ``(list, value)`` pairs."""
    if n_orig <= n:
        return list(range(n_orig))
    freq = [{} for _ in per_layer]
    for j, values in enumerate(per_layer):
        for v in values:
            freq[j][repr(v)] = freq[j].get(repr(v), 0) + 1

    def rarity(i):
        return sum(1.0 / freq[j][repr(values[i])] for j, values in enumerate(per_layer))

    moe = [i for i in range(n_orig) if any(_is_moe_like(values[i]) for values in per_layer)]
    first = max(moe or range(n_orig), key=lambda i: (rarity(i), -i))
    chosen = [first]
    seen = {(j, repr(values[first])) for j, values in enumerate(per_layer)}
    while len(chosen) < n:
        rest = [i for i in range(n_orig) if i not in chosen]

        def gain(i):
            return sum((j, repr(values[i])) not in seen for j, values in enumerate(per_layer))

        nxt = max(rest, key=lambda i: (gain(i), -i))
        chosen.append(nxt)
        seen |= {(j, repr(values[nxt])) for j, values in enumerate(per_layer)}
    return sorted(chosen)


def _is_layer_index_dict(v: Any) -> bool:
    return isinstance(v, dict) and bool(v) and all(str(k).isdigit() for k in v)


def _scale_sections(sections: list[int], target: int) -> list[int]:
    """Rescale integer sections to sum to ``target`` (largest remainder, each >= 1)."""
    total = sum(sections)
    raw = [s * target / total for s in sections]
    out = [max(1, int(math.floor(r))) for r in raw]
    order = sorted(range(len(raw)), key=lambda i: raw[i] - math.floor(raw[i]), reverse=True)
    k = 0
    while sum(out) < target:
        out[order[k % len(out)]] += 1
        k += 1
    while sum(out) > target:
        i = max(range(len(out)), key=lambda i: out[i])
        out[i] -= 1
    return out


def _shrink_dict(d: dict, ids: dict[int, int], mrope_default: list[int] | None = None) -> dict:
    """Generic shrink of one config dict (recursing into sub-config dicts)."""
    t = TINY
    out = dict(d)
    n_layers = t["layers"]
    orig_layers = next(
        (d[k] for k in ("num_hidden_layers", "num_layers", "n_layer", "n_layers") if isinstance(d.get(k), int)), None
    )
    per_layer_keys = [
        k
        for k, v in d.items()
        if isinstance(v, list) and orig_layers and len(v) == orig_layers and not all(_is_config_dict(x) for x in v)
        and k not in ("mlp_only_layers",)
    ]
    selection = None
    if orig_layers and orig_layers > n_layers:
        selection = _pick_layer_indices([d[k] for k in per_layer_keys], orig_layers, n_layers)

    for key, val in d.items():
        if key.startswith("_"):
            continue
        # sub-configs
        if _is_config_dict(val):
            out[key] = _shrink_dict(val, ids, mrope_default)
            continue
        if isinstance(val, list) and val and all(_is_config_dict(v) for v in val):
            out[key] = [_shrink_dict(v, ids, mrope_default) for v in val]
            continue
        k = key.lower()
        if isinstance(val, bool):
            if re.fullmatch(r"(enable|use)_moe(_block)?", k):
                out[key] = True  # families where MoE is opt-in (gemma4 text)
            continue

        # per-layer lists (layer_types, mlp_layer_types, layers_block_type, ...) and
        # per-layer dicts keyed by layer index (gemma4 per_layer_config)
        if key in per_layer_keys:
            if selection is not None:
                out[key] = [val[i] for i in selection]
            continue
        if _is_layer_index_dict(val):
            if selection is not None:
                out[key] = {
                    selection.index(int(i)): _shrink_dict(v, ids) if isinstance(v, dict) else v
                    for i, v in val.items()
                    if int(i) in selection
                }
            else:
                out[key] = {i: _shrink_dict(v, ids) if isinstance(v, dict) else v for i, v in val.items()}
            continue
        if k == "mlp_only_layers":
            out[key] = []
            continue

        # token ids: keep them inside the tiny vocab
        if _TOKEN_ID_RE.search(k) and isinstance(val, int):
            if val >= t["vocab"]:
                out[key] = ids.setdefault(val, t["vocab"] - 1 - len(ids))
            continue
        if _TOKEN_IDS_RE.search(k) and isinstance(val, list) and all(isinstance(v, int) for v in val):
            out[key] = [ids.setdefault(v, t["vocab"] - 1 - len(ids)) if v >= t["vocab"] else v for v in val]
            continue

        if isinstance(val, list) and val and all(isinstance(v, int) and not isinstance(v, bool) for v in val):
            if "intermediate_size" in k:  # ernie4_5_vl_moe: per-modality expert sizes
                out[key] = [t["moe_intermediate"] if ("moe" in k or "expert" in k) else t["intermediate"]] * len(val)
            elif k.endswith("channels"):  # conv widths of vision stems (deepseek_ocr2 SAM neck)
                out[key] = [min(v, t["hidden"]) for v in val]
            continue

        if val is None:
            # Fields whose None default means "MoE off" or "derive it": give them tiny values.
            if _EXPERT_COUNT_RE.match(k):
                out[key] = t["experts"]
            elif _TOP_K_RE.match(k):
                out[key] = t["top_k"]
            elif _SHARED_EXPERT_COUNT_RE.match(k):
                out[key] = 1
            elif k == "moe_intermediate_size":
                out[key] = t["moe_intermediate"]
            elif k == "head_dim":
                out[key] = t["head_dim"]
            continue
        if not isinstance(val, int):
            continue

        # vocab
        if "vocab_size" in k and "divisible" not in k:
            out[key] = min(val, t["vocab"])
        elif k == "codebook_size":
            out[key] = min(val, t["vocab"])
        # widths
        elif "intermediate_size" in k or k in _FFN_KEYS:
            moe = "moe" in k or "expert" in k
            out[key] = t["moe_intermediate"] if moe else t["intermediate"]
        elif k in ("hidden_size", "d_model", "n_embd", "embed_dim", "out_hidden_size", "decoder_dim", "output_dim") or (
            k.endswith("_hidden_size") and "intermediate" not in k
        ):
            out[key] = t["hidden"]
        elif k == "hidden_size_per_layer_input":
            out[key] = min(val, t["head_dim"])
        # depth
        elif k in _LAYER_COUNT_KEYS:
            out[key] = min(val, n_layers)
        elif k in ("first_k_dense_replace", "num_dense_layers", "moe_layer_start_index"):
            out[key] = min(val, 1)
        elif k == "moe_layer_end_index":
            out[key] = n_layers - 1
        elif k in ("decoder_sparse_step", "moe_layer_interval", "moe_layer_freq"):
            out[key] = 1
        elif k.endswith("_layer_period") or k in ("global_attn_every_n_layers", "sliding_window_pattern"):
            out[key] = min(val, n_layers)
        elif k.endswith("_layer_offset"):
            out[key] = min(val, n_layers - 1)
        elif k == "num_kv_shared_layers":
            out[key] = 0
        elif k == "max_window_layers":
            out[key] = min(val, n_layers)
        # heads (multi-head attention stays multi-head: MLA and some validators need kv == q heads)
        elif k in _HEAD_KEYS or k.endswith(("_num_heads", "_n_heads", "num_attention_heads")):
            out[key] = min(val, t["heads"])
        elif k.endswith("num_key_value_heads"):
            q_heads = d.get(key[: -len("num_key_value_heads")] + "num_attention_heads")
            out[key] = min(val, t["heads"] if val == q_heads else t["kv_heads"])
        elif k.endswith("kv_heads"):
            out[key] = min(val, t["kv_heads"])
        elif k.endswith("num_key_heads"):
            out[key] = min(val, t["kv_heads"])
        elif k.endswith("num_value_heads"):
            out[key] = min(val, t["heads"])
        # head dims (MLA: rope + nope == qk head dim)
        elif k == "qk_rope_head_dim":  # 0 stays 0 (NoPE families such as glm5_next)
            out[key] = min(val, t["head_dim"] // 2)
        elif k == "qk_nope_head_dim":
            out[key] = t["head_dim"] - min(d.get("qk_rope_head_dim") or 0, t["head_dim"] // 2)
        elif k == "head_dim" or k.endswith("_head_dim") or k in ("mamba_d_head",):
            out[key] = t["head_dim"]
        elif k.endswith("lora_rank") or k.endswith("lowrank"):
            out[key] = t["head_dim"]
        elif k in ("mamba_d_state", "ssm_state_size", "state_size", "d_state"):
            out[key] = min(val, 16)
        elif k in ("n_groups", "mamba_n_groups"):
            out[key] = 1
        elif k in ("mamba_dt_rank", "time_step_rank"):
            out[key] = min(val, 8)
        # experts
        elif _EXPERT_COUNT_RE.match(k):
            out[key] = t["experts"]
        elif _SHARED_EXPERT_COUNT_RE.match(k):
            out[key] = min(val, 1)
        elif _TOP_K_RE.match(k):
            out[key] = min(val, t["top_k"])
        elif k in ("n_group", "num_expert_group"):
            out[key] = 2 if val > 1 else val
        # misc
        elif k == "max_position_embeddings":
            out[key] = min(val, t["max_positions"])
        elif k.endswith("position_embedding_size") or k == "num_position_embeddings":
            out[key] = min(val, 256)  # vision position tables (a square number of positions)
        elif k == "index_topk":
            out[key] = min(val, t["seq"] // 2)

    # derived consistency
    if "qk_rope_head_dim" in d and d.get("head_dim") == d["qk_rope_head_dim"]:
        out["head_dim"] = out["qk_rope_head_dim"]  # MLA families rotate head_dim == qk_rope_head_dim
    if isinstance(out.get("index_topk"), int) and isinstance(out.get("index_kpool"), int):
        out["index_kpool"] = min(out["index_kpool"], 4)
        out["index_topk"] -= out["index_topk"] % out["index_kpool"]
    if isinstance(out.get("qk_head_dim"), int) and "qk_rope_head_dim" in out and "qk_nope_head_dim" in out:
        out["qk_head_dim"] = out["qk_rope_head_dim"] + out["qk_nope_head_dim"]
    if isinstance(out.get("n_group"), int) and isinstance(out.get("topk_group"), int):
        out["topk_group"] = 1 if out["n_group"] > 1 else min(out["topk_group"], out["n_group"])
    # mamba: heads * head_dim == expand * hidden
    for heads_key, dim_key, expand_key in (
        ("mamba_num_heads", "mamba_head_dim", "mamba_expand"),
        ("mamba_n_heads", "mamba_d_head", "mamba_expand"),
        ("mamba_num_heads", "mamba_head_dim", "expand"),
    ):
        if heads_key in out and dim_key in out and isinstance(out.get(expand_key), int) and "hidden_size" in out:
            out[heads_key] = max(1, out[expand_key] * out["hidden_size"] // out[dim_key])
    # multimodal rope sections must add up to half the rotary dim of the tiny head
    rope = out.get("rope_parameters")
    if isinstance(rope, dict) and "vocab_size" in out and not any(isinstance(v, dict) for v in rope.values()):
        sections = rope.get("mrope_section", mrope_default)
        if sections and rope.get("rope_type", "default") in ("default", "mrope", "linear", "dynamic", "yarn"):
            head_dim = out.get("head_dim") or out["hidden_size"] // out["num_attention_heads"]
            partial = rope.get("partial_rotary_factor", out.get("partial_rotary_factor", 1.0)) or 1.0
            target = int(head_dim * partial) // 2
            if sum(sections) != target:
                out["rope_parameters"] = {**rope, "mrope_section": _scale_sections(list(sections), target)}
    return out


def _set_path(d: dict, path: str, value: Any) -> None:
    parts = path.split(".")
    for p in parts[:-1]:
        d = d[p]
    d[parts[-1]] = value


def _expand_config_stub(value: Any) -> Any:
    """``{"model_type": "x", ...}`` -> the full default dict of config ``x`` updated with the given
    fields, so that the generic shrink sees (and shrinks) every field."""
    if _is_config_dict(value):
        from transformers import AutoConfig

        full = AutoConfig.for_model(value["model_type"]).to_dict()
        full.update(value)
        return full
    return value


def _walk_configs(cfg):
    yield cfg
    for key in getattr(cfg, "sub_configs", {}) or {}:
        sub = getattr(cfg, key, None)
        if sub is not None and hasattr(sub, "to_dict"):
            yield from _walk_configs(sub)


@functools.lru_cache(maxsize=None)
def _mrope_default(model_type: str) -> tuple[int, ...] | None:
    """The ``mrope_section`` default a family's modeling code falls back to when the config
    has none (``config.rope_parameters.get("mrope_section", [8, 12, 12])``)."""
    from transformers.models.auto.configuration_auto import model_type_to_module_name

    name = model_type_to_module_name(model_type)
    spec = importlib.util.find_spec(f"transformers.models.{name}.modeling_{name}")
    if spec is None or not spec.origin:
        return None
    with open(spec.origin, encoding="utf-8") as fh:
        m = re.search(r"[\"']mrope_section[\"'],\s*\[([\d,\s]+)\]", fh.read())
    return tuple(int(x) for x in m.group(1).split(",") if x.strip()) if m else None


def tiny_config(model_type: str):
    """A tiny fp32/eager config for ``model_type`` (see module docstring)."""
    from transformers import AutoConfig

    with _quiet():
        base = AutoConfig.for_model(model_type)
        d = base.to_dict()
        for path, value in TINY_CONFIG_OVERRIDES.get(model_type, {}).items():
            if not path.startswith("_"):
                _set_path(d, path, _expand_config_stub(copy.deepcopy(value)))
        ids: dict[int, int] = {}
        d = _shrink_dict(d, ids, _mrope_default(model_type))
        for path, value in TINY_CONFIG_OVERRIDES.get(model_type, {}).get("_after_shrink", {}).items():
            _set_path(d, path, copy.deepcopy(value))
        d["dtype"] = "float32"
        for sub_key in base.sub_configs or {}:
            if isinstance(d.get(sub_key), dict):
                d[sub_key]["dtype"] = "float32"
        cfg = type(base).from_dict(d)
        cfg._attn_implementation = "eager"
        cfg._experts_implementation = "eager"
    return cfg


# --------------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------------

# (mapping in transformers.models.auto.modeling_auto, auto class), most natural first.
_AUTO_CLASSES = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    ("MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "AutoModelForImageTextToText"),
    ("MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES", "AutoModelForMultimodalLM"),
    ("MODEL_FOR_TEXT_TO_WAVEFORM_MAPPING_NAMES", "AutoModelForTextToWaveform"),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", "AutoModelForTokenClassification"),
    ("MODEL_MAPPING_NAMES", "AutoModel"),
)


def auto_class_for(model_type: str):
    """The auto class that builds the most natural top-level model of ``model_type``:
    ``AutoModelForCausalLM`` where mapped (which, for a composite config whose causal LM takes
    the text config, builds the text model), else image-text-to-text / multimodal LM / ...,
    else ``AutoModel``."""
    import transformers
    from transformers.models.auto import modeling_auto

    for mapping_name, auto_name in _AUTO_CLASSES:
        if model_type in getattr(modeling_auto, mapping_name, {}) and hasattr(transformers, auto_name):
            return getattr(transformers, auto_name)
    raise KeyError(f"no auto model class maps {model_type!r}")


def model_class_for(model_type: str) -> type:
    """The concrete class ``auto_class_for(model_type)`` builds for ``model_type``."""
    import transformers
    from transformers.models.auto import modeling_auto

    for mapping_name, _ in _AUTO_CLASSES:
        name = getattr(modeling_auto, mapping_name, {}).get(model_type)
        if isinstance(name, (list, tuple)):
            name = name[0]
        if name and hasattr(transformers, name):
            return getattr(transformers, name)
    raise KeyError(f"no model class mapped for {model_type!r}")


def find_fused_experts_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` for every module whose class is a discovered experts class
    (decorated or irregular)."""
    classes = tuple({i.cls for i in _discover_experts_classes() + _discover_irregular_experts_classes()})
    return [(n, m) for n, m in model.named_modules() if isinstance(m, classes)]


def _special_ids(cfg) -> set[int]:
    out: set[int] = set()
    for c in _walk_configs(cfg):
        for k, v in c.to_dict().items():
            if isinstance(v, bool):
                continue
            if _TOKEN_ID_RE.search(k) and isinstance(v, int):
                out.add(v)
            elif _TOKEN_IDS_RE.search(k) and isinstance(v, list):
                out.update(x for x in v if isinstance(x, int))
    return out


def _text_inputs(cfg, generator: torch.Generator) -> dict[str, torch.Tensor]:
    b, s = TINY["batch"], TINY["seq"]
    try:
        vocab = getattr(cfg.get_text_config(decoder=True), "vocab_size", None)
    except Exception:  # noqa: BLE001
        vocab = None
    vocab = min(vocab or TINY["vocab"], TINY["vocab"])
    allowed = torch.tensor([i for i in range(3, vocab) if i not in _special_ids(cfg)])
    idx = torch.randint(0, len(allowed), (b, s), generator=generator)
    input_ids = allowed[idx]
    return {"input_ids": input_ids, "attention_mask": torch.ones(b, s, dtype=torch.long)}


@torch.no_grad()
def _reinit_experts(model: nn.Module, generator: torch.Generator) -> None:
    """Re-draw fused expert weights as ``randn * 0.05``, and un-degenerate routing: a router
    weight ``[E, ...]`` that random init left all-zero (afmoe, ernie4_5_moe) gets the same
    treatment, and an all-zero integer token->expert table (deepseek_v4 hash routing) gets
    random distinct expert ids, so that a forward reaches many experts, not one or two."""
    for name, module in find_fused_experts_modules(model):
        num_experts = None
        for p in module.parameters(recurse=False):
            if p.dim() == 3 and num_experts is None:
                num_experts = p.shape[0]
            p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.dtype) * 0.05)
        if not num_experts or "." not in name:
            continue
        block = model.get_submodule(name.rsplit(".", 1)[0])
        skip = {id(t) for t in module.parameters()} | {id(t) for t in module.buffers()}
        for p in block.parameters():
            if id(p) not in skip and p.dim() == 2 and p.shape[0] == num_experts and not p.any():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
        for b in block.buffers():
            if (
                id(b) not in skip
                and b.dim() == 2
                and not b.is_floating_point()
                and b.dtype != torch.bool
                and b.shape[-1] <= num_experts
                and not b.any()
            ):
                ids = torch.rand(b.shape[0], num_experts, generator=generator).argsort(-1)[:, : b.shape[-1]]
                b.copy_(ids.to(b.dtype))


@contextlib.contextmanager
def torch_threads(n: int = 1):
    """Run with ``n`` intra-op threads, then restore. Tiny models gain nothing from threads, and on
    a busy 2-core machine spinning OpenMP workers make their forwards ~10x slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _has_forward(cls: type) -> bool:
    return getattr(cls, "forward", None) is not getattr(nn.Module, "forward", None)


def _build_forward_capable(model_type: str, cfg, kwargs: dict) -> nn.Module:
    """``auto_class_for(model_type).from_config(cfg)``; when that top-level class has no forward
    of its own (qwen3_omni_moe's wrapper only generates), build the first sub-config whose mapped
    class has one (the thinker)."""
    if _has_forward(model_class_for(model_type)):
        return auto_class_for(model_type).from_config(cfg, **kwargs)
    for key in cfg.sub_configs or {}:
        sub = getattr(cfg, key, None)
        sub_type = getattr(sub, "model_type", None)
        try:
            if sub_type and _has_forward(model_class_for(sub_type)):
                return auto_class_for(sub_type).from_config(sub, **kwargs)
        except KeyError:
            continue
    raise RuntimeError(f"{model_type}: neither the top-level class nor a sub-config class has a forward")


def run_main_output(model: nn.Module, inputs: dict) -> torch.Tensor:
    """The model's main output (logits, else the last hidden state) for ``inputs``, seeded: some
    families sample in forward (diffusion_gemma's noise)."""
    torch.manual_seed(0)
    with torch.no_grad():
        out = model(**inputs)
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    return out[0]


def build_tiny_model(model_type: str, seed: int = 0, experts_implementation: str = "eager"):
    """Build the tiny random ``model_type`` model in eval mode; return ``(model, inputs)``.

    ``inputs`` is a dict for a text-only forward (``input_ids`` of shape [2, 16] plus whatever
    the family needs). Fused expert parameters are re-drawn from ``randn * 0.05`` (seeded) so
    that experts are neither zero nor identical.
    """
    if model_type in KNOWN_UNBUILDABLE:
        raise RuntimeError(f"{model_type}: {KNOWN_UNBUILDABLE[model_type]}")
    cfg = tiny_config(model_type)
    kwargs = dict(dtype=torch.float32, attn_implementation="eager", experts_implementation=experts_implementation)
    torch.manual_seed(seed)
    with _quiet():
        try:
            model = _build_forward_capable(model_type, cfg, kwargs)
        except ModuleNotFoundError:
            # A non-text tower needs an optional package that is not installed (inkling's vision
            # tower imports scipy): fall back to the family's text-only causal LM.
            text_cfg = cfg.get_text_config(decoder=True)
            if text_cfg is cfg:
                raise
            from transformers import AutoModelForCausalLM

            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(text_cfg, **kwargs)
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    _reinit_experts(model, gen)
    inputs = _text_inputs(model.config, gen)
    return model, inputs
