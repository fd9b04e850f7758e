"""The import rule of docs/architecture.md, read from the sources (module- and function-level).

Every ``import`` and ``from ... import`` statement anywhere in a module counts, including those
inside functions and under ``TYPE_CHECKING``: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Source folder -> the package name it ships as (pyproject's package-dir mapping).
ROOTS = {"defuser_quant": "defuser_quant", "integrations": "defuser_quant.integrations", "calibration": "defuser_quant.calibration"}

# Layer -> the layers its modules may import. A module's layer is the longest prefix listed here.
ALLOWED: dict[str, set[str]] = {
    "defuser_quant.core": {"defuser_quant.core"},
    "defuser_quant.calibration": {"defuser_quant.core", "defuser_quant.calibration", "defuser_quant.assets"},
    "defuser_quant.checkpoint": {"defuser_quant.core", "defuser_quant.checkpoint"},
    "defuser_quant.loading": {"defuser_quant.core", "defuser_quant.checkpoint", "defuser_quant.loading"},
    "defuser_quant.integrations.gptqmodel": {
        "defuser_quant.core", "defuser_quant.calibration", "defuser_quant.checkpoint", "defuser_quant.integrations.gptqmodel",
    },
    "defuser_quant.integrations.llmcompressor": {
        "defuser_quant.core", "defuser_quant.calibration", "defuser_quant.checkpoint", "defuser_quant.integrations.llmcompressor",
    },
    "defuser_quant.integrations": set(),
    "defuser_quant.tools": {"defuser_quant.core", "defuser_quant.checkpoint", "defuser_quant.tools", "defuser_quant.assets"},
    "defuser_quant.jobs": {
        "defuser_quant.core", "defuser_quant.calibration", "defuser_quant.checkpoint", "defuser_quant.integrations.gptqmodel",
        "defuser_quant.integrations.llmcompressor", "defuser_quant.tools", "defuser_quant.jobs", "defuser_quant.assets",
    },
    "defuser_quant.cli": {
        "defuser_quant.core", "defuser_quant.calibration", "defuser_quant.checkpoint", "defuser_quant.tools", "defuser_quant.jobs",
        "defuser_quant.cli", "defuser_quant.assets",
    },
    "defuser_quant.assets": set(),
    "defuser_quant.compat": {"defuser_quant.core", "defuser_quant.compat"},
    "defuser_quant": {"*"},  # the public API, __main__ and the old-path aliases
}
# Third-party packages a layer must never import (the core is torch + transformers only).
QUANTIZERS = {"gptqmodel", "llmcompressor", "compressed_tensors", "defuser", "optimum"}
FORBIDDEN_EXTERNAL: dict[str, set[str]] = {
    "defuser_quant.core": QUANTIZERS | {"datasets", "matplotlib", "tokenizers"},
    "defuser_quant.calibration": QUANTIZERS,
    "defuser_quant.checkpoint": {"gptqmodel", "llmcompressor", "defuser"},
    "defuser_quant.tools": QUANTIZERS,
    "defuser_quant.compat": QUANTIZERS,  # it stands in for defuser: never imports it
    "defuser_quant.integrations.gptqmodel": {"llmcompressor"},
    "defuser_quant.integrations.llmcompressor": {"gptqmodel", "defuser"},
}


def _modules() -> dict[str, Path]:
    found = {}
    for folder, package in ROOTS.items():
        for path in (REPO / folder).rglob("*.py"):
            parts = list(path.relative_to(REPO / folder).with_suffix("").parts)
            is_package = parts[-1] == "__init__"
            if is_package:
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


MODULES = _modules()
PACKAGES = {name for name, path in MODULES.items() if path.name == "__init__.py"}


def _resolve(module: str, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".") if module in PACKAGES else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _known(name: str) -> str | None:
    """The longest known module that ``name`` is or lies in."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in MODULES:
            return candidate
    return None


def imports_of(module: str) -> tuple[set[str], set[str]]:
    """(our modules, top-level third-party packages) that ``module`` imports anywhere in its body."""
    tree = ast.parse(MODULES[module].read_text())
    ours: set[str] = set()
    external: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(module, node.level, node.module)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
        for target in targets:
            if target.split(".")[0] == "defuser_quant":
                known = _known(target)
                assert known is not None, f"{module} imports {target}, which is not a module of ours"
                if known != module:
                    ours.add(known)
            else:
                external.add(target.split(".")[0])
    return ours, external


def layer_of(module: str) -> str:
    return max((layer for layer in ALLOWED if module == layer or module.startswith(layer + ".")), key=len)


def test_the_tree_has_the_layers_the_docs_describe():
    for package in ("defuser_quant.core", "defuser_quant.core.irregular", "defuser_quant.tools", "defuser_quant.checkpoint",
                    "defuser_quant.jobs", "defuser_quant.cli", "defuser_quant.integrations.gptqmodel",
                    "defuser_quant.integrations.llmcompressor", "defuser_quant.calibration", "defuser_quant.compat"):
        assert package in PACKAGES, package
    top_level = sorted(name for name in MODULES if name.count(".") == 1 and name not in PACKAGES)
    assert top_level == ["defuser_quant.__main__", "defuser_quant._legacy"], top_level
    doc = (REPO / "docs" / "architecture.md").read_text()
    for layer in ALLOWED:
        if layer != "defuser_quant":
            assert f"`{layer.removeprefix('defuser_quant.')}" in doc, f"docs/architecture.md does not describe {layer}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_layer_rule(module):
    layer = layer_of(module)
    ours, external = imports_of(module)
    allowed = ALLOWED[layer]
    if "*" not in allowed:
        for target in ours:
            target_layer = layer_of(target)
            assert target_layer in allowed or target_layer == layer, (
                f"{module} ({layer}) imports {target} ({target_layer}); docs/architecture.md allows {sorted(allowed)}"
            )
    bad = external & FORBIDDEN_EXTERNAL.get(layer, set())
    assert not bad, f"{module} ({layer}) imports {sorted(bad)}"


def test_no_import_cycles_including_function_level_imports():
    graph = {module: imports_of(module)[0] for module in MODULES}
    # Tarjan's strongly connected components: any component of more than one module is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph):
        if module not in index:
            visit(module)
    assert not cycles, f"import cycles: {cycles}"


def test_the_rule_checker_sees_function_level_and_relative_imports():
    # The checker itself: defuse.py imports offload inside a function, relatively.
    ours, _ = imports_of("defuser_quant.core.defuse")
    assert "defuser_quant.core.offload" in ours
    ours, _ = imports_of("defuser_quant.integrations.gptqmodel")
    assert "defuser_quant.integrations.gptqmodel.calibration" in ours  # `from . import calibration` in __getattr__
