"""The benchmarks' model shape flags (``gptqmodel_gpu.add_shape_args``): a shape that cannot be built
is refused in one line before anything runs, and a calibration request the bundled corpus cannot
meet is refused before the model is built."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import distributed_gpu  # noqa: E402
import gptqmodel_gpu  # noqa: E402
import whole_model_gpu  # noqa: E402

PARSERS = {
    "gptqmodel_gpu": gptqmodel_gpu.parse_args,
    "distributed_gpu": distributed_gpu.parse_args,
    "whole_model_gpu": lambda argv: whole_model_gpu.parse_args(["--backend", "gptqmodel", *argv]),
}


@pytest.mark.parametrize("script", sorted(PARSERS))
@pytest.mark.parametrize("argv,says", [
    (["--seq-len", "8"], "argument --seq-len: must be >= 16, got 8"),
    (["--experts", "0"], "argument --experts: must be >= 1, got 0"),
    (["--samples", "0"], "argument --samples: must be >= 1, got 0"),
    (["--vocab", "100"], "argument --vocab: must be >= 258, got 100"),
    (["--hidden", "2k"], "argument --hidden: expected a whole number, got '2k'"),
    (["--experts", "8", "--top-k", "9"], "--top-k 9 is more than --experts 8"),
    (["--heads", "5", "--kv-heads", "2"], "--heads 5 is not a multiple of --kv-heads 2"),
])
def test_shapes_that_cannot_be_built_are_refused_in_one_line(capsys, script, argv, says):
    with pytest.raises(SystemExit) as exc:
        PARSERS[script](argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert says in err[-1], err


@pytest.mark.parametrize("script", sorted(PARSERS))
def test_the_default_shape_is_accepted(script):
    args = PARSERS[script]([])
    assert (args.experts, args.top_k, args.seq_len, args.vocab) == (128, 8, 256, 151936)


def _shape(samples: int) -> argparse.Namespace:
    return argparse.Namespace(vocab=1024, hidden=64, intermediate=32, layers=1, heads=2, kv_heads=1, head_dim=32,
                              experts=4, top_k=2, samples=samples, seq_len=16, device="cpu")


def test_the_corpus_rows_are_counted_and_more_are_refused_before_the_model_is_built(tmp_path):
    with pytest.raises(SystemExit) as exc:
        gptqmodel_gpu.build_source(_shape(10_000_000), tmp_path / "too_many")
    message = str(exc.value)
    assert message.startswith("--samples 10000000: the bundled corpus (train.txt) gives only "), message
    available = int(message.rsplit("ask for at most ", 1)[1])
    assert available > 0
    assert not list((tmp_path / "too_many").glob("*.safetensors")), "the model was built before the refusal"
    rows = gptqmodel_gpu.build_source(_shape(available), tmp_path / "all_rows")
    assert len(rows) == available
    assert all(len(r["input_ids"]) == len(r["attention_mask"]) == 16 for r in rows)  # truncated to --seq-len
    assert list((tmp_path / "all_rows").glob("*.safetensors")), "no model saved"
    first = gptqmodel_gpu.build_source(_shape(3), tmp_path / "three")
    assert [r["input_ids"] for r in first] == [r["input_ids"] for r in rows[:3]]
