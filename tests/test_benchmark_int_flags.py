"""The benchmarks' count and size flags (``benchmarks/_args.whole``): a value below what a run can use
is refused in one argparse line (exit 2) before anything is built or written, shapes whose flags
do not fit together are refused the same way, and the defaults parse to the same values as before."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import calibration_throughput  # noqa: E402
import convert_checkpoint  # noqa: E402
import defuse  # noqa: E402
import distributed_gpu  # noqa: E402
import gptqmodel_gpu  # noqa: E402
import gptqmodel_overhead  # noqa: E402
import grouped_overhead  # noqa: E402
import hessian_inverse_gpu  # noqa: E402
import host_reads  # noqa: E402
import inverse_streams  # noqa: E402
import layer_load  # noqa: E402
import layer_offload  # noqa: E402
import llmc_grouped_check  # noqa: E402
import pack_exactness  # noqa: E402
import quality  # noqa: E402
import whole_model_gpu  # noqa: E402

#: script -> its parse_args, with the arguments it requires
PARSERS = {
    "calibration_throughput": calibration_throughput.parse_args,
    "convert_checkpoint": convert_checkpoint.parse_args,
    "defuse": defuse.parse_args,
    "distributed_gpu": distributed_gpu.parse_args,
    "gptqmodel_gpu": gptqmodel_gpu.parse_args,
    "gptqmodel_overhead": lambda argv: gptqmodel_overhead.parse_args(["--out", "unused", *argv]),
    "grouped_overhead": grouped_overhead.parse_args,
    "hessian_inverse_gpu": hessian_inverse_gpu.parse_args,
    "host_reads": host_reads.parse_args,
    "inverse_streams": inverse_streams.parse_args,
    "layer_load": layer_load.parse_args,
    "layer_offload": layer_offload.parse_args,
    "llmc_grouped_check": llmc_grouped_check.parse_args,
    "pack_exactness": lambda argv: pack_exactness.parse_args(["--device", "cpu", *argv]),
    "quality": quality.parse_args,
    "whole_model_gpu": lambda argv: whole_model_gpu.parse_args(["--backend", "gptqmodel", *argv]),
}

#: script -> {flag: the least value it takes} (the flags that were plain ``type=int``)
MINIMUMS = {
    "calibration_throughput": {f: 1 for f in ("--hidden", "--intermediate", "--experts", "--top-k", "--layers", "--heads",
                                              "--kv-heads", "--head-dim", "--vocab", "--batch-size", "--seq-len",
                                              "--batches", "--repeats")},
    "convert_checkpoint": {f: 1 for f in ("--layers", "--experts", "--hidden", "--intermediate", "--vocab", "--repeat")},
    "defuse": {**{f: 1 for f in ("--layers", "--experts", "--hidden", "--intermediate", "--repeat", "--forward-repeats")},
               "--forward-tokens": 0},
    "distributed_gpu": {"--nproc": 2, "--layers": 1, "--timeout": 1},
    "gptqmodel_gpu": {"--layers": 1, "--batch-size": 1, "--timeout": 1},
    "gptqmodel_overhead": {**{f: 1 for f in ("--layers", "--experts", "--hidden", "--intermediate", "--top-k", "--samples",
                                             "--batch-size", "--top")}, "--seq-len": gptqmodel_gpu.MIN_ROW_TOKENS},
    "grouped_overhead": {f: 1 for f in ("--experts", "--top-k", "--hidden", "--intermediate", "--tokens", "--calls",
                                        "--repeats", "--threads")},
    "hessian_inverse_gpu": {f: 1 for f in ("--experts", "--hidden", "--intermediate", "--layers", "--rows", "--repeats")},
    "host_reads": {f: 1 for f in ("--tensors", "--rows", "--cols")},
    "inverse_streams": {f: 1 for f in ("--columns", "--tokens", "--repeats")},
    "layer_load": {f: 1 for f in ("--tensors", "--rows", "--cols", "--busy", "--repeats")},
    "layer_offload": {f: 1 for f in ("--experts", "--hidden", "--intermediate", "--repeats", "--staging-mib")},
    "llmc_grouped_check": {"--samples": 1, "--seq-len": 1},
    "pack_exactness": {"--out": 32, "--inp": 32},
    "quality": {"--samples": 1, "--seq-len": 1, "--eval-samples": 1},
    "whole_model_gpu": {"--batch-size": 1},
}

#: (script, flag) -> the other flags a run at the flag's minimum needs (so the shape still fits together)
AT_MINIMUM_WITH = {
    ("calibration_throughput", "--experts"): ["--top-k", "1"],
    ("calibration_throughput", "--heads"): ["--kv-heads", "1"],
    ("gptqmodel_overhead", "--experts"): ["--top-k", "1"],
    ("grouped_overhead", "--experts"): ["--top-k", "1"],
    ("pack_exactness", "--inp"): ["--group-size", "32"],  # --inp: a multiple of --group-size
}
#: (script, flag) -> the least value a run takes when another flag sets a higher floor than the type's
LEAST_ACCEPTED = {("defuse", "--experts"): defuse.TOP_K}

FLAGS = [(script, flag, minimum) for script, flags in sorted(MINIMUMS.items()) for flag, minimum in flags.items()]


def _refused(capsys, script: str, argv: list[str]) -> str:
    """The last stderr line of ``script``'s parse_args(argv), which must exit 2."""
    with pytest.raises(SystemExit) as exc:
        PARSERS[script](argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "error:" in line]) == 1, err
    return err[-1]


