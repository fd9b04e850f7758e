"""Run the benchmarks from a plain source checkout (``PYTHONPATH=.``), without ``pip install -e .``.

The wheel ships ``integrations/`` and ``calibration/`` as ``defuser_quant.integrations`` and
``defuser_quant.calibration`` (setuptools ``package-dir``); an installed package maps them
itself, a source checkout on ``PYTHONPATH`` does not. ``use_source_checkout()`` maps them then.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def use_source_checkout() -> None:
    """Make ``defuser_quant.calibration`` and ``defuser_quant.integrations`` importable."""
    import defuser_quant

    for sub in ("calibration", "integrations"):
        name = f"defuser_quant.{sub}"
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            spec = importlib.util.spec_from_file_location(
                name, ROOT / sub / "__init__.py", submodule_search_locations=[str(ROOT / sub)]
            )
            module = importlib.util.module_from_spec(spec)
            sys.modules[name] = module
            spec.loader.exec_module(module)
            setattr(defuser_quant, sub, module)
