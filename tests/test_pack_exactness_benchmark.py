"""benchmarks/pack_exactness.py: packing many modules at once with torch ops gives GPTQModel's
``pack_block_cpu`` words, byte for byte (CPU; the same comparison runs on CUDA on the device)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import pack_exactness as bench  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def extension():
    from gptqmodel.utils.cpp import load_pack_block_extension

    if load_pack_block_extension() is None:
        pytest.skip("GPTQModel's pack_block_cpu extension could not be built here (no C++ compiler)")


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("sym", "act_order"), [(True, False), (False, True)])
def test_torch_pack_gives_the_extensions_words(extension, bits, sym, act_order):
    inputs = bench.make_inputs(3, 64, 256, 64, bits, sym, act_order, seed=bits)
    inputs["scales"][1, 2, :5] = 0  # zero scales: the extension divides by 1e-6 there and its offset is 0
    col = inputs["g_idx"] == 2
    inputs["weight"][1][:5, col] = 0
    want_w, want_z, _ = bench.extension_pack(inputs, bits)
    got_w, got_z = bench.torch_pack(**inputs, bits=bits)
    assert got_w.dtype == got_z.dtype == torch.int32
    for b in range(3):
        assert torch.equal(want_w[b], got_w[b]) and torch.equal(want_z[b], got_z[b])


@pytest.mark.parametrize("bits", [4, 8])
def test_ties_round_half_to_even_as_the_extension_does(extension, bits):
    """GPTQ's dequantized weights sit within a small fraction of a step of their code, where any
    rounding agrees; weights exactly half-way between two codes (power-of-two scales make them
    exact) must go to the even code, as the extension's ``nearbyint`` does."""
    inputs = bench.make_inputs(2, 64, 256, 64, bits, False, True, seed=7)
    inputs["scales"].fill_(2.0**-6)
    maxq = (1 << bits) - 1
    g = torch.Generator().manual_seed(bits)
    halves = torch.randint(-2 * maxq, 2 * maxq + 1, inputs["weight"].shape, generator=g).to(torch.float32) / 2
    inputs["weight"] = (halves * 2.0**-6).to(torch.bfloat16)  # exact in bf16: (w + z * s) / s = k + 1/2 exactly
    want_w, want_z, _ = bench.extension_pack(inputs, bits)
    got_w, got_z = bench.torch_pack(**inputs, bits=bits)
    for b in range(2):
        assert torch.equal(want_w[b], got_w[b]) and torch.equal(want_z[b], got_z[b])


def test_what_it_does_not_pack_is_refused(capsys):
    inputs = bench.make_inputs(1, 64, 256, 64, 4, True, False)
    with pytest.raises(ValueError, match="2, 4 or 8"):
        bench.torch_pack(**inputs, bits=3)
    for argv in (["--bits", "3"], ["--inp", "100"], ["--modules", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(["--device", "cpu", *argv])
    assert "--bits: 2, 4 or 8 only" in capsys.readouterr().err


def test_the_report_says_every_module_was_equal(extension, tmp_path):
    out = tmp_path / "pack.json"
    assert bench.main(["--device", "cpu", "--modules", "2", "--out", "64", "--inp", "256", "--group-size", "128",
                       "--bits", "4", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["all_equal"] is True and len(report["rows"]) == 4  # sym/asym x natural/act order
    assert all(r["modules_equal"] == r["modules"] == 2 for r in report["rows"])