@pytest.mark.parametrize("script,flag,minimum", FLAGS, ids=[f"{s}{f}" for s, f, _ in FLAGS])
def test_a_value_below_the_minimum_is_one_error_line(capsys, script, flag, minimum):
    last = _refused(capsys, script, [flag, str(minimum - 1)])
    assert f"error: argument {flag}: must be >= {minimum}, got {minimum - 1}" in last, last


@pytest.mark.parametrize("script", sorted(MINIMUMS))
def test_a_value_that_is_not_a_whole_number_is_one_error_line(capsys, script):
    flag = next(iter(MINIMUMS[script]))
    last = _refused(capsys, script, [flag, "2.5"])
    assert f"error: argument {flag}: expected a whole number, got '2.5'" in last, last


@pytest.mark.parametrize("script,flag,minimum", FLAGS, ids=[f"{s}{f}" for s, f, _ in FLAGS])
def test_the_minimum_itself_is_taken(script, flag, minimum):
    value = LEAST_ACCEPTED.get((script, flag), minimum)
    args = PARSERS[script]([flag, str(value), *AT_MINIMUM_WITH.get((script, flag), [])])
    assert getattr(args, flag[2:].replace("-", "_")) == value


@pytest.mark.parametrize("script,argv,says", [
    ("calibration_throughput", ["--experts", "4", "--top-k", "5"], "--top-k 5 is more than --experts 4"),
    ("calibration_throughput", ["--heads", "6", "--kv-heads", "4"], "--heads 6 is not a multiple of --kv-heads 4"),
    ("gptqmodel_overhead", ["--experts", "4"], "--top-k 8 is more than --experts 4"),
    ("grouped_overhead", ["--experts", "16", "--top-k", "17"], "--top-k 17 is more than --experts 16"),
    ("defuse", ["--experts", "7"], f"--experts 7 is fewer than the {defuse.TOP_K} experts each token picks"),
    ("distributed_gpu", ["--intermediate", "64"], "--intermediate gives quantized rows of 64 columns, not a multiple of "
                                                  "W4A16's group size 128"),
    ("distributed_gpu", ["--hidden", "192"], "--hidden gives quantized rows of 192 columns"),
    ("distributed_gpu", ["--heads", "4", "--kv-heads", "2", "--head-dim", "48"], "--heads x --head-dim gives quantized rows of 192"),
])
def test_shapes_that_do_not_fit_together_are_one_error_line(capsys, script, argv, says):
    last = _refused(capsys, script, argv)
    assert says in last, last


