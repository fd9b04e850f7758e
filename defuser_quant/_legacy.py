"""Module paths from before the ``core/`` layout (0.1.0.dev0, first round), kept importable.

Models pickled with ``torch.save`` name the factories of their generated classes by module
(``defuser_quant.patching.defused_class_for``, ``defuser_quant.integrations.llmcompressor_linearize
.linear_experts_class_for``, ...), and code written against the flat layout imports
``defuser_quant.fuse`` and friends. An import of an old path returns the module at its new
path (the same module object, so classes and registries are not duplicated) with a
``DeprecationWarning`` naming the new path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

_CORE = (
    "defuse defused dense discovery errors families filters fuse generated layout naming offload "
    "patching progress report slicing split_ops tensors irregular"
).split()
_GPTQMODEL = "calibration compat definitions loader naming refuse storage trace".split()
_LLMCOMPRESSOR = "compat linearize modifier refuse".split()

MOVED: dict[str, str] = {
    **{f"defuser_quant.{m}": f"defuser_quant.core.{m}" for m in _CORE},
    **{f"defuser_quant.irregular.{m}": f"defuser_quant.core.irregular.{m}" for m in ("aria", "base", "batched", "dbrx", "identity", "parallel")},
    "defuser_quant.support": "defuser_quant.tools.families_table",
    "defuser_quant.inspect_model": "defuser_quant.tools.inspect_model",
    "defuser_quant.demo": "defuser_quant.tools.demo",
    **{f"defuser_quant.integrations.gptqmodel_{m}": f"defuser_quant.integrations.gptqmodel.{m}" for m in _GPTQMODEL},
    **{f"defuser_quant.integrations.llmcompressor_{m}": f"defuser_quant.integrations.llmcompressor.{m}" for m in _LLMCOMPRESSOR},
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        module = importlib.import_module(self.target)
        self._real_spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        # Already executed under its new name; the import system stamped the alias spec on it.
        module.__spec__ = self._real_spec


class _MovedModuleFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None) -> importlib.machinery.ModuleSpec | None:
        new = MOVED.get(fullname)
        if new is None:
            return None
        warnings.warn(f"{fullname} moved to {new}; import it from there", DeprecationWarning, stacklevel=2)
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


_FINDER = _MovedModuleFinder()


def install() -> None:
    """Make the old module paths importable (idempotent; done by ``import defuser_quant``)."""
    if _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)  # before the path finder, which would load a second copy of a submodule
