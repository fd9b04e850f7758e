"""The supported families table is the code's, and it covers everything the reference tool does.

* README.md's table is regenerated from the code and must be identical; its math column is
  measured on each family's tiny model, so a hand-edited cell or a family that stops being exact
  fails the check.
* Every model type Defuser 0.0.28 supports (its ``MODEL_CONFIG`` registry and the model types
  its README lists), read as data from site-packages (never imported), is covered.
* Every fused experts class or fused dense MLP that discovery finds by structure in the
  installed Transformers has an entry, and every entry names a class that exists.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import inspect
import re
from pathlib import Path

import pytest
import torch
from packaging.version import Version

import defuser_quant as dq
from defuser_quant.tools import families_table as support
from defuser_quant.core.families import DENSE_MLP_ENTRIES, EXPERTS_ENTRIES, dense_entry_for, experts_entry_for, resolve_class
from model_zoo import discover_fused_dense_mlp_classes, discover_irregular_experts_classes

README = Path(__file__).resolve().parents[1] / "README.md"
NEWEST = README.parent / "constraints-newest.txt"
# Structurally discovered classes deliberately left fused: (module, class) -> reason.
NOT_CONVERTED: dict[tuple[str, str], str] = {
    ("inkling", "InklingSharedExperts"): "always-on shared experts stored [n, I, H]; not defused yet: the pre-load "
    "path would have to chain Inkling's shared_w13 Interleave/Chunk converter into a per-expert split",
}


def _defuser_registry() -> set[str]:
    spec = importlib.util.find_spec("defuser")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("Defuser is not installed")
    source = Path(next(iter(spec.submodule_search_locations)), "model_registry.py").read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MODEL_CONFIG" for t in node.targets):
            return {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
    raise AssertionError("Defuser's model_registry.py has no MODEL_CONFIG dict")


def _defuser_readme_types() -> set[str]:
    """Model types in the two tables of Defuser's README "Supported Models" section: column 1 of
    the pre-load table (one type per row), column 2 of the post-load table (types per pattern)."""
    try:
        text = importlib.metadata.metadata("Defuser").get_payload() or ""
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("Defuser is not installed")
    section = text[text.find("Supported Models") : text.find("Workflow Summary")]
    found = set()
    for line in section.splitlines():
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) < 2 or set(cells[0]) <= set("-: "):
            continue
        column = cells[0] if cells[0].startswith("`") else cells[1]
        found.update(re.findall(r"`([a-z0-9_]+)`", column))
    return found


def _installed() -> Version:
    return Version(support.transformers_version())


def test_readme_table_is_generated_from_the_code():
    """Generated with the newest Transformers tested (constraints-newest.txt): identical there; with
    any other release, every row the code computes here is in the README's table."""
    text = README.read_text(encoding="utf-8")
    generated_with = support.table_version(text)
    newest = re.search(r"^transformers==(\S+)$", NEWEST.read_text(encoding="utf-8"), re.M).group(1)
    assert generated_with == newest, f"README's table was generated with Transformers {generated_with}, not {newest}"
    if _installed() == Version(newest):
        assert support.same_up_to_bounds(support.replace_section(text, support.readme_section()), text), (
            "README.md's supported families table is stale: run "
            "python -m defuser_quant.tools.families_table --write README.md with the newest Transformers (.venv-newest)"
        )
        assert support.main(["--check", str(README)]) == 0
    else:
        table = text[text.find(support.BEGIN.split(" (")[0]) : text.find(support.END)]
        missing = [r.module for r in support.supported_families() if not re.search(rf"^\| {r.module}[ |]", table, re.M)]
        assert not missing, f"rows the code has but README's table lacks: {missing}"


