"""What is supported, computed from the code: the README's supported families table.

Rows come from the same places conversion looks: classes decorated with
``@use_experts_implementation`` in the installed Transformers, and the explicit entries of
``families.py`` (irregular experts classes, fused dense MLPs, shared expert lists). Nothing here
is a hand-written list, so the table cannot drift from what ``convert_model`` and
``replace_fused_blocks`` do. The "math (fp32)" column is measured, not claimed: each family's tiny
fp32 model (built by the test suite's model zoo, ``tests/model_zoo.py`` of a source checkout) runs
its fused eager forward and, after ``convert_model``, its defused forward on the same fixed inputs
with one thread. ``python -m defuser_quant.tools.families_table --markdown`` prints the table;
``--write README.md`` / ``--check README.md`` update or verify the README between its markers.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import importlib.util
import logging
import math
import pkgutil
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch import nn

from ..core.defuse import convert_model
from ..core.families import DENSE_MLP_ENTRIES, EXPERTS_ENTRIES, SHARED_EXPERT_LISTS, adapter_of, entry_active
from ..core.layout import ExpertLayout, declared_flags_of_class, is_fused_experts_class, unmodelled_class_structure
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
# Rows first listed by the table generated with a later release than the baseline: release -> modules.
# The table marks them with that release; rows in none of these, nor in the baseline, with the release
# it is generated with. tests/test_support.py checks each set against the code there when installed.
LATER_MODULES: dict[str, frozenset[str]] = {
    "5.24.0": frozenset(
        "bailing_hybrid beam dots3_note flint hy_v4_vl inkling2 inkling2_loop kolibri1 lara_mini mistral_large4 "
        "muse_spark unlimited_ocr".split()
    ),
    "5.25.0": frozenset("ergo kolibri1_1 minicpm5_moe".split()),
}
_GENERATED_WITH = re.compile(r"Generated with Transformers ([0-9][0-9A-Za-z.+-]*)\.")
# The tiny-model zoo the math column is measured with: test support, present in a source checkout.
ZOO_PATH = Path(__file__).resolve().parents[2] / "tests" / "model_zoo.py"


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
    exact: bool  # the adapters claim bit-identical math (tests/test_families.py checks it); the table measures
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
            if extras := unmodelled_class_structure(cls):
                r["refused"].append(f"{cls.__name__}: " + ", ".join(extras))
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


@dataclass(frozen=True)
class MathResult:
    """The measured "math (fp32)" cell of a row: defused forward against fused eager forward.

    ``exact`` is None when nothing was measured (``reason`` says why); ``max_rel`` is
    ``max |defused - fused| / max |fused|`` over the model's main output.
    """

    exact: bool | None
    max_abs: float = 0.0
    max_rel: float = 0.0
    reason: str = ""

    def cell(self) -> str:
        if self.exact is None:
            return f"not measured ({self.reason})"
        if self.exact:
            return "exact"
        if not math.isfinite(self.max_rel):
            return "differs (non-finite)"
        return f"≤{_bound(self.max_rel)} rel"


def _bound(value: float) -> str:
    """``value`` rounded UP to one significant digit: ``2.76e-07`` -> ``3e-7``."""
    if value <= 0:
        return "0"
    exponent = math.floor(math.log10(value))
    digit = math.ceil(round(value / 10.0**exponent, 9))
    if digit >= 10:
        digit, exponent = 1, exponent + 1
    return f"{digit}e{exponent}"


@contextlib.contextmanager
def _measuring() -> Iterator[None]:
    """One intra-op thread (deterministic summation order, and fast for tiny models), the global
    RNG left as it was, and conversion's per-model notices kept out of the generator's output."""
    threads = torch.get_num_threads()
    quiet = logging.getLogger("defuser_quant")
    level = quiet.level
    torch.set_num_threads(1)
    quiet.setLevel(logging.ERROR)
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)
        quiet.setLevel(level)


def measure_model(model: nn.Module, inputs: dict, run) -> MathResult:
    """Run ``model`` (fused, fp32, eager experts) on ``inputs``, ``convert_model`` it, run it again;
    ``run(model, inputs)`` returns the output compared. The model is left defused."""
    with _measuring():
        fused = run(model, inputs)
        convert_model(model)
        defused = run(model, inputs)
    if torch.equal(defused, fused):
        return MathResult(exact=True)
    diff = (defused.double() - fused.double()).abs().max().item()
    scale = fused.double().abs().max().item()
    return MathResult(exact=False, max_abs=diff, max_rel=diff / scale if scale else math.inf)


def load_zoo(path: Path | str = ZOO_PATH) -> ModuleType:
    """The tiny-model zoo (``tests/model_zoo.py``): ``build_tiny_model``, ``run_main_output`` and its
    discovery functions. Reuses the module when the test suite already imported that file."""
    path = Path(path).resolve()
    loaded = sys.modules.get("model_zoo")
    if loaded is not None and Path(getattr(loaded, "__file__", "")).resolve() == path:
        return loaded
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: the math column is measured on the tiny models of the test suite's model zoo; run the "
            "generator from a source checkout or pass --zoo PATH/TO/tests/model_zoo.py"
        )
    spec = importlib.util.spec_from_file_location("defuser_quant_model_zoo", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _zoo_model_types(zoo: ModuleType) -> dict[str, str]:
    """Modeling package -> the model type the zoo builds for it (its top-level type)."""
    infos = [*zoo.discover_experts_classes(), *zoo.discover_irregular_experts_classes(), *zoo.discover_fused_dense_mlp_classes()]
    found: dict[str, str] = {}
    for info in infos:
        found.setdefault(info.module_name, info.model_type)
    return found


_MEASURED: dict[tuple[str, str, str], MathResult] = {}


def measure_family(zoo: ModuleType, row: FamilySupport) -> MathResult:
    """The math cell of ``row``, measured on the zoo's tiny model (cached per process)."""
    if row.refused:
        return MathResult(exact=None, reason="refused")
    model_type = _zoo_model_types(zoo).get(row.module, row.module)
    key = (str(zoo.__file__), transformers_version(), model_type)
    if key not in _MEASURED:
        try:
            with _measuring():
                model, inputs = zoo.build_tiny_model(model_type)
        except Exception as exc:  # noqa: BLE001 - a family the zoo cannot build is reported, not fatal
            logger.info("%s: no tiny model: %s", model_type, exc)
            result = MathResult(exact=None, reason=f"no tiny {model_type} model: {type(exc).__name__}")
        else:
            try:
                result = measure_model(model, inputs, zoo.run_main_output)
            except Exception as exc:  # noqa: BLE001
                logger.warning("%s: measuring the defused forward failed: %s", model_type, exc)
                result = MathResult(exact=None, reason=f"measuring failed: {type(exc).__name__}")
        _MEASURED[key] = result
    return _MEASURED[key]


