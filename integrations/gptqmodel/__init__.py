"""GPTQModel loader plugin: make ``GPTQModel.load`` defuse with defuser-quant.

Activate with one line, before ``GPTQModel.load``::

    from defuser_quant.integrations.gptqmodel import install; install()

What ``install()`` changes in the running GPTQModel 7.6 (all undone by :func:`uninstall`):

* ``gptqmodel.models.loader.defuser`` and ``_convert_model_with_defuser`` -> our pre-load
  patching and ``convert_model`` (``integrations.gptqmodel.loader``), with the expert projections named as
  the model definition expects and the definition checked to cover every expert;
* ``gptqmodel.models.auto.check_and_get_model_definition`` -> also generates a definition for
  MoE families GPTQModel has none for (``integrations.gptqmodel.definitions``);
* ``gptqmodel.models.writer.get_state_dict_for_save`` -> first gives unquantized expert weights
  their own storage, so none is dropped as a "shared tensor" (``integrations.gptqmodel.storage``);
* with ``fast_save`` (the default), ``gptqmodel.utils.model._write_shard_file`` -> the same shard
  file written with fewer copies, whole or not at all (``integrations.gptqmodel.shard_writer``),
  and ``gptqmodel.models.writer.alias_all_from_turtle_if_meta`` -> first maps the weights the save
  would re-read whole from the source checkpoint (``integrations.gptqmodel.save_sources``); what
  the last save did: :func:`last_save`;
* ``gptqmodel.models.base.BaseQModel.save`` -> for a model quantized with the ``gc_freeze`` lean part (a default of
  :func:`quantize_with_defuser`), the save runs with the objects alive at its start left out of the interpreter's
  full garbage collections, as the run did (``integrations.gptqmodel.gc_freeze``); any other model's save as before.

GPTQModel 7.6 has no plugin or entry-point mechanism, so these are module-attribute rebinds;
the ``defuser`` package and Transformers' classes are left untouched. Calibration with our
routing modes and coverage report: :func:`quantize_with_defuser`; a float checkpoint of the
native fused classes for evaluation: :func:`save_dequantized_fused`.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from .compat import GPTQMODEL_PIN, INSTALL_COMMAND, GPTQModelUnavailableError, require_gptqmodel
from .loader import DefinitionMismatchError, DefuserQuantShim, check_definition
from .storage import own_expert_storage

logger = logging.getLogger(__name__)

__all__ = [
    "GPTQMODEL_PIN",
    "INSTALL_COMMAND",
    "DefinitionMismatchError",
    "GPTQModelUnavailableError",
    "QuantizeResult",
    "check_definition",
    "generated_definitions",
    "install",
    "is_installed",
    "last_save",
    "own_expert_storage",
    "quantize_with_defuser",
    "register_generated_definition",
    "save_dequantized_fused",
    "shim",
    "uninstall",
    "workable_cpu_pool",
]


@dataclass
class _Installed:
    shim: DefuserQuantShim
    originals: dict[tuple[Any, str], Any]
    save: dict[str, Any] | None = None
    write_threads: int = 1


_STATE: _Installed | None = None


def install(*, delegate_unsupported: bool = True, strict: bool = True, generate_definitions: bool = True,
            fast_save: bool = True, write_threads: int = 1) -> None:
    """Route GPTQModel's defusing through defuser-quant. Idempotent.

    Args:
        delegate_unsupported: model types our core cannot defuse go to the ``defuser`` package
            as before (otherwise they load without defusing).
        strict: raise ``DefinitionMismatchError`` at load when GPTQModel's definition does not
            list every defused expert projection (else warn).
        generate_definitions: generate and register a definition for MoE families GPTQModel
            has none for.
        fast_save: write the save's shards with fewer copies and map weights stored whole in the
            source checkpoint instead of reading them (the same files; kept stock, with a log
            line, where the installed GPTQModel's writer differs from the one checked).
        write_threads: with ``fast_save``, copy each shard's bytes into a shared mapping of its file with this
            many threads (``shard_writer``; the same files); 1, the default, writes them in order.

    Raises:
        GPTQModelUnavailableError: gptqmodel is missing or not 7.6.x (an ``ImportError``).
        ValueError: ``write_threads`` is not a whole number >= 1, or above 1 without ``fast_save``.
    """
    global _STATE
    if not isinstance(write_threads, int) or isinstance(write_threads, bool) or write_threads < 1:
        raise ValueError(f"install: write_threads must be a whole number >= 1, got {write_threads!r}")
    if write_threads > 1 and not fast_save:
        raise ValueError(f"install: write_threads={write_threads} needs fast_save=True (GPTQModel's own writer "
                         "writes in order)")
    require_gptqmodel()
    workable_cpu_pool()
    if _STATE is not None:
        _STATE.shim.delegate_unsupported = delegate_unsupported
        _STATE.shim.strict = strict
        _STATE.write_threads = write_threads
        return
    from gptqmodel.models import auto, loader, writer
    from gptqmodel.models.base import BaseQModel

    from .definitions import definition_lookup
    from .gc_freeze import frozen_save
    from .storage import guarded_state_dict_for_save

    shim = DefuserQuantShim(defuser=loader.defuser, delegate_unsupported=delegate_unsupported, strict=strict)
    replacements: dict[tuple[Any, str], Any] = {
        (loader, "defuser"): shim,
        (loader, "_convert_model_with_defuser"): shim.convert_with_definition,
        (writer, "get_state_dict_for_save"): guarded_state_dict_for_save(writer.get_state_dict_for_save),
        (BaseQModel, "save"): frozen_save(BaseQModel.save),  # frozen like the run for a model quantized with gc_freeze
    }
    if generate_definitions:
        replacements[(auto, "check_and_get_model_definition")] = definition_lookup(auto.check_and_get_model_definition)
    if fast_save:
        replacements.update(_fast_save_replacements())
    originals = {}
    for (module, name), value in replacements.items():
        originals[(module, name)] = getattr(module, name)
        setattr(module, name, value)
    _STATE = _Installed(shim, originals, write_threads=write_threads)
    logger.info("defuser-quant GPTQModel plugin installed")


def _fast_save_replacements() -> dict[tuple[Any, str], Any]:
    from gptqmodel.models import writer
    from gptqmodel.utils import model as model_utils

    from .save_progress import throttled_sync_progress
    from .save_sources import mapped_turtle_sources
    from .shard_writer import ShardWrites, fast_shard_writes

    writes = fast_shard_writes(model_utils._write_shard_file, lambda: _STATE.save["writes"] if _STATE and _STATE.save else None,
                               lambda: _STATE.write_threads if _STATE else 1)
    if writes is model_utils._write_shard_file:
        return {}  # mapping only pays (and is only safe against a save into the source folder) with our writer

    def record(mapped: Any) -> None:
        if _STATE is not None:
            _STATE.save = {"mapped": mapped, "writes": ShardWrites()}

    def record_draws(draws: Any) -> None:  # after record: the sync runs inside the mapping's wrapper
        if _STATE is not None and _STATE.save is not None:
            _STATE.save["draws"] = draws

    sync = throttled_sync_progress(writer.alias_all_from_turtle_if_meta, record_draws)
    return {(model_utils, "_write_shard_file"): writes,
            (writer, "alias_all_from_turtle_if_meta"): mapped_turtle_sources(sync, record)}


def last_save() -> dict[str, Any] | None:
    """What the plugin's save path did in the last GPTQModel save since :func:`install`: parameters
    mapped from the source checkpoint (and why others were not), bytes written by how, progress-bar draws
    rendered and dropped while the lazy source was synced (``draws``); None when
    no save went through it."""
    if _STATE is None or _STATE.save is None:
        return None
    from dataclasses import asdict

    return {name: asdict(value) for name, value in _STATE.save.items()}


def workable_cpu_pool() -> None:
    """GPTQModel 7.6 gives its CPU pool half the cores, and with one worker (1-3 cores) it
    refuses to load ("'model_loader:cpu' requests 2 workers but parent 'cpu' only has 1"). Unless
    the user chose ``GPTQMODEL_CPU_WORKERS``, set 2 before the (lazy) pool exists. :func:`install`
    calls it; a stock GPTQModel run (no plugin) on a small machine needs it too."""
    import gptqmodel

    if os.environ.get("GPTQMODEL_CPU_WORKERS") is not None or getattr(gptqmodel, "_DEVICE_THREAD_POOL", None) is not None:
        return
    if gptqmodel._default_cpu_workers() < 2:
        os.environ["GPTQMODEL_CPU_WORKERS"] = "2"
        logger.info("GPTQMODEL_CPU_WORKERS=2: GPTQModel's CPU pool needs 2 workers to load models")


def uninstall() -> None:
    """Undo :func:`install`: original loader, lookup and writer; generated definitions removed."""
    global _STATE
    if _STATE is None:
        return
    from .definitions import unregister_generated

    for (module, name), value in _STATE.originals.items():
        setattr(module, name, value)
    _STATE.shim.restore()
    unregister_generated()
    _STATE = None
    logger.info("defuser-quant GPTQModel plugin uninstalled")


def is_installed() -> bool:
    """True between :func:`install` and :func:`uninstall`."""
    return _STATE is not None


def shim() -> DefuserQuantShim | None:
    """The active loader shim (its ``calls`` log what GPTQModel asked for), or None."""
    return _STATE.shim if _STATE is not None else None


def register_generated_definition(model_type: str, config: Any | None = None, *, replace: bool = False) -> type:
    """Generate a GPTQModel definition for ``model_type`` from its defused structure and register it.

    ``install()`` does this on demand for families GPTQModel lacks; call it with
    ``replace=True`` to override a GPTQModel definition that does not match the defused
    structure (see ``DefinitionMismatchError``).
    """
    require_gptqmodel()
    from .definitions import register_generated_definition as register

    return register(model_type, config, replace=replace)


def generated_definitions() -> dict[str, type]:
    """Definitions generated so far, by model type."""
    from .definitions import generated_definitions as generated

    return generated()


def __getattr__(name: str) -> Any:
    # Keep the calibration and re-fuse modules (and what they import) out of a plain install().
    if name in ("quantize_with_defuser", "QuantizeResult"):
        from . import calibration

        return getattr(calibration, name)
    if name == "save_dequantized_fused":
        from .refuse import save_dequantized_fused

        return save_dequantized_fused
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
