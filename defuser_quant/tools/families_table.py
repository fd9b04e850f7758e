"""What is supported, computed from the code: the README's supported families table.

Rows come from the same places conversion looks: classes decorated with
``@use_experts_implementation`` in the installed Transformers, and the explicit entries of
``families.py`` (irregular experts classes, fused dense MLPs, shared expert lists). Nothing here
is a hand-written list, so the table cannot drift from what ``convert_model`` and
``replace_fused_blocks`` do. ``python -m defuser_quant.tools.families_table --markdown`` prints it;
``--write README.md`` / ``--check README.md`` update or verify the README between its markers.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import logging
import pkgutil
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from ..core.families import DENSE_MLP_ENTRIES, EXPERTS_ENTRIES, SHARED_EXPERT_LISTS, adapter_of, entry_active
from ..core.layout import ExpertLayout, declared_flags_of_class, is_fused_experts_class, unmodelled_flags_of_class
from ..core.naming import stock_loads_per_expert

logger = logging.getLogger(__name__)

BEGIN = "<!-- families-table:start (generated: python -m defuser_quant.tools.families_table --write README.md) -->"
END = "<!-- families-table:end -->"
_DENSE = "dense `gate_up_proj` [2I,H]"
BASELINE = "5.17.0"  # the oldest Transformers supported (pyproject's lower bound), tested in CI
# The table's rows (modeling packages) under the baseline release; tests/test_support.py checks
# this against the code there, so rows that need a newer Transformers are marked truthfully.
BASELINE_MODULES = frozenset(
    "afmoe aria axk1 axk2 cohere2_moe dbrx deepseek_ocr2 deepseek_v2 deepseek_v3 deepseek_v32 deepseek_v4 dia "
    "diffusion_gemma dots1 ernie4_5_moe ernie4_5_vl_moe esmfold2 exaone_moe flex_olmo gemma4 glm glm4 glm4_moe "
    "glm4_moe_lite glm4v glm4v_moe glm5_next glm_image glm_moe_dsa glm_ocr gpt_oss granitemoe granitemoe_swa "
    "granitemoehybrid granitemoeshared hunyuan_v1_moe hy_v3 hy_v4 inkling jamba jetmoe kimi_linear laguna lfm2_moe "
    "llama4 longcat_flash mellum mimo_v2_flash minimax minimax_m2 minimax_m3_vl mistral4 mixtral nemotron_h olmoe "
    "openai_privacy_filter phi3 phi4_multimodal phimoe qwen2_moe qwen3_5_moe qwen3_moe qwen3_next qwen3_omni_moe "
    "qwen3_vl_moe qwen4_exp solar_open step3p7 zamba2 zaya".split()
)
_GENERATED_WITH = re.compile(r"Generated with Transformers ([0-9][0-9A-Za-z.+-]*)\.")


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def table_version(text: str) -> str | None:
    """The Transformers release a README's table was generated with (None when it does not say)."""
    section = text[text.find(BEGIN.split(" (")[0]) :]
    match = _GENERATED_WITH.search(section)
    return match.group(1) if match else None


@dataclass(frozen=True)
class FamilySupport:
    """One row of the table: a Transformers modeling package and what we do with it."""

    module: str  # transformers.models.<module>
    model_types: tuple[str, ...]
    layouts: tuple[str, ...]
    irregular: bool  # has an explicit entry in families.py
    exact: bool  # every converted block is bit-identical to the fused forward
    stock_per_expert: bool  # stock Transformers loads a checkpoint saved defused
    preload: bool = True
    postload: bool = True
    refuse: bool = True
    notes: str = ""
    refused: str = ""  # why conversion refuses this family (structure the adapters do not model)


def _model_types_of(module: str) -> tuple[str, ...]:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES, model_type_to_module_name

    return tuple(sorted(t for t in CONFIG_MAPPING_NAMES if model_type_to_module_name(t) == module)) or (module,)


def _modeling_modules_with(marker: str) -> list[str]:
    """Names of ``transformers.models`` packages whose modeling file mentions ``marker``."""
    import transformers.models as models

    found = []
    for info in pkgutil.iter_modules(models.__path__):
        spec = importlib.util.find_spec(f"transformers.models.{info.name}.modeling_{info.name}") if info.ispkg else None
        if spec is None or not spec.origin or not spec.origin.endswith(".py"):
            continue
        try:
            if marker in Path(spec.origin).read_text(encoding="utf-8"):
                found.append(info.name)
        except OSError:
            continue
    return found


def _decorated_classes(module: str) -> list[type[nn.Module]]:
    try:
        mod = importlib.import_module(f"transformers.models.{module}.modeling_{module}")
    except Exception as exc:  # noqa: BLE001 - optional dependencies of a modeling file
        logger.debug("cannot import %s: %s", module, exc)
        return []
    return [c for c in vars(mod).values() if isinstance(c, type) and c.__module__ == mod.__name__ and is_fused_experts_class(c)]


