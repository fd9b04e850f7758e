"""The docs quote only result files that are committed: every ``benchmarks/results/...`` path and
every bare result-file name (``*_cpu*.json``, ``*_cuda*.json``, ...) in README.md and docs/*.md exists."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PATH = re.compile(r"benchmarks/results/([\w.\-]+\.(?:json|txt|log|md))")
BARE = re.compile(r"`([\w.\-]*(?:_cpu|_cuda|_h200)[\w.\-]*\.(?:json|txt|log))`")


def _quoted(text: str) -> set[str]:
    return set(PATH.findall(text)) | set(BARE.findall(text))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_quoted_result_files_exist(doc):
    missing = sorted(name for name in _quoted(doc.read_text(encoding="utf-8")) if not (RESULTS / name).is_file())
    assert not missing, f"{doc.name} quotes result files that are not in benchmarks/results: {missing}"


def test_the_check_sees_the_quotes():
    names = _quoted((ROOT / "README.md").read_text(encoding="utf-8"))
    assert "distributed_cuda_round5b.json" in names and "gptqmodel_cuda_2layers_round5.json" in names
    assert not _quoted("`coverage.json` and `config.json`")
