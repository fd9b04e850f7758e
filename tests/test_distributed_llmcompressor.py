"""Calibration spread over processes with torchrun on the CPU (gloo), against one process on the
same data: DefuseModifier inside llm-compressor's distributed oneshot, and ``defuser-quant run --nproc``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("llmcompressor")
pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")

TESTS = Path(__file__).parent
ROOT = TESTS.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "LLM_COMPRESSOR_LOG_LEVEL": "ERROR", "TOKENIZERS_PARALLELISM": "false"}


def _run(args: list[str], nproc: int = 1, timeout: int = 420) -> subprocess.CompletedProcess:
    """``python ARGS`` in one process, or under torchrun in ``nproc`` (a hang fails by timeout)."""
    launcher = [] if nproc == 1 else ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.run(
        [sys.executable, *launcher, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout
    )


def _report(path: Path) -> dict:
    return json.loads(path.read_text())


def _routed(report: dict, layer: int) -> list[int]:
    return [e["routed"] for e in report["layers"][layer]["experts"]]


def _assert_equally_good(one: Path, two: Path) -> None:
    """Two GPTQ checkpoints of the same data are equivalent when they quantize equally well: on
    held-out text both stay as close to the float model (GPTQ is chaotic with little data: later
    layers see inputs that differ by float rounding, so their solves differ)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from defuser_quant.assets import CORPUS_DIR, TINY_MOE_PATH

    text = (CORPUS_DIR / "heldout.txt").read_text(encoding="utf-8")[:3000]
    ids = AutoTokenizer.from_pretrained(TINY_MOE_PATH)(text, return_tensors="pt").input_ids[:, :128]
    logits = []
    for path in (TINY_MOE_PATH, one, two):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            logits.append(model(ids).logits)
    ref, a, b = logits
    error_one, error_two = ((x - ref).norm() / ref.norm() for x in (a, b))
    assert error_two < 1.4 * error_one, (error_one, error_two)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item() > 0.995


# ----- the counting primitives ------------------------------------------------------------------

_PRIMITIVES = textwrap.dedent(
    """
    import json, sys
    from defuser_quant.calibration import distributed as d
    d.init_from_env("gloo")
    r, out = d.rank(), {}
    out["sum"] = d.all_reduce_counts({"b": ([5, r], [1, 0]), "a": ([r + 1, 2 * r, 7], [0, r, 3])})
    for name, call in [
        ("mismatch", lambda: d.all_reduce_counts({"a": ([1], [0])} if r == 0 else {"a": ([1, 2], [0, 0])})),
        ("same_batches", lambda: d.check_distinct_shares([(1, 2), (3, 4)][:: 1 if r == 0 else -1])),
        ("own_batches", lambda: d.check_distinct_shares([(r, 1)])),
    ]:
        try:
            call()
            out[name] = None
        except Exception as exc:
            out[name] = f"{type(exc).__name__}: {exc}"
    out["share"] = d.partition_bounds(5)
    json.dump(out, open(sys.argv[1] + f"/rank{r}.json", "w"))
    import torch.distributed as dist
    dist.barrier()
    dist.destroy_process_group()
    """
)


