"""benchmarks/ratio_tally.py: the committed tally is the committed results' own, it pairs each call's
turns as the benchmarks ran them, leaves instrumented calls out, and the README quotes its counts."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import ratio_tally  # noqa: E402


def _gptqmodel_call(path: Path, stock: list[float | None], ours: list[float | None], gpu: str = "NVIDIA H100") -> None:
    rows = []
    for variant, times in (("ours-grouped-batched", ours), ("stock", stock), ("ours-grouped-batched-x", [1.0] * 3)):
        for k, t in enumerate(times):
            rows.append({"variant": variant, "run": variant if k == 0 else f"{variant}#{k + 1}", "total_s": t})
    path.write_text(json.dumps({"meta": {"gpu": gpu}, "rows": rows}))


def _llmc_call(path: Path, stock: list[float | None], ours: list[float | None]) -> None:
    rows = [{"variant": v, "nproc": 1, "repeat": k, "oneshot_s": t}
            for v, times in (("stock", stock), ("all", ours)) for k, t in enumerate(times)]
    rows.append({"variant": "all", "nproc": 2, "repeat": 0, "oneshot_s": 1.0})  # two ranks: another measurement
    path.write_text(json.dumps({"gpu": "NVIDIA H200", "rows": rows}))


def test_the_committed_tally_is_the_committed_results_own():
    assert ratio_tally.main(["--check"]) == 0, "run python benchmarks/ratio_tally.py and commit the tally"


def test_pairs_turns_and_counts_windows(tmp_path):
    _gptqmodel_call(tmp_path / "gptqmodel_cuda_2layers_round60_h100x1.json", [40.0, 36.0, 44.0], [10.0, 9.0, 12.0])
    _gptqmodel_call(tmp_path / "gptqmodel_cuda_2layers_round50b.json", [30.0, None], [10.0, 7.0])
    _gptqmodel_call(tmp_path / "gptqmodel_cuda_2layers_round61_sampled_h200x1.json", [50.0], [1.0])  # instrumented
    _llmc_call(tmp_path / "distributed_cuda_round58_h100x1.json", [36.0, 35.0], [8.0, 7.0])
    _llmc_call(tmp_path / "distributed_cuda_round58gil_h100x1.json", [36.0], [1.0])  # instrumented
    _llmc_call(tmp_path / "distributed_cuda_round59.json", [36.0], [])  # no run of ours: not a call

    data = ratio_tally.tally(tmp_path, windows=(50, 60))
    g, l = data["gptqmodel"], data["llmcompressor"]
    assert [c["file"] for c in g["calls"]] == ["gptqmodel_cuda_2layers_round50b.json",
                                              "gptqmodel_cuda_2layers_round60_h100x1.json"]
    assert [(p["turn"], p["ratio"]) for p in g["calls"][0]["pairs"]] == [(0, 3.0)]  # stock's turn 2 has no time
    assert [p["ratio"] for p in g["calls"][1]["pairs"]] == [4.0, 4.0, 3.67]
    assert g["calls"][1]["every_stock_run"] == [3.0, 4.0, 4.89]
    assert g["calls"][1]["gpu"] == "NVIDIA H100"
    assert g["windows"] == [
        {"since_round": 50, "calls": 2, "pairs": 4, "at_least_4x": 2, "ratio": [3.0, 3.83, 4.0]},
        {"since_round": 60, "calls": 1, "pairs": 3, "at_least_4x": 2, "ratio": [3.67, 4.0, 4.0]},
    ]
    assert [c["file"] for c in l["calls"]] == ["distributed_cuda_round58_h100x1.json"]
    assert [p["ratio"] for p in l["calls"][0]["pairs"]] == [4.5, 5.0]
    assert l["windows"][0] == {"since_round": 50, "calls": 1, "pairs": 2, "at_least_4x": 2, "ratio": [4.5, 4.75, 5.0]}
    assert l["windows"][1]["pairs"] == 0 and l["windows"][1]["ratio"] is None


def test_check_says_stale_and_writes_only_when_asked(tmp_path, capsys):
    _llmc_call(tmp_path / "distributed_cuda_round58_h100x1.json", [36.0], [8.0])
    assert ratio_tally.main(["--results", str(tmp_path), "--check"]) == 1
    assert "stale or missing" in capsys.readouterr().err
    assert not (tmp_path / "ratio_tally.json").exists()
    assert ratio_tally.main(["--results", str(tmp_path)]) == 0
    assert ratio_tally.main(["--results", str(tmp_path), "--check"]) == 0
    _llmc_call(tmp_path / "distributed_cuda_round59_h100x1.json", [36.0], [9.0])  # a new call: the tally is stale
    assert ratio_tally.main(["--results", str(tmp_path), "--check"]) == 1


def test_a_result_without_rows_is_refused_by_name(tmp_path):
    (tmp_path / "distributed_cuda_round60_h100x1.json").write_text(json.dumps({"table": []}))
    with pytest.raises(ValueError, match=r"distributed_cuda_round60_h100x1.json: no 'rows' list"):
        ratio_tally.tally(tmp_path)


def test_a_cut_short_result_is_one_clear_error_and_writes_nothing(tmp_path, capsys):
    _llmc_call(tmp_path / "distributed_cuda_round58_h100x1.json", [36.0], [8.0])
    (tmp_path / "gptqmodel_cuda_2layers_round60_h100x1.json").write_text('{"rows": [')
    with pytest.raises(SystemExit) as err:
        ratio_tally.main(["--results", str(tmp_path)])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.value.code == 2 and "gptqmodel_cuda_2layers_round60_h100x1.json: not JSON" in line
    assert not (tmp_path / "ratio_tally.json").exists()


def test_never_writes_over_a_file_it_did_not_write(tmp_path, capsys):
    _llmc_call(tmp_path / "distributed_cuda_round58_h100x1.json", [36.0], [8.0])
    other = tmp_path / "notes.json"
    other.write_text('{"mine": 1}')
    with pytest.raises(SystemExit) as err:
        ratio_tally.main(["--results", str(tmp_path), "--output", str(other)])
    assert err.value.code == 2 and "is not a tally this script wrote" in capsys.readouterr().err
    assert other.read_text() == '{"mine": 1}'
    assert ratio_tally.main(["--results", str(tmp_path), "--output", str(tmp_path / "t.json")]) == 0
    assert ratio_tally.main(["--results", str(tmp_path), "--output", str(tmp_path / "t.json")]) == 0  # its own: rewritten


def test_a_missing_results_folder_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        ratio_tally.main(["--results", str(tmp_path / "nowhere")])
    assert err.value.code == 2 and "not a folder of result files" in capsys.readouterr().err


QUOTE = re.compile(r"(\d+) of (\d+) own-round pairs at least 4x since round (\d+)")


@pytest.mark.parametrize("backend, row", [("gptqmodel", "| >= 4x stock end to end, GPTQModel, two layers |"),
                                          ("llmcompressor", "| >= 4x stock, llm-compressor, two layers |")])
def test_the_readme_quotes_the_tally(backend, row):
    line = next(line for line in (ROOT / "README.md").read_text(encoding="utf-8").splitlines() if line.startswith(row))
    quotes = QUOTE.findall(line)
    assert quotes, f"the README's {backend} row quotes no count from ratio_tally.json"
    windows = {w["since_round"]: w for w in json.loads(ratio_tally.TALLY.read_text())[backend]["windows"]}
    for hits, pairs, since in quotes:
        w = windows[int(since)]
        assert (int(hits), int(pairs)) == (w["at_least_4x"], w["pairs"]), f"{backend} since round {since}: {w}"
    assert "ratio_tally.json" in line