def test_a_hand_edited_math_cell_fails_the_check(tmp_path):
    """The math cells are compared with a fresh measurement (same process: measured once)."""
    text = README.read_text(encoding="utf-8")
    if _installed() != Version(support.table_version(text) or "0"):
        pytest.skip("README's table is checked cell by cell with the Transformers it was generated with")
    # a measured bound over one float32 rounding: "exact" in its place is another result, not another CPU's
    largest = max(support._BOUND_CELL.finditer(text), key=lambda m: support._bound_value(m.groups()))
    measured = largest.group(0)
    assert support._bound_value(largest.groups()) > support.EXACT_SLACK
    for old, new in (("| exact |", "| ≤3e-7 rel |"), (measured, "| exact |")):
        assert old in text
        edited = tmp_path / "README.md"
        edited.write_text(text.replace(old, new, 1), encoding="utf-8")
        assert support.main(["--check", str(edited)]) == 1, (old, new)
    edited.write_text(text, encoding="utf-8")
    assert support.main(["--check", str(edited)]) == 0


def _row(module: str):
    return next(r for r in support.supported_families() if r.module == module)


def test_math_cells_are_measured_not_claimed(monkeypatch):
    """The cell comes from running the fused and the defused forward: exact where bit-identical;
    a defused forward that rounds differently (here: experts computed in float64) is reported
    with its measured bound, whatever the adapter claims."""
    import model_zoo

    assert support.load_zoo() is model_zoo  # the suite's zoo, not a second copy
    row = _row("qwen3_moe")
    assert row.exact and support.measure_family(model_zoo, row).cell() == "exact"

    model, inputs = model_zoo.build_tiny_model("qwen3_moe")
    expert_forward = dq.DefusedExpert.forward
    monkeypatch.setattr(dq.DefusedExpert, "forward", lambda self, x: expert_forward(self.double(), x.double()).float())
    result = support.measure_model(model, inputs, model_zoo.run_main_output)
    assert result.exact is False and 0 < result.max_rel < 1e-5
    assert result.cell() == f"≤{support._bound(result.max_rel)} rel"


def test_a_non_exact_family_is_reported_with_its_measured_difference():
    import model_zoo

    row = _row("gpt_oss")  # x @ W on a transposed, interleaved tensor in the fused loop
    result = support.measure_family(model_zoo, row)
    model, inputs = model_zoo.build_tiny_model("gpt_oss")
    with model_zoo.torch_threads(1):
        fused = model_zoo.run_main_output(model, inputs)
        dq.convert_model(model)
        defused = model_zoo.run_main_output(model, inputs)
    diff = (defused.double() - fused.double()).abs().max().item()
    assert not torch.equal(defused, fused) and result.exact is False
    assert result.max_abs == diff and result.max_rel == diff / fused.double().abs().max().item()
    assert result.cell() == f"≤{support._bound(result.max_rel)} rel"
    # The table prints the measurement, not the adapter's claim (qwen3_moe claims exact).
    claimed_exact = _row("qwen3_moe")
    table = support.markdown_table(rows=(row, claimed_exact), measured={"gpt_oss": result, "qwen3_moe": result})
    assert table.count(f"| {result.cell()} |") == 2 and "| exact |" not in table


def test_rows_without_a_measurement_say_why():
    from types import SimpleNamespace

    import model_zoo

    def build_tiny_model(model_type):
        raise RuntimeError("cannot build")

    broken = SimpleNamespace(
        __file__="broken_zoo.py", build_tiny_model=build_tiny_model, run_main_output=model_zoo.run_main_output,
        discover_experts_classes=list, discover_irregular_experts_classes=list, discover_fused_dense_mlp_classes=list,
    )
    assert support.measure_family(broken, _row("mixtral")).cell() == "not measured (no tiny mixtral model: RuntimeError)"
    refused = support.FamilySupport("x", ("x",), ("l",), False, True, True, refused="Cls: decorator `flag=True`")
    assert "refused: Cls: decorator" in support.markdown_table(rows=(refused,), measured={})


