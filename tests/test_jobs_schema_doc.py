"""docs/job-schema.md is generated from the job schema and kept current (issue 14 item 8)."""

from __future__ import annotations

from pathlib import Path

from defuser_quant.jobs.config import SCHEMA_DOC, JobConfig
from defuser_quant.jobs.schema_doc import render

REPO = Path(__file__).resolve().parents[1]


def test_schema_page_is_current():
    page = REPO / SCHEMA_DOC
    assert page.read_text() == render(), "regenerate: python -m defuser_quant.jobs.schema_doc --write docs/job-schema.md"


def test_schema_page_lists_every_field():
    text = render()

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            sub = field.annotation if isinstance(field.annotation, type) and hasattr(field.annotation, "model_fields") else None
            if sub is not None:
                assert f"## `{prefix}{name}`" in text
                walk(sub, f"{prefix}{name}.")
            else:
                assert f"| `{name}` |" in text

    walk(JobConfig, "")
