"""``defuser-quant check``: real checkpoints of both backends pass; broken copies fail naming the problem."""

from __future__ import annotations

import json

import pytest
import torch

from defuser_quant.assets import TINY_MOE_PATH
from defuser_quant.checkpoint.check import check_checkpoint
from defuser_quant.cli import main
from quantized_checkpoints import broken_copy, quantized_checkpoint

BACKENDS = ["gptqmodel", "llmcompressor"]
SCALE = {"gptqmodel": "scales", "llmcompressor": "weight_scale"}


@pytest.fixture(scope="module", params=BACKENDS)
def checkpoint(request, tmp_path_factory):
    return request.param, quantized_checkpoint(request.param, tmp_path_factory.getbasetemp())


def _problems(path, target="vllm"):
    result = check_checkpoint(path, target)
    return result, [str(p) for p in result.problems]


@pytest.mark.slow
def test_both_backends_checkpoints_are_fit_to_serve(checkpoint, capsys):
    backend, path = checkpoint
    assert main(["check", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["fit"] and report["problems"] == []
    assert report["layout"] == "per-expert" and report["blocks"] == 4 and report["experts"] == 64
    assert report["expert_projections"] == report["expert_projections_quantized"] == 192
    scheme = {"gptqmodel": "gptq 4-bit group 128", "llmcompressor": "pack-quantized 4-bit group 128"}[backend]
    assert report["schemes"] == {scheme: 192}


@pytest.mark.slow
def test_an_expert_missing_is_named(checkpoint, tmp_path, capsys):
    _, path = checkpoint
    broken = broken_copy(path, tmp_path / "b", lambda t: [t.pop(k) for k in list(t) if ".layers.1.mlp.experts.5." in k])
    assert main(["check", str(broken)]) == 1
    out = capsys.readouterr().out
    assert "model.layers.1.mlp.experts.5: expert missing" in out


@pytest.mark.slow
def test_a_nan_scale_is_named(checkpoint, tmp_path):
    backend, path = checkpoint
    key = f"model.layers.2.mlp.experts.3.down_proj.{SCALE[backend]}"

    def edit(t):
        t[key] = t[key].clone()
        t[key].view(-1)[0] = float("nan")

    _, problems = _problems(broken_copy(path, tmp_path / "b", edit))
    assert problems == [f"model.layers.2.mlp.experts.3.down_proj: {SCALE[backend]} has 1 NaN value(s) of 128"]


@pytest.mark.slow
def test_a_zero_scale_is_named(checkpoint, tmp_path):
    backend, path = checkpoint
    key = f"model.layers.0.mlp.experts.0.gate_proj.{SCALE[backend]}"

    def edit(t):
        t[key] = torch.zeros_like(t[key])

    _, problems = _problems(broken_copy(path, tmp_path / "b", edit))
    assert any(p.startswith("model.layers.0.mlp.experts.0.gate_proj: ") and "128 zero value(s)" in p for p in problems), problems


def _regroup(backend, t, module, groups):
    """Store ``module`` with ``groups`` quantization groups (group size 128 / groups) instead of one."""
    if backend == "gptqmodel":
        for leaf in ("scales", "qzeros"):
            t[f"{module}.{leaf}"] = t[f"{module}.{leaf}"].repeat(groups, 1)
    else:
        t[f"{module}.weight_scale"] = t[f"{module}.weight_scale"].repeat(1, groups)


@pytest.mark.slow
def test_gate_and_up_with_different_group_sizes_fail(checkpoint, tmp_path):
    backend, path = checkpoint
    broken = broken_copy(path, tmp_path / "b", lambda t: _regroup(backend, t, "model.layers.3.mlp.experts.9.up_proj", 2))
    _, problems = _problems(broken)
    assert any(
        p.startswith("model.layers.3.mlp.experts.9: gate and up quantized differently") and "group 64" in p and "group 128" in p
        for p in problems
    ), problems


@pytest.mark.slow
def test_q_k_v_with_different_group_sizes_fail(checkpoint, tmp_path):
    backend, path = checkpoint
    broken = broken_copy(path, tmp_path / "b", lambda t: _regroup(backend, t, "model.layers.0.self_attn.k_proj", 2))
    _, problems = _problems(broken)
    assert any(p.startswith("model.layers.0.self_attn: q_proj/k_proj/v_proj quantized differently") for p in problems), problems


@pytest.mark.slow
def test_a_fused_packed_key_fails(checkpoint, tmp_path):
    backend, path = checkpoint
    leaf = {"gptqmodel": "qweight", "llmcompressor": "weight_packed"}[backend]
    block = "model.layers.0.mlp.experts"

    def edit(t):
        stacked = torch.stack([t[f"{block}.{i}.gate_proj.{leaf}"] for i in range(16)])
        for k in [k for k in t if k.startswith(block + ".")]:
            del t[k]
        t[f"{block}.gate_up_proj.{leaf}"] = stacked

    _, problems = _problems(broken_copy(path, tmp_path / "b", edit))
    assert any(p.startswith(f"{block}.gate_up_proj.{leaf}: fused packed") for p in problems), problems


@pytest.mark.slow
def test_a_bf16_expert_among_quantized_ones_fails(checkpoint, tmp_path):
    _, path = checkpoint
    module = "model.layers.3.mlp.experts.7.up_proj"
    edit = _float_experts(module + ".")
    result, problems = _problems(broken_copy(path, tmp_path / "b", edit))
    assert any(p.startswith(f"{module}: left unquantized (BF16)") for p in problems), problems
    assert result.quantized == 191 and result.projections == 192


def _float_experts(prefix):
    """An edit storing every projection under ``prefix`` as a bf16 weight (128x128 in the tiny model)."""
    def edit(t):
        modules = {k.rpartition(".")[0] for k in t if k.startswith(prefix)}
        for k in [k for k in t if k.startswith(prefix)]:
            del t[k]
        for module in modules:
            t[f"{module}.weight"] = torch.zeros(128, 128, dtype=torch.bfloat16)
    return edit


def _ignore(path, entry):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["ignore"].append(entry)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.slow
def test_experts_excluded_by_the_config_are_listed_with_the_reason(tmp_path, tmp_path_factory):
    path = quantized_checkpoint("llmcompressor", tmp_path_factory.getbasetemp())
    broken = broken_copy(path, tmp_path / "b", _float_experts("model.layers.3.mlp.experts."))
    entry = r"re:.*layers\.3\.mlp\.experts\..*"
    _ignore(broken, entry)
    result = check_checkpoint(broken)
    assert result.fit, result.problems
    assert len(result.not_quantized) == 48 and result.quantized == 144
    assert {p.what for p in result.not_quantized} == {f"quantization_config.ignore has {entry!r}"}
    assert "not quantized: (+28 more; --json lists all)" in result.summary()


@pytest.mark.slow
def test_one_excluded_expert_in_a_quantized_layer_fails(tmp_path, tmp_path_factory):
    path = quantized_checkpoint("llmcompressor", tmp_path_factory.getbasetemp())
    broken = broken_copy(path, tmp_path / "b", _float_experts("model.layers.3.mlp.experts.7."))
    _ignore(broken, r"re:.*layers\.3\.mlp\.experts\.7\..*")
    result, problems = _problems(broken)
    assert len(result.not_quantized) == 3
    assert problems == [
        f"model.layers.3.mlp.experts.*.{name}: experts of one layer quantized differently (float, pack-quantized 4-bit "
        "group 128): engines run a layer's experts as one kernel"
        for name in ("gate_proj", "up_proj", "down_proj")
    ]


@pytest.mark.slow
def test_for_transformers_says_what_stock_loading_does(checkpoint, capsys):
    backend, path = checkpoint
    code = main(["check", str(path), "--for", "transformers"])
    out = capsys.readouterr().out
    assert f"defuser_quant.load({str(path)!r})" in out
    if backend == "gptqmodel":  # stock Transformers leaves per-expert GPTQ tensors unexpected: random experts
        assert code == 1 and "randomly initialised" in out
    else:  # compressed-tensors experts load, dequantized into fused float tensors
        assert code == 0 and "dequantize" in out


def test_float_checkpoint_is_fit_and_renamed_projections_fail(tmp_path):
    assert check_checkpoint(TINY_MOE_PATH).fit
    renamed = broken_copy(
        TINY_MOE_PATH, tmp_path / "b",
        lambda t: t.__setitem__("model.layers.0.mlp.experts.2.w1.weight", t.pop("model.layers.0.mlp.experts.2.gate_proj.weight")),
    )
    _, problems = _problems(renamed)
    assert problems == [
        "model.layers.0.mlp.experts.2.w1: unexpected projection name: per-expert checkpoints of this family name them gate_proj/up_proj/down_proj",
        "model.layers.0.mlp.experts.2.gate_proj: projection missing",
    ]


def test_mixed_layouts_fail(tmp_path):
    block = "model.layers.1.mlp.experts"

    def edit(t):
        gate = torch.stack([t.pop(f"{block}.{i}.gate_proj.weight") for i in range(16)])
        up = torch.stack([t.pop(f"{block}.{i}.up_proj.weight") for i in range(16)])
        t[f"{block}.gate_up_proj"] = torch.cat([gate, up], dim=1)
        t[f"{block}.down_proj"] = torch.stack([t.pop(f"{block}.{i}.down_proj.weight") for i in range(16)])

    result, problems = _problems(broken_copy(TINY_MOE_PATH, tmp_path / "b", edit))
    assert problems == ["checkpoint: experts blocks are stored in different layouts (per-expert and fused)"]
    assert result.layout == "mixed"


@pytest.mark.parametrize("argv, message", [
    (["check", "/nonexistent/ckpt"], "not a checkpoint directory"),
    (["check", "."], "has no config.json"),
])
def test_bad_input_exits_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_the_job_runner_checks_its_own_output(checkpoint):
    _, path = checkpoint
    verdict = json.loads((path / "job.json").read_text())["check"]
    assert verdict["fit"] is True and verdict["target"] == "vllm" and verdict["problems_total"] == 0
    assert verdict["expert_projections_quantized"] == 192


def test_a_job_verdict_says_why_the_check_could_not_run(tmp_path):
    from defuser_quant.checkpoint.check import job_verdict

    verdict = job_verdict(tmp_path)
    assert verdict["fit"] is None and "has no config.json" in verdict["error"]
    (tmp_path / "config.json").write_text("{not json")  # any failure of the check itself: the job keeps its output
    verdict = job_verdict(tmp_path)
    assert verdict["fit"] is None and verdict["error"]


def test_the_job_summary_shows_the_verdict():
    from rich.console import Console

    from defuser_quant.jobs.config import JobConfig
    from defuser_quant.jobs.runner import JobReport, _summary

    config = JobConfig.model_validate({"model": {"path": "builtin:tiny-qwen3-moe"}, "output": {"dir": "out"}})
    rows = {}
    for verdict in ({"fit": True, "target": "vllm", "problems_total": 0},
                    {"fit": False, "target": "vllm", "problems_total": 3},
                    {"fit": None, "target": "vllm", "error": "no config.json"}):
        console = Console(record=True, width=200)
        console.print(_summary(JobReport(output_dir="out", check=verdict), config))
        rows[verdict["fit"]] = console.export_text()
    assert "checkpoint check (--for vllm) │ fit to serve" in rows[True]
    assert "NOT fit: 3 problem(s), see job.json" in rows[False]
    assert "not run: no config.json" in rows[None]


def test_a_fused_float_checkpoint_is_fit_with_a_note(tmp_path):
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(TINY_MOE_PATH).save_pretrained(tmp_path / "fused", save_original_format=False)
    result = check_checkpoint(tmp_path / "fused")
    assert result.fit and result.layout == "fused" and result.projections == 8  # gate_up_proj + down_proj x 4 layers
    assert any("stored fused" in note and "convert --to per-expert" in note for note in result.notes)
    result = check_checkpoint(tmp_path / "fused", "transformers")
    assert result.fit and not any("stored fused" in note for note in result.notes)


def _saved_defused(family, path):
    """A per-expert float checkpoint of a tiny ``family`` model (``save_pretrained`` after ``convert_model``)."""
    import defuser_quant as dq
    from tiny import FAMILIES

    config_fn, cls = FAMILIES[family]
    torch.manual_seed(0)
    model = cls(config_fn()).eval()
    dq.convert_model(model)
    model.save_pretrained(path)
    return path


def test_checkpoint_names_are_read_through_the_family_renamings(tmp_path):
    # mixtral's per-expert checkpoints say block_sparse_moe.experts.{i}.w1 where the model says mlp.experts.
    path = _saved_defused("mixtral", tmp_path / "mixtral")
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert "model.layers.0.block_sparse_moe.experts.0.w1.weight" in set(f.keys())
    result = check_checkpoint(path)
    assert result.fit and result.experts == 16 and result.projections == 48, result.problems


def test_for_transformers_flags_families_stock_does_not_load_per_expert(tmp_path):
    path = _saved_defused("gpt_oss", tmp_path / "gpt_oss")
    assert check_checkpoint(path).fit
    result = check_checkpoint(path, "transformers")
    assert [p.where for p in result.problems] == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all("experts would be randomly initialised; use: import defuser_quant" in p.what for p in result.problems)


def test_identity_expert_slabs_are_a_note_not_a_problem(tmp_path):
    # longcat_flash stores gate_up slabs for its weightless identity experts; nothing reads them.
    from model_zoo import build_tiny_model, skip_unless_longcat_identity_experts_in_block

    skip_unless_longcat_identity_experts_in_block()

    model, _ = build_tiny_model("longcat_flash")
    model.save_pretrained(tmp_path / "longcat")
    result = check_checkpoint(tmp_path / "longcat")
    assert result.fit, result.problems
    assert any("weightless (identity) experts' slabs stored" in note for note in result.notes)


# ----- checkpoints of other tools and irregular families (issue 15) -----------------------------


@pytest.mark.slow
def test_llmcompressor_awq_asymmetric_checkpoint_is_fit_and_zero_points_count(tmp_path_factory, tmp_path):
    from other_tool_checkpoints import llmcompressor_awq

    path = llmcompressor_awq(tmp_path_factory.getbasetemp())
    result = check_checkpoint(path)
    assert result.fit, result.problems
    assert result.quantized == result.projections == 192
    assert result.schemes == {"pack-quantized 4-bit group 128 asymmetric": 192}
    # an up projection stored symmetric (no zero point) next to its asymmetric gate: engines cannot fuse them
    expert = "model.layers.1.mlp.experts.4"
    broken = broken_copy(path, tmp_path / "b", lambda t: t.pop(f"{expert}.up_proj.weight_zero_point"))
    _, problems = _problems(broken)
    assert any(
        p.startswith(f"{expert}: gate and up quantized differently (gate_proj pack-quantized 4-bit group 128 asymmetric, "
                     "up_proj pack-quantized 4-bit group 128)") for p in problems), problems
    assert any(p.startswith("model.layers.1.mlp.experts.*.up_proj: experts of one layer quantized differently") for p in problems)


def _down_proj_float(t):
    """Every ``*.down_proj`` stored as a bf16 ``weight`` instead of GPTQ/AWQ tensors (what a skip list leaves)."""
    modules = {k.rsplit(".", 1)[0] for k in t if ".down_proj." in k}
    for module in modules:
        for leaf in ("qweight", "qzeros", "scales", "g_idx"):
            t.pop(f"{module}.{leaf}", None)
        t[f"{module}.weight"] = torch.zeros(128, 128, dtype=torch.bfloat16)


@pytest.mark.slow
def test_autoawq_style_checkpoint_and_its_suffix_skip_list(tmp_path_factory, tmp_path):
    from other_tool_checkpoints import autoawq_style

    base = tmp_path_factory.getbasetemp()
    result = check_checkpoint(autoawq_style(base))
    assert result.fit and result.schemes == {"awq 4-bit group 128": 192}, result.problems
    # AutoAWQ-style skip lists name modules by suffix; Transformers' AWQ loader reads them so (every
    # ...down_proj stays float): the check must read them the same way, not flag 64 "left unquantized"
    skipped = broken_copy(autoawq_style(base, ["gate", "down_proj"]), tmp_path / "skip", _down_proj_float)
    result = check_checkpoint(skipped)
    assert result.fit, result.problems[:3]
    assert result.quantized == 128 and len(result.not_quantized) == 64
    assert {p.what for p in result.not_quantized} == {"quantization_config.modules_to_not_convert has 'down_proj'"}
    # without the entry the same storage is a problem
    config = json.loads((skipped / "config.json").read_text())
    config["quantization_config"]["modules_to_not_convert"] = ["gate"]
    (skipped / "config.json").write_text(json.dumps(config))
    _, problems = _problems(skipped)
    assert sum("left unquantized (BF16) in a awq checkpoint" in p for p in problems) == 64


IRREGULAR = {"dbrx": "transformer.blocks.1.ffn.experts", "granitemoe": "model.layers.1.block_sparse_moe.experts"}


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(IRREGULAR))
def test_irregular_family_quantized_checkpoints(family, tmp_path_factory, tmp_path):
    from other_tool_checkpoints import llmcompressor_irregular

    path = llmcompressor_irregular(family, tmp_path_factory.getbasetemp())
    block = IRREGULAR[family]
    result = check_checkpoint(path)
    assert result.fit, result.problems
    assert result.layout == "per-expert" and result.quantized == result.projections == 48
    assert result.schemes == {"pack-quantized 4-bit group 32": 48}
    broken = broken_copy(path, tmp_path / "missing", lambda t: [t.pop(k) for k in list(t) if k.startswith(f"{block}.3.")])
    assert [str(p) for p in check_checkpoint(broken).problems] == [f"{block}.3: expert missing: none of its tensors are stored"]
    scale = next(k for k in _keys_of(path) if k.startswith(f"{block}.2.") and k.endswith("weight_scale"))

    def nan(t):
        t[scale] = t[scale].clone()
        t[scale].view(-1)[0] = float("nan")

    problems = [str(p) for p in check_checkpoint(broken_copy(path, tmp_path / "nan", nan)).problems]
    assert problems == [f"{scale.rsplit('.', 1)[0]}: weight_scale has 1 NaN value(s) of {_numel(path, scale)}"]
    # stock Transformers has no per-expert mapping for these families: it would leave the experts random
    result = check_checkpoint(path, "transformers")
    assert [p.where for p in result.problems] == [IRREGULAR[family].replace(".1.", ".0."), block]
    assert all("experts would be randomly initialised" in p.what for p in result.problems)


def _keys_of(path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return sorted(f.keys())


def _numel(path, key) -> int:
    from safetensors import safe_open

    with safe_open(str(path / "model.safetensors"), "pt") as f:
        return f.get_slice(key).get_shape()[0] * f.get_slice(key).get_shape()[1]


def test_fine_grained_fp8_checkpoints_and_what_stock_transformers_does_with_them(tmp_path):
    from pathlib import Path

    from fp8_checkpoints import write_fused_fp8

    fused = write_fused_fp8(Path(TINY_MOE_PATH), tmp_path / "fused", block=(32, 32))
    per_expert = write_fused_fp8(Path(TINY_MOE_PATH), tmp_path / "per_expert", block=(32, 32), per_expert=True)
    result = check_checkpoint(fused, "transformers")
    assert result.fit and result.layout == "fused" and result.schemes == {"fp8 8-bit block 32x32": 8}
    assert len(result.notes) == 4 and all("leaves their *_scale_inv unused" in n and "device_map='cuda'" in n for n in result.notes)
    result = check_checkpoint(per_expert, "transformers")
    assert result.fit and result.layout == "per-expert" and result.schemes == {"fp8 8-bit block 32x32": 192}
    assert all("merges these fine-grained FP8 experts into its fused FP8Experts" in n for n in result.notes)
    key = "model.layers.2.mlp.experts.gate_up_proj_scale_inv"

    def zero(t):
        t[key] = t[key].clone()
        t[key][3, 1, 2] = 0

    assert [str(p) for p in check_checkpoint(broken_copy(fused, tmp_path / "b", zero)).problems] == [
        f"{key}: weight_scale_inv has 1 zero value(s) of 512"]