@functools.lru_cache(maxsize=None)
def supported_families() -> tuple[FamilySupport, ...]:
    """Every family ``convert_model`` and ``replace_fused_blocks`` handle, one row per package."""
    rows: dict[str, dict] = {}

    def row(module: str) -> dict:
        return rows.setdefault(
            module, {"layouts": [], "irregular": False, "exact": True, "stock": True, "notes": [], "refused": []}
        )

    for module in _modeling_modules_with("use_experts_implementation"):
        for cls in _decorated_classes(module):
            layout = ExpertLayout.from_flags(declared_flags_of_class(cls))
            r = row(module)
            r["layouts"].append(layout.describe())
            r["exact"] &= not layout.is_transposed
            r["stock"] &= stock_loads_per_expert(*_model_types_of(module))
            if flags := unmodelled_flags_of_class(cls):
                r["refused"].append(f"{cls.__name__}: decorator " + ", ".join(f"`{k}={v!r}`" for k, v in flags.items()))
    for entry in EXPERTS_ENTRIES:
        if not entry_active(entry):
            logger.info("families.py entry %s: %s absent or decorated in this Transformers", entry.family, entry.class_name)
            continue
        adapter = adapter_of(entry)
        layout = adapter.layout(None)
        r = row(entry.module)
        r["irregular"] = True
        r["layouts"].append(adapter.describe(layout))
        r["exact"] &= adapter.exact(layout)
        r["stock"] &= adapter.stock_per_expert and stock_loads_per_expert(*_model_types_of(entry.module))
        r["notes"].append(entry.why)
    for entry in DENSE_MLP_ENTRIES:
        if not entry_active(entry):
            logger.info("families.py dense entry %s: no class %s", entry.family, entry.qualified_name)
            continue
        r = row(entry.module)
        r["layouts"].append(_DENSE if entry.gate_first else f"{_DENSE}, second half gated")
        r["stock"] = False
    for entry in SHARED_EXPERT_LISTS:
        row(entry.family)["notes"].append(f"per-expert checkpoints: one expert list for {' + '.join(entry.groups)}")
    return tuple(
        FamilySupport(
            module=module,
            model_types=_model_types_of(module),
            layouts=tuple(dict.fromkeys(r["layouts"])),
            irregular=r["irregular"],
            exact=r["exact"],
            stock_per_expert=r["stock"],
            notes="; ".join(r["notes"]),
            refused="; ".join(r["refused"]),
            **({"preload": False, "postload": False, "refuse": False} if r["refused"] else {}),
        )
        for module, r in sorted(rows.items())
    )


def supported_model_types() -> set[str]:
    """Every model type whose modeling package has a block we convert."""
    return {t for row in supported_families() if not row.refused for t in row.model_types}


def markdown_table(rows: tuple[FamilySupport, ...] | None = None) -> str:
    """The supported families table in Markdown."""
    rows = supported_families() if rows is None else rows
    lines = [
        "| family (model types) | Transformers | layout | pre-load | post-load | re-fuse | math (fp32) "
        "| stock loads the defused save |",
        "|---|---|---|:---:|:---:|:---:|---|:---:|",
    ]
    yes = {True: "yes", False: "no"}
    version = transformers_version()
    for r in rows:
        needs = f">={BASELINE}" if r.module in BASELINE_MODULES else f">={version}"
        family = r.module + (f" ({', '.join(r.model_types)})" if r.model_types != (r.module,) else "")
        layout = "<br>".join(r.layouts) + (" *" if r.irregular else "")
        math = f"refused: {r.refused}" if r.refused else "exact" if r.exact else "≤1e-6 rel"
        stock = yes[r.stock_per_expert] if r.stock_per_expert else "no: `temporarily_fused`"
        lines.append(
            f"| {family} | {needs} | {layout} | {yes[r.preload]} | {yes[r.postload]} | {yes[r.refuse]} | {math} | {stock} |"
        )
    return "\n".join(lines) + "\n"


def entries_notes() -> str:
    """Bullets: why each explicit entry of ``families.py`` exists."""
    lines = ["`*` explicit entry in `defuser_quant/core/families.py`:", ""]
    lines += [
        f"- **{e.family}** (`{e.class_name}`): {e.why}."
        + ("" if entry_active(e) else f" Not in Transformers {transformers_version()}: the class is absent or decorated there"
           " (then its flags describe it and the standard path converts it).")
        for e in EXPERTS_ENTRIES
    ]
    lines += [f"- **{e.family}** (pre-load): {e.why}." for e in SHARED_EXPERT_LISTS]
    dense = sorted({e.family for e in DENSE_MLP_ENTRIES})
    lines += [f"- dense fused MLPs ({', '.join(dense)}): `gate_up_proj` split into `gate_proj`/`up_proj` in place."]
    return "\n".join(lines) + "\n"


def readme_section() -> str:
    """The README block between the markers (markers included)."""
    version = transformers_version()
    header = (
        f"Generated with Transformers {version}. The Transformers column gives the oldest release each row "
        f"holds for (rows marked >={version} are absent from {BASELINE}).\n"
    )
    return f"{BEGIN}\n{header}\n{markdown_table()}\n{entries_notes()}{END}"


def replace_section(text: str, section: str) -> str:
    """``text`` with its marked block replaced by ``section``. Raises ValueError without markers."""
    start, end = text.find(BEGIN.split(" (")[0]), text.find(END)  # the begin marker's note may vary
    if start < 0 or end < start:
        raise ValueError(f"no families table markers ({BEGIN!r} ... {END!r})")
    return text[:start] + section + text[end + len(END) :]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m defuser_quant.tools.families_table", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--markdown", action="store_true", help="print the supported families table")
    group.add_argument("--write", metavar="README", help="replace the table between the markers in README")
    group.add_argument("--check", metavar="README", help="exit 1 when README's table is not the generated one")
    args = parser.parse_args(argv)
    if args.markdown:
        sys.stdout.write(markdown_table())
        return 0
    path = Path(args.write or args.check)
    text = path.read_text(encoding="utf-8")
    updated = replace_section(text, readme_section())
    if args.write:
        path.write_text(updated, encoding="utf-8")
        return 0
    if updated != text:
        sys.stderr.write(f"{path}: the supported families table is stale; run python -m defuser_quant.tools.families_table --write {path}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
