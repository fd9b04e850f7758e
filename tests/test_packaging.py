"""The wheel must ship every package of the tree (pyproject lists them explicitly)."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_listed_in_pyproject():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    roots = {name: REPO / folder for name, folder in config["package-dir"].items()}
    found = set()
    for name, root in roots.items():
        for init in root.rglob("__init__.py"):
            if "__pycache__" in init.parts:
                continue
            rel = init.parent.relative_to(root).parts
            found.add(".".join((name, *rel)))
    assert found == listed, f"missing from pyproject: {sorted(found - listed)}; stale: {sorted(listed - found)}"


def test_default_job_and_assets_are_package_data():
    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["defuser_quant"]
    assert "jobs/*.yaml" in data


def test_built_wheel_contains_the_default_job_model_and_corpus(tmp_path):
    import subprocess
    import sys
    import zipfile

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
        check=True, capture_output=True, timeout=300,
    )
    (wheel,) = tmp_path.glob("defuser_quant-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in (
        "defuser_quant/jobs/default.yaml",
        "defuser_quant/assets/tiny-qwen3-moe/model.safetensors",
        "defuser_quant/assets/tiny-qwen3-moe/tokenizer.json",
        "defuser_quant/assets/corpus/train.txt",
        "defuser_quant/assets/corpus/LICENSE.md",
        "defuser_quant/integrations/llmcompressor.py",
        "defuser_quant/calibration/routing.py",
        "defuser_quant/irregular/__init__.py",
    ):
        assert needed in names, needed


def test_every_source_file_compiles_without_warnings():
    """Invalid escapes in docstrings are a SyntaxWarning on Python 3.12 (an error later)."""
    import warnings

    checked = 0
    for folder in ("defuser_quant", "calibration", "integrations", "benchmarks", "scripts", "tests"):
        for path in sorted((REPO / folder).rglob("*.py")):
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                compile(path.read_text(encoding="utf-8"), str(path), "exec")
            checked += 1
    assert checked > 50