@pytest.mark.parametrize(("value", "bound"), [(2.76e-7, "3e-7"), (2e-7, "2e-7"), (9.5e-7, "1e-6"), (1e-6, "1e-6"), (7.3e-8, "8e-8")])
def test_bounds_round_up_to_one_digit(value, bound):
    assert support._bound(value) == bound and float(bound) >= value


def test_baseline_rows_are_the_codes():
    """The rows the table marks as holding for the oldest supported Transformers are exactly the
    rows the code computes with it."""
    if _installed() != Version(support.BASELINE):
        pytest.skip(f"checked with Transformers {support.BASELINE}")
    assert {r.module for r in support.supported_families()} == support.BASELINE_MODULES


def test_later_rows_are_the_codes_of_their_release():
    """Each later release's rows are the rows its code has beyond the baseline's (checked where it is
    installed: the newest environment, or a transformers_sweep.sh run)."""
    installed = str(_installed())
    if installed not in support.LATER_MODULES:
        pytest.skip(f"checked with Transformers {', '.join(support.LATER_MODULES)}")
    earlier = set(support.BASELINE_MODULES).union(
        *(m for release, m in support.LATER_MODULES.items() if Version(release) < _installed()))
    assert {r.module for r in support.supported_families()} - earlier == support.LATER_MODULES[installed]


def test_each_row_holds_from_the_first_table_that_listed_it():
    assert support.first_listed("qwen3_moe", "9.9.9") == support.BASELINE
    assert support.first_listed("muse_spark", "9.9.9") == "5.24.0"
    assert support.first_listed("a_family_of_tomorrow", "9.9.9") == "9.9.9"


def test_every_family_defuser_supports_is_covered():
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    theirs = _defuser_registry() | _defuser_readme_types()
    assert len(theirs) >= 55, sorted(theirs)
    # Defuser also lists model types this Transformers does not have (solar_open2): nothing to convert.
    theirs = {t for t in theirs if t in CONFIG_MAPPING_NAMES}
    missing = sorted(theirs - dq.supported_model_types())
    assert not missing, f"Defuser supports {missing}, we do not"


def test_every_structurally_discovered_class_has_an_entry():
    for info in discover_irregular_experts_classes():
        if (info.module_name, info.class_name) in NOT_CONVERTED:
            continue
        # The entry may name the block that owns the weight holder (dbrx's DbrxExpertGLU, aria's
        # AriaGroupedExpertsGemm live inside DbrxExperts / AriaExperts).
        owners = [resolve_class(e.qualified_name) for e in EXPERTS_ENTRIES if e.module == info.module_name]
        held = any(o is not None and info.class_name in inspect.getsource(o.__init__) for o in owners)
        assert experts_entry_for(info.cls) is not None or held, f"{info.class_name} ({info.model_type}) holds fused experts"
    for info in discover_fused_dense_mlp_classes():
        assert dense_entry_for(info.cls) is not None, f"{info.class_name} ({info.model_type}) has a fused gate_up_proj"
    assert all(NOT_CONVERTED.values())


def test_every_entry_names_an_existing_class():
    """An entry's class exists, unless the entry says it needs a newer Transformers than this one."""
    for entry in (*EXPERTS_ENTRIES, *DENSE_MLP_ENTRIES):
        if resolve_class(entry.qualified_name) is None:
            assert entry.needs and _installed() < Version(entry.needs), f"stale families.py entry {entry.qualified_name}"


def test_an_entry_stops_applying_once_transformers_decorates_its_class():
    """Explicit entries describe undecorated classes; a decorated one (aria in 5.24) is described
    by its flags and must not be taken by a stale entry."""
    from defuser_quant.core.families import entry_active
    from defuser_quant.core.layout import is_fused_experts_class

    for entry in EXPERTS_ENTRIES:
        cls = resolve_class(entry.qualified_name)
        if cls is not None:
            assert entry_active(entry) == (not is_fused_experts_class(cls)), entry.class_name
            assert (experts_entry_for(cls) is entry) == entry_active(entry), entry.class_name