#: script -> the defaults of its count and size flags (and of the int flags kept as they were), as before
DEFAULTS = {
    "calibration_throughput": dict(hidden=512, intermediate=256, experts=32, top_k=4, layers=4, heads=8, kv_heads=4,
                                   head_dim=64, vocab=1024, batch_size=2, seq_len=128, batches=2, repeats=3,
                                   min_tokens=None, threads=None),
    "convert_checkpoint": dict(layers=4, experts=128, hidden=2048, intermediate=768, vocab=1024, repeat=3, small=False),
    "defuse": dict(layers=2, experts=128, hidden=2048, intermediate=768, repeat=1, forward_tokens=256, forward_repeats=3),
    "distributed_gpu": dict(nproc=2, layers=2, timeout=900, warmup_samples=8, repeat=1, experts=128, top_k=8),
    "gptqmodel_gpu": dict(layers=1, batch_size=8, timeout=420, repeat=1, gpus=None, experts=128, top_k=8),
    "gptqmodel_overhead": dict(layers=2, experts=128, hidden=128, intermediate=64, top_k=8, samples=32, seq_len=64,
                               batch_size=8, top=60),
    "grouped_overhead": dict(experts=128, top_k=8, hidden=64, intermediate=32, tokens=512, calls=20, repeats=9, threads=1),
    "hessian_inverse_gpu": dict(experts=128, hidden=2048, intermediate=768, layers=2, rows=512, repeats=3),
    "host_reads": dict(tensors=384, rows=768, cols=2048),
    "layer_load": dict(tensors=384, rows=768, cols=2048, busy=8, repeats=3),
    "inverse_streams": dict(hessians=16, columns=2048, tokens=512, threads=4, repeats=3, seed=0),
    "layer_offload": dict(experts=128, hidden=2048, intermediate=768, repeats=5, staging_mib=64),
    "llmc_grouped_check": dict(samples=16, seq_len=64),
    "pack_exactness": dict(modules=128, out=768, inp=2048, group_size=128),
    "quality": dict(samples=4, seq_len=128, eval_samples=32),
    "whole_model_gpu": dict(layers=48, batch_size=8, seed=0, experts=128, top_k=8),
}


@pytest.mark.parametrize("script", sorted(DEFAULTS))
def test_the_defaults_parse_as_before(script):
    args = PARSERS[script]([])
    got = {key: getattr(args, key) for key in DEFAULTS[script]}
    assert got == DEFAULTS[script]
    assert all(type(v) is type(DEFAULTS[script][k]) for k, v in got.items())


def test_the_int_flags_kept_as_they_were_still_take_their_special_values():
    assert defuse.parse_args(["--forward-tokens", "0"]).forward_tokens == 0  # 0: no timed forward
    assert defuse.parse_args(["--small", "--experts", "4"]).experts == 8  # --small sets the shape, as before
    assert calibration_throughput.parse_args(["--threads", "0", "--min-tokens", "0"]).threads == 0  # 0: torch's choice
    assert gptqmodel_gpu.parse_args(["--gpus", "0"]).gpus == 0  # 0 (like None): every visible GPU
    args = whole_model_gpu.parse_args(["--backend", "gptqmodel", "--device", "cpu", "--tiny"])
    assert args.layers == 2  # None: the tiny shape's layers


@pytest.mark.parametrize("script,argv,says", [
    ("defuse.py", ["--experts", "0"], "argument --experts: must be >= 1, got 0"),
    ("convert_checkpoint.py", ["--layers", "0"], "argument --layers: must be >= 1, got 0"),
    ("calibration_throughput.py", ["--experts", "0"], "argument --experts: must be >= 1, got 0"),
    ("distributed_gpu.py", ["--device", "cpu", "--layers", "0"], "argument --layers: must be >= 1, got 0"),
])
def test_the_scripts_exit_2_with_one_line_and_write_nothing(tmp_path, script, argv, says):
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *argv, "--output", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr.strip().splitlines()
    assert says in err[-1] and "Traceback" not in proc.stderr, proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
