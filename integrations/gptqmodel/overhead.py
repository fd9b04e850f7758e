"""Cheaper GPTQModel per-module host bookkeeping for defused expert projections.

GPTQModel 7.6 does a few things once per quantized module whose cost grows with the size of the
model, not of the module. With a few hundred expert projections per layer they dominate a run
(two Qwen3-30B-A3B layers: 776 modules). Inside :func:`lean_bookkeeping` (entered by
``quantize_with_defuser``; everything restored on exit, also on an exception or Ctrl-C), for the
expert projections of our ``DefusedExperts`` blocks only:

* **materialize** (``BaseQModel.shell_module_materialize``, role ``forward``, from the lazy
  checkpoint source ``LazyTurtle``): GPTQModel finds the module's path with a scan of
  ``model.named_modules()`` twice per module (``_get_qualified_name``). Here the path GPTQModel
  already knows (``NamedModule.full_name``) is handed over, after checking that it names exactly
  that module. ``tie_weights()`` of the whole model after each module is skipped when the model
  has no tied weights at all (the tying mapping is empty: the call would do nothing), and the
  one-module "Loading checkpoint tensors" progress bar is not drawn.
* **offload** (``offload_to_disk`` of each finalized module): the module's path comes from the
  quantized module's own ``name`` (its full path) after the same identity check, instead of a
  ``named_modules()`` scan. The bundle written to disk is GPTQModel's, unchanged.
* **progress** (LogBar, GPTQModel's progress/log renderer, for every row and bar): each render
  asks ``_running_in_notebook_environment()``, which tries ``from IPython import get_ipython``;
  without IPython installed that failed import searches ``sys.path`` again every time (tens of
  thousands of ``stat`` calls per run). When IPython is not installed, the answer is computed once
  per value of the environment variables it reads and reused: the same answer, nothing drawn
  differently.

GPTQModel computes and writes exactly what it does without this (same tensors loaded, same
checkpoint). Anything that does not match (another role, a module outside our blocks, a path
that names another module, no lazy source) takes GPTQModel's own path. Before patching, the
GPTQModel internals this relies on are checked (signatures and the globals the functions look
up); when they differ, a warning names what differs and that part stays stock.
"""

from __future__ import annotations

import functools
import inspect
import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from defuser_quant.calibration.capture import defused_blocks

from .compat import patched

logger = logging.getLogger(__name__)

__all__ = ["BookkeepingStats", "expert_projection_paths", "internals_mismatch", "lean_bookkeeping"]


@dataclass
class BookkeepingStats:
    """What :func:`lean_bookkeeping` did in one run."""

    materialize_fast: int = 0
    offload_fast: int = 0
    tie_weights_skipped: int = 0
    stock: Counter = field(default_factory=Counter)  # "materialize: <reason>" / "offload: <reason>" -> calls
    disabled: dict[str, str] = field(default_factory=dict)  # part -> why it stayed stock

    def as_dict(self) -> dict[str, Any]:
        return {
            "materialize_fast": self.materialize_fast,
            "offload_fast": self.offload_fast,
            "tie_weights_skipped": self.tie_weights_skipped,
            "stock": dict(self.stock),
            "disabled": dict(self.disabled),
        }


def expert_projection_paths(model: nn.Module) -> frozenset[str]:
    """Full module paths of every expert projection of the ``DefusedExperts`` blocks of ``model``."""
    paths = set()
    for path, block in defused_blocks(model):
        for e, expert in enumerate(block):
            for name in expert.names.as_tuple():
                paths.add(f"{path}.{e}.{name}")
    return frozenset(paths)


# ----- what the patches rely on ----------------------------------------------------------------
def _params(fn: Callable) -> set[str]:
    try:
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


def _names(fn: Callable) -> set[str]:
    code = getattr(inspect.unwrap(fn), "__code__", None)
    return set(code.co_names) if code is not None else set()