def test_table_rows_agree_with_conversion():
    rows = {r.module: r for r in support.supported_families()}
    assert rows["dbrx"].irregular and not rows["dbrx"].exact
    assert rows["qwen3_moe"].exact and rows["qwen3_moe"].stock_per_expert
    assert not rows["phi3"].stock_per_expert and not rows["gpt_oss"].exact
    table = support.markdown_table(measured={})  # the math column is measured (tested above)
    assert table.count("\n") == len(rows) + 2


def test_a_decorated_subclass_of_an_entry_class_takes_the_standard_path():
    """What aria became in Transformers 5.24, made here from step3p7's undecorated class: once
    decorated, the flags describe it (transposed here) and the entry (untransposed) must not apply."""
    from transformers.integrations.moe import use_experts_implementation

    from defuser_quant.core.families import adapter_of
    from defuser_quant.core.irregular.base import FixedLayoutAdapter
    from defuser_quant.core.layout import layout_of

    base = resolve_class("transformers.models.step3p7.modeling_step3p7.Step3p7Experts")
    entry = experts_entry_for(base)
    if entry is None:
        pytest.skip("this Transformers decorated Step3p7Experts itself (5.25): no undecorated entry class to start from")
    assert isinstance(adapter_of(entry), FixedLayoutAdapter)
    decorated = use_experts_implementation(type("Step3p7ExpertsDecorated", (base,), {}), is_transposed=True)
    assert experts_entry_for(decorated) is None

    class Config:
        num_local_experts, hidden_size, moe_intermediate_size, hidden_act = 4, 8, 6, "silu"

    with torch.device("meta"):
        block = decorated(Config())
    from defuser_quant.core.defuse import adapter_for

    assert adapter_for(block) is not None and not isinstance(adapter_for(block), FixedLayoutAdapter)
    assert layout_of(block).is_transposed


def test_bounds_may_differ_by_the_slack_only_and_only_in_bound_cells():
    row = "| gpt_oss | 5.17 | transposed | yes | yes | yes | {} | yes |"
    assert support.same_up_to_bounds(row.format("≤2e-7 rel"), row.format("≤3e-7 rel"))
    assert support.same_up_to_bounds(row.format("≤2e-7 rel"), row.format("≤8e-7 rel"))
    assert not support.same_up_to_bounds(row.format("≤2e-7 rel"), row.format("≤9e-7 rel"))
    assert not support.same_up_to_bounds(row.format("≤2e-7 rel"), row.format("exact"))
    assert not support.same_up_to_bounds(row.format("exact"), row.format("≤2e-7 rel"))
    # under one float32 rounding (1.19e-7), "exact" on one CPU is a bound on another, both ways
    assert support.same_up_to_bounds(row.format("exact"), row.format("≤8e-8 rel"))
    assert support.same_up_to_bounds(row.format("≤1e-7 rel"), row.format("exact"))
    assert not support.same_up_to_bounds(row.format("exact"), row.format("≤8e-8 rel").replace("yes", "no", 1))
    assert not support.same_up_to_bounds(row.format("exact"), row.format("not measured (x)"))
    assert not support.same_up_to_bounds(row.format("≤2e-7 rel"), row.format("≤2e-7 rel").replace("yes", "no", 1))


def test_a_readme_without_the_table_or_missing_is_refused_before_measuring(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(support, "load_zoo", lambda path: pytest.fail("measured before reading the README"))
    plain = tmp_path / "README.md"
    plain.write_text("# no table here\n", encoding="utf-8")
    for flag, path, says in (("--check", plain, "no families table markers"), ("--write", tmp_path / "none.md", "No such file")):
        with pytest.raises(SystemExit) as exit_:
            support.main([flag, str(path)])
        assert exit_.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()[-1]
        assert error.startswith("python -m defuser_quant.tools.families_table: error: ") and str(path) in error and says in error
    assert plain.read_text(encoding="utf-8") == "# no table here\n"  # nothing written