def measured_math(zoo: ModuleType | None = None, rows: tuple[FamilySupport, ...] | None = None) -> dict[str, MathResult]:
    """Module -> measured math cell for every row (``zoo`` defaults to ``load_zoo()``)."""
    zoo = load_zoo() if zoo is None else zoo
    rows = supported_families() if rows is None else rows
    return {r.module: measure_family(zoo, r) for r in rows}


def first_listed(module: str, version: str) -> str:
    """The release a row holds from, as far as the tables tell: the baseline, the later release whose
    table first listed it (:data:`LATER_MODULES`), else ``version`` (the one generating the table)."""
    if module in BASELINE_MODULES:
        return BASELINE
    return next((release for release, modules in LATER_MODULES.items() if module in modules), version)


def markdown_table(rows: tuple[FamilySupport, ...] | None = None, measured: Mapping[str, MathResult] | None = None) -> str:
    """The supported families table in Markdown; ``measured`` (default: measured now) fills the math column."""
    rows = supported_families() if rows is None else rows
    measured = measured_math(rows=rows) if measured is None else measured
    missing = MathResult(exact=None, reason="no measurement given")
    lines = [
        "| family (model types) | Transformers | layout | pre-load | post-load | re-fuse | math (fp32) "
        "| stock loads the defused save |",
        "|---|---|---|:---:|:---:|:---:|---|:---:|",
    ]
    yes = {True: "yes", False: "no"}
    version = transformers_version()
    for r in rows:
        needs = f">={first_listed(r.module, version)}"
        family = r.module + (f" ({', '.join(r.model_types)})" if r.model_types != (r.module,) else "")
        layout = "<br>".join(r.layouts) + (" *" if r.irregular else "")
        cell = f"refused: {r.refused}" if r.refused else measured.get(r.module, missing).cell()
        stock = yes[r.stock_per_expert] if r.stock_per_expert else "no: `temporarily_fused`"
        lines.append(
            f"| {family} | {needs} | {layout} | {yes[r.preload]} | {yes[r.postload]} | {yes[r.refuse]} | {cell} | {stock} |"
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


def readme_section(zoo: ModuleType | None = None) -> str:
    """The README block between the markers (markers included), the math column measured with ``zoo``."""
    version = transformers_version()
    header = (
        f"Generated with Transformers {version}. The Transformers column gives the oldest release each row "
        f"holds for, as far as the tested releases tell: {BASELINE} (the oldest supported), else the release whose "
        f"generated table first listed the row (absent from {BASELINE}). The math (fp32) column is measured "
        "by the generator: each family's tiny fp32 model (`tests/model_zoo.py`) runs its fused eager forward, "
        "then its defused forward on the same fixed inputs, with one thread on the CPU; `exact` is bit-identical, "
        "otherwise the cell bounds max |defused - fused| / max |fused| (rounded up to one digit).\n"
    )
    table = markdown_table(measured=measured_math(zoo))
    return f"{BEGIN}\n{header}\n{table}\n{entries_notes()}{END}"


def replace_section(text: str, section: str) -> str:
    """``text`` with its marked block replaced by ``section``. Raises ValueError without markers."""
    start, end = text.find(BEGIN.split(" (")[0]), text.find(END)  # the begin marker's note may vary
    if start < 0 or end < start:
        raise ValueError(f"no families table markers ({BEGIN!r} ... {END!r})")
    return text[:start] + section + text[end + len(END) :]


_BOUND_CELL = re.compile(r"\| ≤(\d)e(-?\d+) rel \|")
_EXACT_CELL = "| exact |"
BOUND_SLACK = 4.0  # a bound measured on another CPU (other BLAS kernels) may differ by this factor
# One float32 rounding (machine epsilon, 2**-23): a bound below it and "exact" are the same result
# rounded by another CPU's kernels (openai_privacy_filter: exact on an AVX2 CPU, 8e-8 on others).
EXACT_SLACK = 2.0**-23


def _bound_value(cell: tuple[str, str]) -> float:
    digit, exponent = cell
    return int(digit) * 10.0 ** int(exponent)


def _same_math_cell(a: str, b: str) -> bool:
    """Two rows that differ in their math cell only, by at most what another CPU's rounding gives."""
    bounds_a, bounds_b = _BOUND_CELL.findall(a), _BOUND_CELL.findall(b)
    if len(bounds_a) == 1 and len(bounds_b) == 1:
        if _BOUND_CELL.sub("|", a) != _BOUND_CELL.sub("|", b):
            return False
        ratio = _bound_value(bounds_a[0]) / _bound_value(bounds_b[0])
        return 1 / BOUND_SLACK <= ratio <= BOUND_SLACK
    for exact, bounded, bounds in ((a, b, bounds_b), (b, a, bounds_a)):
        if exact.count(_EXACT_CELL) == 1 and len(bounds) == 1:
            return exact.replace(_EXACT_CELL, "|") == _BOUND_CELL.sub("|", bounded) and _bound_value(bounds[0]) < EXACT_SLACK
    return False


def same_up_to_bounds(fresh: str, committed: str) -> bool:
    """``committed`` equals ``fresh``, except that a non-exact math bound may differ by up to
    ``BOUND_SLACK`` times, and "exact" may stand for a bound under one float32 rounding
    (``EXACT_SLACK``), or the other way round: the rounding of a transposed layout depends on the
    CPU's matmul kernels. "not measured" and every other cell must match as they are."""
    if fresh == committed:
        return True
    fresh_lines, committed_lines = fresh.splitlines(), committed.splitlines()
    if len(fresh_lines) != len(committed_lines):
        return False
    return all(a == b or _same_math_cell(a, b) for a, b in zip(fresh_lines, committed_lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m defuser_quant.tools.families_table", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--markdown", action="store_true", help="print the supported families table")
    group.add_argument("--write", metavar="README", help="replace the table between the markers in README")
    group.add_argument("--check", metavar="README", help="exit 1 when README's table is not the generated one")
    parser.add_argument("--zoo", metavar="PATH", default=str(ZOO_PATH), help="the tiny-model zoo the math column is measured with")
    args = parser.parse_args(argv)
    if not args.markdown:  # a README that cannot be read or has no table markers fails before the measuring
        path = Path(args.write or args.check)
        try:
            text = path.read_text(encoding="utf-8")
            replace_section(text, "")
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            parser.error(f"{path}: {exc}")
    zoo = load_zoo(args.zoo)
    if args.markdown:
        sys.stdout.write(markdown_table(measured=measured_math(zoo)))
        return 0
    updated = replace_section(text, readme_section(zoo))
    if args.write:
        path.write_text(updated, encoding="utf-8")
        return 0
    if not same_up_to_bounds(updated, text):
        sys.stderr.write(f"{path}: the supported families table is stale; run python -m defuser_quant.tools.families_table --write {path}\n")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