def internals_mismatch() -> dict[str, str]:
    """Part (``materialize``/``offload``/``progress``) -> what differs from the GPTQModel 7.6 internals it patches."""
    from gptqmodel.models.base import BaseQModel
    from gptqmodel.utils import offload, structure

    problems: dict[str, str] = {}
    turtle = getattr(structure, "LazyTurtle", None)
    shell = getattr(BaseQModel, "shell_module_materialize", None)
    qualified = getattr(structure, "_get_qualified_name", None)
    if turtle is None or shell is None or qualified is None:
        problems["materialize"] = "LazyTurtle, BaseQModel.shell_module_materialize or structure._get_qualified_name is missing"
    else:
        need_shell = {"target_submodule", "device", "non_blocking", "role", "named_module", "module_path"}
        need_turtle = {"target_model", "target_submodule", "module_path", "tie_weights", "show_progress"}
        checks = [
            (need_shell <= _params(shell), f"shell_module_materialize parameters {sorted(need_shell)}"),
            ({"_turtle_lock", "turtle_materialize_tie_weights", "alias_from_turtle_for_submodule"} <= _names(shell),
             "shell_module_materialize uses _turtle_lock, turtle_materialize_tie_weights, alias_from_turtle_for_submodule"),
            (need_turtle <= _params(turtle.materialize_submodule), f"LazyTurtle.materialize_submodule parameters {sorted(need_turtle)}"),
            ({"_get_qualified_name", "tie_weights"} <= _names(turtle.materialize_submodule),
             "LazyTurtle.materialize_submodule looks up _get_qualified_name and calls tie_weights"),
            ("_get_qualified_name" in _names(getattr(turtle, "checkpoint_tensors_for_submodule", lambda: None)),
             "LazyTurtle.checkpoint_tensors_for_submodule looks up _get_qualified_name"),
            (_params(qualified) == {"root", "obj"}, "structure._get_qualified_name(root, obj)"),
        ]
        failed = [what for ok, what in checks if not ok]
        if failed:
            problems["materialize"] = "expected " + "; ".join(failed)
    fullname = getattr(offload, "get_module_fullname", None)
    impl = getattr(offload, "_offload_to_disk_impl", None)
    if fullname is None or impl is None:
        problems["offload"] = "gptqmodel.utils.offload.get_module_fullname or _offload_to_disk_impl is missing"
    elif _params(fullname) != {"model", "module"} or "get_module_fullname" not in _names(impl):
        problems["offload"] = "expected offload.get_module_fullname(model, module), looked up by _offload_to_disk_impl"
    try:
        from logbar import logbar as logbar_module
        from logbar import progress as logbar_progress
    except ImportError:
        problems["progress"] = "logbar is not importable"
        return problems
    check = getattr(logbar_module, "_running_in_notebook_environment", None)
    if check is None or getattr(logbar_progress, "_running_in_notebook_environment", None) is not check or _params(check):
        problems["progress"] = "expected logbar.logbar._running_in_notebook_environment(), imported by logbar.progress"
    elif "IPython" not in _names(check):
        problems["progress"] = "expected logbar's notebook check to import IPython"
    return problems


#: Environment variables LogBar's notebook check reads (logbar 0.4).
_NOTEBOOK_ENV = ("LOGBAR_DISABLE_NOTEBOOK_DETECTION", "LOGBAR_FORCE_NOTEBOOK_MODE", "JPY_PARENT_PID", "IPYKERNEL_PARENT_PID")


def _ipython_missing() -> bool:
    import importlib.util
    import sys

    if "IPython" in sys.modules:
        return False
    try:
        return importlib.util.find_spec("IPython") is None
    except (ImportError, ValueError):
        return False


def _memo_notebook_check(original: Callable) -> Callable:
    """``original()`` once per value of the variables it reads (valid while IPython is not installed)."""
    import os

    answers: dict[tuple, bool] = {}

    @functools.wraps(original)
    def _running_in_notebook_environment() -> bool:
        key = tuple(os.environ.get(k) for k in _NOTEBOOK_ENV)
        answer = answers.get(key)
        if answer is None:
            answer = answers[key] = original()
        return answer

    return _running_in_notebook_environment


