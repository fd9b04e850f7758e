"""The one place that imports GPTQModel: lazy import plus the version pin.

The plugin reaches into GPTQModel internals (``gptqmodel.models.loader``'s ``defuser`` global,
``gptqmodel.models.auto.MODEL_MAP``, the writer's ``get_state_dict_for_save``), so it supports
exactly the release series those were checked against: 7.6 (pinned, tested in CI) and 7.7, whose
seams are the same (docs/gptqmodel.md, "GPTQModel 7.7").
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import CodeType, ModuleType
from typing import Any

from defuser_quant.core.errors import DefuserQuantError

GPTQMODEL_PIN = "gptqmodel==7.6.0"
SUPPORTED_SERIES = ((7, 6), (7, 7))
INSTALL_COMMAND = "pip install 'defuser-quant[gptqmodel]'   # or: pip install gptqmodel==7.6.0"


class GPTQModelUnavailableError(DefuserQuantError, ImportError):
    """GPTQModel is missing or is not the release series this plugin supports."""


def installed_version(module: ModuleType) -> str:
    """The version string of an imported ``gptqmodel`` module ("unknown" when it has none)."""
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version("gptqmodel")
        except Exception:  # pragma: no cover - broken installs only
            version = "unknown"
    return str(version)


def _series(version: str) -> tuple[int, ...] | None:
    try:
        return tuple(int(p) for p in version.split("+")[0].split(".")[:2])
    except ValueError:
        return None


def require_gptqmodel() -> ModuleType:
    """Import ``gptqmodel`` and check it is a 7.6.x or 7.7.x release.

    Raises:
        GPTQModelUnavailableError: (an ``ImportError``) naming the pin and the install command.
    """
    try:
        module = importlib.import_module("gptqmodel")
    except ImportError as exc:
        raise GPTQModelUnavailableError(
            f"the GPTQModel plugin needs {GPTQMODEL_PIN}, which is not importable ({exc}). Install it with: "
            f"{INSTALL_COMMAND}"
        ) from exc
    version = installed_version(module)
    if _series(version) not in SUPPORTED_SERIES:
        raise GPTQModelUnavailableError(
            f"the GPTQModel plugin supports {GPTQMODEL_PIN} (7.6.x; 7.7.x also works), found gptqmodel {version}: it "
            f"patches loader internals checked against 7.6 and 7.7 only. Install the pinned release with: {INSTALL_COMMAND}"
        )
    return module


@contextmanager
def patched(owner: Any, name: str, value: Any) -> Iterator[None]:
    """``owner.name = value`` (a class or module attribute) inside the block, restored on exit;
    an attribute the class only inherited is deleted again, so it is inherited again."""
    missing = object()
    saved = vars(owner).get(name, missing)
    setattr(owner, name, value)
    try:
        yield
    finally:
        if saved is missing:
            delattr(owner, name)
        else:
            setattr(owner, name, saved)


def parameter_names(fn: Callable) -> set[str]:
    """The names of ``fn``'s parameters (empty when it has no signature to read)."""
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def code_names(fn: Callable) -> set[str]:
    """Global/attribute names ``fn`` (unwrapped) looks up."""
    code = getattr(inspect.unwrap(fn), "__code__", None)
    return set(code.co_names) if code is not None else set()


def _codes(fn: Callable) -> Iterator[CodeType]:
    """``fn``'s code (unwrapped) and every code nested in it (generator expressions, inner functions)."""
    todo = [getattr(inspect.unwrap(fn), "__code__", None)]
    while todo:
        code = todo.pop()
        if code is not None:
            yield code
            todo.extend(c for c in code.co_consts if isinstance(c, CodeType))


def all_code_names(fn: Callable) -> set[str]:
    """Global/attribute names ``fn`` and its nested code look up."""
    return {name for code in _codes(fn) for name in code.co_names}


def code_strings(fn: Callable) -> set[str]:
    """The string constants of ``fn`` and its nested code."""
    return {c for code in _codes(fn) for c in code.co_consts if isinstance(c, str)}


def source_digest(fn: Callable) -> str | None:
    """sha256[:16] of ``fn``'s source (unwrapped), to tell GPTQModel's own function from another
    release's or a patch's; None when there is no source to read. Remembered per function object
    (``inspect.getsource`` tokenizes the whole function: about 2 ms each, 38 calls before a run)."""
    unwrapped = inspect.unwrap(fn)
    try:
        return _digest_of(unwrapped)
    except TypeError:  # not hashable: read it each time
        return _read_digest(unwrapped)


def _read_digest(fn: Callable) -> str | None:
    try:
        return hashlib.sha256(inspect.getsource(fn).encode()).hexdigest()[:16]
    except (OSError, TypeError):
        return None


_digest_of = functools.lru_cache(maxsize=512)(_read_digest)
