"""The one place for families whose structure Transformers does not describe by itself.

Everything else is detected from the layout facts ``@use_experts_implementation`` stamps on
experts classes. Entries here must say why they exist. Classes are named, never imported: an
entry whose class the installed Transformers lacks (renamed, removed, or newer: ``needs``) is
simply inactive, and ``tests/test_support.py`` reports it. An experts entry applies only while
its class has the structure it describes, an undecorated class: once Transformers decorates it
(aria in 5.24), the decorator's flags describe it and the standard path takes over. ``python -m defuser_quant.tools.families_table --markdown`` prints the
supported families table of the README.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any

from .layout import declared_flags_of_class

# model_type -> per-expert projection names (gate or None, up, down), where the conversion
# mapping does not tell them.
PROJECTION_NAME_OVERRIDES: dict[str, tuple[str | None, str, str]] = {}


def _qualified(module: str, class_name: str) -> str:
    return f"transformers.models.{module}.modeling_{module}.{class_name}"


@dataclass(frozen=True)
class ExpertsEntry:
    """An undecorated fused experts class and the adapter that defuses it.

    ``attrs`` are the attribute names the class has in its parent module; the pre-load patch
    builds checkpoint key patterns from them.
    """

    family: str  # the model type it belongs to (the table's row)
    module: str  # transformers.models.<module>
    class_name: str
    adapter: str  # "<module>:<factory>" under defuser_quant.core.irregular, called with no argument
    layout: str  # storage layout, in words
    why: str
    attrs: tuple[str, ...] = ("experts",)
    needs: str = ""  # the first Transformers release tested that has the class, when newer than 5.17

    @property
    def qualified_name(self) -> str:
        return _qualified(self.module, self.class_name)


@dataclass(frozen=True)
class DenseMlpEntry:
    """A dense MLP with a fused ``gate_up_proj`` ``nn.Linear``; ``gate_first`` says which half is
    the activated one (phi4_multimodal's audio MLP activates the second half)."""

    family: str
    module: str
    class_name: str
    gate_first: bool = True
    needs: str = ""  # the first Transformers release tested that has the class, when newer than 5.17

    @property
    def qualified_name(self) -> str:
        return _qualified(self.module, self.class_name)


EXPERTS_ENTRIES: tuple[ExpertsEntry, ...] = (
    ExpertsEntry(
        "dbrx", "dbrx", "DbrxExperts", "dbrx:DbrxAdapter",
        "flattened w1/v1/w2 [E*I, H] (w2 used transposed)",
        "weights live in a child DbrxExpertGLU, flattened over experts; not decorated",
    ),
    ExpertsEntry(
        "llama4", "llama4", "Llama4TextExperts", "batched:BatchedInputAdapter",
        "gated/concat/[E,in,out], batched input [E*T, H]",
        "forward takes inputs already grouped per expert (every token to every expert, pre-scaled)",
    ),
    ExpertsEntry(
        "longcat_flash", "longcat_flash", "LongcatFlashExperts", "identity:IdentityExpertsAdapter",
        "gated/concat/[E,out,in] + identity (zero) experts",
        "routing indices >= n_routed_experts are identity experts; gate_up_proj keeps unused slabs for them",
    ),
    ExpertsEntry(
        "aria", "aria", "AriaExperts", "aria:AriaAdapter",
        "fc1/fc2 grouped GEMM [E,in,out], routing inside",
        "weights live in AriaGroupedExpertsGemm children and the block routes from router logits itself",
    ),
    ExpertsEntry(
        "jetmoe", "jetmoe", "JetMoeParallelExperts", "parallel:ParallelLinearAdapter",
        "parallel single linears [E,out,in], grouped input",
        "one packed projection per expert (MoE input/output and MoA attention experts), grouped by expert_size",
        attrs=("input_linear", "output_linear"),
    ),
    ExpertsEntry(
        "step3p7", "step3p7", "Step3p7Experts", "base:gated_concat",
        "gated/concat/[E,out,in] (clamped gate)",
        "a standard layout whose class is not decorated; its _apply_gate clamps",
    ),
)

@dataclass(frozen=True)
class SharedExpertListEntry:
    """A family whose per-expert checkpoint numbers the experts of several blocks in one list
    (``experts.{i}``), first block's experts first; the pre-load patch splits the list."""

    family: str
    groups: tuple[str, ...]  # the blocks' attribute names, in list order
    why: str


SHARED_EXPERT_LISTS: tuple[SharedExpertListEntry, ...] = (
    SharedExpertListEntry(
        "ernie4_5_vl_moe", ("text_moe", "vision_moe"),
        "checkpoints list text experts then vision experts as mlp.experts.{i}; Transformers fuses them with "
        "ErnieFuseAndSplitTextVisionExperts",
    ),
)


def shared_expert_list(model_type: str) -> SharedExpertListEntry | None:
    """The shared expert list entry of ``model_type``, else None."""
    return next((e for e in SHARED_EXPERT_LISTS if e.family == model_type), None)


DENSE_MLP_ENTRIES: tuple[DenseMlpEntry, ...] = (
    DenseMlpEntry("dia", "dia", "DiaMLP"),
    DenseMlpEntry("dots3_note", "dots3_note", "Dots3NoteAudioMLP", needs="5.24.0"),
    DenseMlpEntry("esmfold2", "esmfold2", "EsmFold2SwiGLU"),
    DenseMlpEntry("glm", "glm", "GlmMLP"),
    DenseMlpEntry("glm4", "glm4", "Glm4MLP"),
    DenseMlpEntry("glm4v", "glm4v", "Glm4vTextMLP"),
    DenseMlpEntry("glm_image", "glm_image", "GlmImageTextMLP"),
    DenseMlpEntry("glm_ocr", "glm_ocr", "GlmOcrTextMLP"),
    DenseMlpEntry("minimax_m3_vl", "minimax_m3_vl", "MiniMaxM3VLDenseMLP"),
    DenseMlpEntry("phi3", "phi3", "Phi3MLP"),
    DenseMlpEntry("phi4_multimodal", "phi4_multimodal", "Phi4MultimodalMLP"),
    DenseMlpEntry("phi4_multimodal", "phi4_multimodal", "Phi4MultimodalAudioMLP", gate_first=False),
    DenseMlpEntry("zamba2", "zamba2", "Zamba2MLP"),
)


def _by_class(cls: type, table: dict[str, Any]) -> Any | None:
    for klass in getattr(cls, "__mro__", ()):
        found = table.get(f"{klass.__module__}.{klass.__qualname__}")
        if found is not None:
            return found
    return None


@functools.lru_cache(maxsize=None)
def _experts_table() -> dict[str, ExpertsEntry]:
    return {e.qualified_name: e for e in EXPERTS_ENTRIES}


@functools.lru_cache(maxsize=None)
def _dense_table() -> dict[str, DenseMlpEntry]:
    return {e.qualified_name: e for e in DENSE_MLP_ENTRIES}


def experts_entry_for(cls: type) -> ExpertsEntry | None:
    """The explicit entry for an experts class (or a subclass of one), else None; None too when
    the class is decorated with ``@use_experts_implementation`` (the entry describes the
    undecorated structure it had before)."""
    if declared_flags_of_class(cls) is not None:
        return None
    return _by_class(cls, _experts_table())


def entry_active(entry: ExpertsEntry | DenseMlpEntry) -> bool:
    """True when the installed Transformers has the entry's class with the structure it describes."""
    cls = resolve_class(entry.qualified_name)
    if cls is None:
        return False
    return dense_entry_for(cls) is entry if isinstance(entry, DenseMlpEntry) else experts_entry_for(cls) is entry


def dense_entry_for(cls: type) -> DenseMlpEntry | None:
    """The dense fused MLP entry for ``cls`` (or a subclass of one), else None."""
    return _by_class(cls, _dense_table())


@functools.lru_cache(maxsize=None)
def adapter_of(entry: ExpertsEntry) -> Any:
    """The adapter object of ``entry`` (imported on first use)."""
    module_name, _, factory = entry.adapter.partition(":")
    module = importlib.import_module(f"{__package__}.irregular.{module_name}")
    adapter = getattr(module, factory)()
    adapter.family = entry.family
    return adapter


def resolve_class(qualified_name: str) -> type | None:
    """The class named ``qualified_name`` in the installed Transformers, or None."""
    module_name, _, class_name = qualified_name.rpartition(".")
    try:
        return getattr(importlib.import_module(module_name), class_name, None)
    except ImportError:
        return None