# ----- the patches ---------------------------------------------------------------------------
class _Lean:
    """State shared by the patched functions of one :func:`lean_bookkeeping` block."""

    def __init__(self, gptq_model: Any, expert_paths: frozenset[str], skip_tie: bool, stats: BookkeepingStats):
        self.gptq_model = gptq_model
        self.model = gptq_model.model
        self.expert_paths = expert_paths
        self.skip_tie = skip_tie
        self.stats = stats
        self.lock = threading.Lock()
        self.local = threading.local()  # .hint: (root, target, path) while one materialize runs

    def _stock(self, reason: str) -> None:
        with self.lock:
            self.stats.stock[reason] += 1

    def _resolves(self, path: str, module: nn.Module) -> bool:
        try:
            return self.model.get_submodule(path) is module
        except AttributeError:
            return False

    # BaseQModel.shell_module_materialize
    def materialize(self, original: Callable) -> Callable:
        from gptqmodel.utils.structure import LazyTurtle

        lean = self

        @functools.wraps(original)
        def shell_module_materialize(self, target_submodule, device, non_blocking=False, role="default",
                                     named_module=None, module_path=None):
            def stock(reason: str | None):
                if reason is not None:
                    lean._stock(f"materialize: {reason}")
                return original(self, target_submodule=target_submodule, device=device, non_blocking=non_blocking,
                                role=role, named_module=named_module, module_path=module_path)

            if self is not lean.gptq_model or role != "forward" or named_module is None:
                return stock(None)  # not an expert projection's forward preparation
            path = getattr(named_module, "full_name", None)
            if path not in lean.expert_paths:
                return stock(None)
            if not isinstance(self.turtle_model, LazyTurtle):
                return stock("no lazy checkpoint source")
            if module_path is not None and module_path != path:
                return stock("caller passed another module_path")
            if not lean._resolves(path, target_submodule):
                return stock("NamedModule.full_name does not name the module")
            with self._turtle_lock:  # GPTQModel's own (reentrant) lock: no other thread sees the hint
                lean.local.hint = (self.model, target_submodule, path)
                try:
                    result = original(self, target_submodule=target_submodule, device=device, non_blocking=non_blocking,
                                      role=role, named_module=named_module, module_path=path)
                finally:
                    lean.local.hint = None
            with lean.lock:
                lean.stats.materialize_fast += 1
            return result

        return shell_module_materialize

    # structure._get_qualified_name
    def qualified_name(self, original: Callable) -> Callable:
        lean = self

        @functools.wraps(original)
        def _get_qualified_name(root, obj):
            hint = getattr(lean.local, "hint", None)
            if hint is not None and hint[0] is root and hint[1] is obj:
                return hint[2]
            return original(root, obj)

        return _get_qualified_name

    # LazyTurtle.materialize_submodule
    def turtle_materialize(self, original: Callable) -> Callable:
        lean = self

        @functools.wraps(original)
        def materialize_submodule(self, *, target_model, target_submodule, **kwargs):
            hint = getattr(lean.local, "hint", None)
            if hint is not None and hint[0] is target_model and hint[1] is target_submodule:
                kwargs["show_progress"] = False  # a one-module bar, drawn and gone within milliseconds
                if lean.skip_tie and kwargs.get("tie_weights", True):
                    kwargs["tie_weights"] = False  # the model ties nothing: tie_weights() would do nothing
                    with lean.lock:
                        lean.stats.tie_weights_skipped += 1
            return original(self, target_model=target_model, target_submodule=target_submodule, **kwargs)

        return materialize_submodule

    # offload.get_module_fullname
    def module_fullname(self, original: Callable) -> Callable:
        lean = self

        @functools.wraps(original)
        def get_module_fullname(model, module):
            name = getattr(module, "name", None)
            if model is lean.model and isinstance(name, str) and name in lean.expert_paths and lean._resolves(name, module):
                with lean.lock:
                    lean.stats.offload_fast += 1
                return name
            return original(model, module)

        return get_module_fullname


def _ties_nothing(model: nn.Module) -> bool:
    """True when ``model.tie_weights()`` has nothing to tie (Transformers 5: an empty tying mapping)."""
    expand = getattr(model, "get_expanded_tied_weights_keys", None)
    if expand is None:
        return False
    try:
        return not expand(all_submodels=True)
    except Exception:  # an unexpected model: keep GPTQModel's tie_weights()
        return False


@contextmanager
def lean_bookkeeping(gptq_model: Any) -> Iterator[BookkeepingStats]:
    """Inside the block, GPTQModel's per-module materialize and offload bookkeeping of the expert
    projections of ``gptq_model`` (a GPTQModel model) skips its whole-model scans (see the module
    docstring). Restored on exit."""
    from gptqmodel.models.base import BaseQModel
    from gptqmodel.utils import offload, structure

    stats = BookkeepingStats()
    problems = internals_mismatch()
    for part, why in problems.items():
        stats.disabled[part] = why
        logger.warning(
            "GPTQModel's internals differ from what defuser-quant's lean %s bookkeeping expects (%s); "
            "GPTQModel's own per-module %s runs (same result, slower)", part, why, part,
        )
    paths = expert_projection_paths(gptq_model.model)
    lean = _Lean(gptq_model, paths, _ties_nothing(gptq_model.model), stats)
    with ExitStack() as stack:
        if paths and "materialize" not in problems:
            stack.enter_context(patched(BaseQModel, "shell_module_materialize", lean.materialize(BaseQModel.shell_module_materialize)))
            stack.enter_context(patched(structure, "_get_qualified_name", lean.qualified_name(structure._get_qualified_name)))
            turtle = structure.LazyTurtle
            stack.enter_context(patched(turtle, "materialize_submodule", lean.turtle_materialize(turtle.materialize_submodule)))
        if paths and "offload" not in problems:
            stack.enter_context(patched(offload, "get_module_fullname", lean.module_fullname(offload.get_module_fullname)))
        if "progress" not in problems and _ipython_missing():
            from logbar import logbar as logbar_module
            from logbar import progress as logbar_progress

            memo = _memo_notebook_check(logbar_module._running_in_notebook_environment)
            stack.enter_context(patched(logbar_module, "_running_in_notebook_environment", memo))
            stack.enter_context(patched(logbar_progress, "_running_in_notebook_environment", memo))
        yield stats
    if stats.stock:
        logger.debug("lean bookkeeping left to GPTQModel: %s", dict(stats.stock))
