"""The version pin of the llm-compressor integration and the check that enforces it.

The integration reaches into llm-compressor internals (``LinearExperts2D._registry``, the
``ModifierFactory`` registered-modifiers table, ``HooksMixin``'s disable flag, the session's
recipe), all checked against one release. This module imports nothing from llm-compressor:
it reads the installed version from the package metadata.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import metadata

from defuser_quant.core.errors import DefuserQuantError

LLMCOMPRESSOR_VERSION = "0.14.0.1"
COMPRESSED_TENSORS_VERSION = "0.19.0"
INSTALL_COMMAND = (
    "pip install 'defuser-quant[llmcompressor]'   "
    f"# or: pip install llmcompressor=={LLMCOMPRESSOR_VERSION} compressed-tensors=={COMPRESSED_TENSORS_VERSION}"
)


class LlmCompressorUnavailableError(DefuserQuantError, ImportError):
    """llm-compressor is missing or is not the pinned release."""


def _installed(distribution: str, version_of: Callable[[str], str]) -> str | None:
    try:
        return version_of(distribution)
    except metadata.PackageNotFoundError:
        return None


def check_llmcompressor(version_of: Callable[[str], str] = metadata.version) -> str:
    """Check that ``llmcompressor==0.14.0.1`` is installed; return its version.

    Args:
        version_of: distribution name -> version (``importlib.metadata.version``; injectable
            for tests).

    Raises:
        LlmCompressorUnavailableError: (an ``ImportError``) naming the pin and the install command.
    """
    found = _installed("llmcompressor", version_of)
    if found is None:
        raise LlmCompressorUnavailableError(
            f"the llm-compressor integration needs llmcompressor=={LLMCOMPRESSOR_VERSION}, which is not installed. "
            f"Install it with: {INSTALL_COMMAND}"
        )
    if found != LLMCOMPRESSOR_VERSION:
        raise LlmCompressorUnavailableError(
            f"the llm-compressor integration supports llmcompressor=={LLMCOMPRESSOR_VERSION}, found {found}: it hooks "
            f"internals (MoE linearization registry, modifier factory) checked against that release only. "
            f"Install the pinned release with: {INSTALL_COMMAND}"
        )
    return found