def test_counts_are_summed_over_ranks_and_different_models_or_data_refused(tmp_path):
    script = tmp_path / "primitives.py"
    script.write_text(_PRIMITIVES)
    done = _run([str(script), str(tmp_path)], nproc=2, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for rank, out in enumerate(ranks):
        assert out["sum"] == {"a": [[3, 2, 14], [0, 1, 6]], "b": [[10, 1], [2, 0]]}
        assert out["mismatch"].startswith("DistributedMismatchError: rank") and "same model" in out["mismatch"]
        assert out["same_batches"].startswith("DuplicatedCalibrationDataError: ranks 0 and 1 calibrated on the same 2")
        assert out["own_batches"] is None
        assert out["share"] == [[0, 2], [2, 5]][rank]


def test_one_process_is_not_distributed():
    from defuser_quant.calibration import distributed

    counts = {"x": ([1, 2], [0, 3])}
    assert not distributed.is_distributed() and distributed.is_main_process()
    assert distributed.all_reduce_counts(counts) == {"x": ([1, 2], [0, 3])}
    assert distributed.rank_share([1, 2, 3]) == [1, 2, 3]


# ----- DefuseModifier inside llm-compressor's distributed oneshot -------------------------------

SAMPLES, SEQ = 16, 8  # 16 routed assignments per batch over 16 experts: every rank misses experts


@pytest.fixture(scope="module")
def one_and_two_processes(tmp_path_factory):
    """routed calibration of the shipped tiny model, once in one process, once in two (gloo)."""
    runs = {}
    for nproc in (1, 2):
        out = tmp_path_factory.mktemp(f"nproc{nproc}")
        args = [str(TESTS / "distributed_oneshot.py"), str(out), "routed", str(SAMPLES), str(SEQ), "--count-collectives"]
        done = _run(args + (["--small-shards"] if nproc == 2 else []), nproc=nproc)
        assert done.returncode == 0, done.stderr[-4000:]
        runs[nproc] = out
    return runs


@pytest.mark.slow
def test_every_rank_reports_the_whole_data_like_one_process(one_and_two_processes):
    one, two = one_and_two_processes[1], one_and_two_processes[2]
    single, rank0, rank1 = _report(one / "report-rank0.json"), _report(two / "report-rank0.json"), _report(two / "report-rank1.json")
    assert rank0 == rank1  # one report: same counts, same under_threshold list, same policy outcome
    assert rank0["totals"]["routed_tokens"] == single["totals"]["routed_tokens"] == 4 * SAMPLES * SEQ * 2
    assert _routed(rank0, 0) == _routed(single, 0)  # layer 0 sees unquantized inputs: identical routing
    assert (two / "coverage-rank0.json").is_file() and not (two / "coverage-rank1.json").exists()
    assert _report(two / "coverage-rank0.json") == rank0


@pytest.mark.slow
def test_two_process_checkpoint_equals_one_process_within_gptq_tolerance(one_and_two_processes):
    """GPTQ reduces Hessians over ranks module by module: the routed experts must be paired right
    (ranks meet them in different orders, some not at all) or the run hangs or mixes them up."""
    from transformers import AutoModelForCausalLM

    one, two = (AutoModelForCausalLM.from_pretrained(one_and_two_processes[n]).eval() for n in (1, 2))
    a, b = one.state_dict(), two.state_dict()
    for name in ("model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj"):
        differ = (a[name] != b[name]).float().mean().item()
        assert differ < 1e-3, (name, differ)  # layer 0 sees the same inputs: summation order only
    _assert_equally_good(one_and_two_processes[1], one_and_two_processes[2])


@pytest.mark.slow
def test_two_process_checkpoint_is_written_once_by_rank_0s_writer_pool(one_and_two_processes):
    one, two = one_and_two_processes[1], one_and_two_processes[2]
    assert sorted(p.name for p in one.glob("model*.safetensors*")) == ["model.safetensors"]
    index = json.loads((two / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in two.glob("model*.safetensors"))
    assert len(shards) >= 3 and sorted(set(index["weight_map"].values())) == shards
    assert not [p for p in two.iterdir() if p.name.startswith(("tmp", ".")) or p.suffix == ".partial"]


@pytest.mark.slow
def test_defuse_modifier_adds_no_collective_per_batch_or_expert(one_and_two_processes):
    """What DefuseModifier itself sends over the process group: nothing during the forward passes,
    one all-reduce per layer (plus the CPU-only barrier after each solve), the data-split check once,
    the coverage reduce once. A per-batch, per-expert or per-module collective shows up here."""
    one, two = (json.loads((one_and_two_processes[n] / "collectives-rank0.json").read_text()) for n in (1, 2))
    assert one["calls"] == []
    rank1 = json.loads((one_and_two_processes[2] / "collectives-rank1.json").read_text())
    assert rank1["calls"] == two["calls"]  # the same sequence on both ranks, or they would hang
    by_phase: dict[str, list[str]] = {}
    for phase, name in two["calls"]:
        by_phase.setdefault(phase, []).append(name)
    assert not [p for p in by_phase if not p.startswith(("epoch_end.", "finalize"))], by_phase  # none in the forwards
    layers = [names for p, names in by_phase.items() if "barrier" in names]
    assert len(layers) == 4  # the tiny model's decoder layers
    for names in by_phase.values():
        assert names.count("all_reduce") <= 1 and names.count("barrier") <= 1, by_phase
    assert sum(names.count("all_gather_object") for names in by_phase.values()) == 2  # data check, coverage
    assert two["grouped"] > 0 and two["loop"] == 0  # the grouped forward ran under torchrun


@pytest.mark.slow
def test_the_same_dataset_on_every_rank_is_refused(tmp_path):
    """llm-compressor 0.14 loads the first half of an identical dataset on both ranks: caught."""
    done = _run([str(TESTS / "distributed_oneshot.py"), str(tmp_path), "routed", str(SAMPLES), str(SEQ), "--same-data"], nproc=2)
    assert done.returncode != 0
    assert "ranks 0 and 1 calibrated on the same 8 batch(es)" in done.stderr and "rank_share" in done.stderr
    assert not (tmp_path / "model.safetensors").exists()


@pytest.mark.slow
def test_budgeted_under_torchrun_tops_up_from_every_ranks_counts(tmp_path):
    """Each expert ends with max(routed, min_tokens) tokens over the whole data, the same report
    on every rank, and forces no more tokens than one process (which tops up batch by batch)."""
    floor = 32
    runs = {}
    for nproc in (1, 2):
        out = tmp_path / f"nproc{nproc}"
        out.mkdir()
        args = [str(TESTS / "distributed_oneshot.py"), str(out), "budgeted", str(SAMPLES), str(SEQ), f"--min-tokens={floor}"]
        done = _run(args, nproc=nproc)
        assert done.returncode == 0, done.stderr[-4000:]
        runs[nproc] = out
    one, rank0, rank1 = (_report(runs[n] / f"report-rank{r}.json") for n, r in ((1, 0), (2, 0), (2, 1)))
    assert rank0 == rank1
    assert rank0["totals"]["under_threshold"] == 0 and rank0["totals"]["forced_tokens"] > 0
    for layer in rank0["layers"]:
        for e in layer["experts"]:
            assert e["forced"] == max(0, floor - e["routed"]) and e["calibrated"] == max(e["routed"], floor), (layer["path"], e)
    assert rank0["totals"]["routed_tokens"] == one["totals"]["routed_tokens"]
    assert rank0["totals"]["forced_tokens"] <= one["totals"]["forced_tokens"]


# ----- defuser-quant run --nproc ------------------------------------------------------------------

JOB = [
    "--set", "calibration.data.num_samples=16", "--set", "calibration.data.seq_len=64", "--set", "calibration.routing=all",
    "--set", "evaluation.enabled=false",
]


@pytest.mark.slow
def test_run_nproc_2_writes_one_output_equal_to_one_process(tmp_path):
    outputs = {}
    for nproc in (1, 2):
        out = tmp_path / f"nproc{nproc}"
        done = _run(["-m", "defuser_quant", "run", "--nproc", str(nproc), "-o", str(out), *JOB], timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        assert done.stdout.count("defuser-quant job summary") == 1  # rank 1 prints nothing
        outputs[nproc] = out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nproc1", "nproc2"]  # no leftover staging folders
    one, two = (_report(outputs[n] / "coverage.json") for n in (1, 2))
    assert two["totals"] == one["totals"] and two["totals"]["under_threshold"] == 0
    assert _routed(two, 0) == _routed(one, 0)
    job = _report(outputs[2] / "job.json")
    assert job["experts"]["quantized"] == job["experts"]["projections"] > 0
    _assert_equally_good(outputs[1], outputs[2])


def test_run_nproc_refuses_the_gptqmodel_backend_before_starting(tmp_path, capsys):
    from defuser_quant.cli import main

    code = main(["run", "--nproc", "2", "-o", str(tmp_path / "out"), "--set", "quantization.backend=gptqmodel"])
    assert code == 2
    assert "does not run under torchrun (--nproc 2): only the llmcompressor backend" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_run_argv_round_trips_through_the_parser():
    from defuser_quant.cli import build_parser
    from defuser_quant.cli.multiprocess import run_argv

    argv = ["-v", "run", "job.yaml", "--output", "o", "--overwrite", "--set", "a.b=1", "--set", "c=x"]
    args = build_parser().parse_args([*argv[:2], "--nproc", "3", *argv[2:]])
    assert args.nproc == 3 and run_argv(args) == argv
