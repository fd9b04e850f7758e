"""Which quantization format a checkpoint declares, and what loading it needs.

Loading goes through Transformers' own quantizer integrations (GPTQ through optimum and
GPTQModel's kernels, AWQ through GPTQModel, compressed-tensors through compressed-tensors), so a
format is supported here only where one of those keeps per-expert Linears quantized, or, for
fine-grained FP8 (``fp8``), where its fused ``FP8Experts`` can be defused into FP8 Linears.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any

from .errors import LoadError


@dataclass(frozen=True)
class CheckpointFormat:
    """``method`` (Transformers' ``quant_method``, or ``none``) and the packages loading it needs."""

    method: str
    packages: tuple[str, ...] = ()

    @property
    def quantized(self) -> bool:
        return self.method != "none"


# quant_method -> (import names Transformers' integration needs, pip names).
SUPPORTED: dict[str, tuple[tuple[str, ...], str]] = {
    "none": ((), ""),
    "gptq": (("gptqmodel", "optimum"), "gptqmodel optimum"),
    "awq": (("gptqmodel", "accelerate"), "gptqmodel accelerate"),
    "compressed-tensors": (("compressed_tensors",), "compressed-tensors"),
    "fp8": (("accelerate",), "accelerate"),  # Transformers' fine-grained FP8: defused after loading (loading/fp8.py)
}


def checkpoint_format(config: Any) -> CheckpointFormat:
    """The format ``config`` declares; raises ``LoadError`` for formats ``load`` does not handle."""
    qcfg = getattr(config, "quantization_config", None)
    if qcfg is None:
        return CheckpointFormat("none")
    method = (qcfg.get("quant_method") if isinstance(qcfg, dict) else getattr(qcfg, "quant_method", None)) or "unknown"
    method = getattr(method, "value", method)
    if method not in SUPPORTED:
        raise LoadError(
            f"quantization method {method!r} is not supported by defuser_quant.load (supported: "
            f"{', '.join(m for m in SUPPORTED if m != 'none')}, or unquantized)."
        )
    modules, pip_names = SUPPORTED[method]
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise LoadError(f"loading a {method} checkpoint needs {', '.join(missing)}: pip install {pip_names}")
    return CheckpointFormat(method, modules)
