"""``docs/job-schema.md`` generated from the job's pydantic models (a test keeps it current).

Regenerate with ``python -m defuser_quant.jobs.schema_doc --write docs/job-schema.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from .config import JobConfig

HEADER = """# Job file schema

Generated from `defuser_quant/jobs/config.py` by
`python -m defuser_quant.jobs.schema_doc --write docs/job-schema.md`; do not edit by hand
(`tests/test_jobs_schema_doc.py` fails when it is out of date). A job file is YAML with the
sections below; unknown fields are refused. `defuser-quant run --set section.field=VALUE`
overrides one field.
"""


def _type_name(annotation: object) -> str:
    text = repr(annotation) if not isinstance(annotation, type) else annotation.__name__
    return text.replace("typing.", "").replace("NoneType", "None")


def _default(field) -> str:
    if field.default is not PydanticUndefined:
        return json.dumps(field.default) if not isinstance(field.default, BaseModel) else "(section)"
    if field.default_factory is not None:
        value = field.default_factory()
        if isinstance(value, BaseModel):
            return "(section)"
        return json.dumps(value)
    return "**required**"


def _model_of(annotation: object) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _section(name: str, model: type[BaseModel], out: list[str]) -> None:
    doc = (model.__doc__ or "").strip().splitlines()[0] if model.__doc__ else ""
    out += [f"## `{name}`", "", doc, "", "| field | type | default | meaning |", "|---|---|---|---|"]
    nested = []
    for field_name, field in model.model_fields.items():
        sub = _model_of(field.annotation)
        if sub is not None:
            nested.append((f"{name}.{field_name}", sub))
            out.append(f"| `{field_name}` | section | | see [`{name}.{field_name}`](#{name}{field_name}) |")
            continue
        meaning = (field.description or "").replace("|", "\\|")
        kind = _type_name(field.annotation).replace("|", "\\|")
        default = _default(field)
        default = default if default == "**required**" else f"`{default}`"
        out.append(f"| `{field_name}` | `{kind}` | {default} | {meaning} |")
    out.append("")
    for sub_name, sub in nested:
        _section(sub_name, sub, out)


def render() -> str:
    """The whole page."""
    out = [HEADER]
    for name, field in JobConfig.model_fields.items():
        _section(name, _model_of(field.annotation), out)
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--write", metavar="PATH", help="write the page here instead of printing it")
    args = parser.parse_args(argv)
    text = render()
    if args.write:
        Path(args.write).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
