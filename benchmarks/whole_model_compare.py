"""Compare two ``whole_model_gpu.py`` results side by side: per-layer times and the steady-state ratio.

    python benchmarks/whole_model_compare.py stock.json ours.json [--output compare.json]

Both files must come from the same backend, device, model shape and calibration (else one line
says what differs and the exit code is 2); runs that ended in an error, or whose GPTQ solves fell back
from GPTQModel's CUDA extension (``fallback`` in the JSON), are refused too. For each
run: its variant (stock / ours), status, layers done, median seconds per layer. Then:

* ``steady_state``: the median of layers 2..n of each run, where n is the number of layers BOTH
  runs completed (layer 1 also holds warm-up: kernel compilation, first allocations), and the
  ratio A / B of those medians (with ``--stock`` vs ours: the speed-up). A measurement, labelled
  with the layer range it covers.
* ``totals``: per run the quantize time of all layers: the measured sum when the run is complete,
  else a PROJECTION (measured layers + the missing ones x that run's steady-state median), labelled
  as such; their ratio is a projection as soon as one of them is.

Prints a markdown table and writes the JSON (with both source file names) to ``--output``
(default ``$OUT/whole_model_compare_<backend>.json`` when ``$OUT`` is set, else ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
logger = logging.getLogger("whole_model_compare")

EXIT_OK, EXIT_REFUSED = 0, 2
PROJECTION = "PROJECTION (not a measurement)"
#: what must be equal for two runs to be compared (JSON keys of whole_model_gpu.py's result)
SAME = ("backend", "device", "shape", "calibration", "quantization", "batch_size", "gptq_kernel")


class Refused(ValueError):
    """The two results cannot be compared; the message says why in one line."""


def load(path: Path) -> dict[str, Any]:
    """One ``whole_model_gpu.py`` result, checked to be one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise Refused(f"{path}: not a readable JSON file ({exc})") from exc
    missing = [k for k in ("backend", "shape", "layers", "status") if k not in data] if isinstance(data, dict) else ["all"]
    if missing:
        raise Refused(f"{path}: not a whole_model_gpu.py result (missing {', '.join(missing)})")
    if data["status"] == "error":
        raise Refused(f"{path}: the run ended in an error ({data.get('error')}); rerun it")
    if data.get("fallback"):
        raise Refused(f"{path}: GPTQModel fell back to a slower path, its timings are not comparable ({data['fallback']}); "
                      "fix the build (docs/performance.md) and rerun it")
    return data


def check_comparable(a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str) -> None:
    """Raise :class:`Refused` naming every field in ``SAME`` that differs."""
    diffs = []
    for key in SAME:
        if key in a and key in b:  # batch_size / gptq_kernel: not in results written before they were recorded
            va, vb = a.get(key), b.get(key)
            if va != vb:
                if isinstance(va, dict) and isinstance(vb, dict):
                    sub = [f"{k} {va.get(k)} vs {vb.get(k)}" for k in sorted(set(va) | set(vb)) if va.get(k) != vb.get(k)]
                    diffs.append(f"{key} ({', '.join(sub)})")
                else:
                    diffs.append(f"{key} {va} vs {vb}")
    if diffs:
        raise Refused(f"refusing to compare {name_a} with {name_b}: different {'; '.join(diffs)}")


def steady_median(seconds: list[float]) -> float | None:
    """Median of layers 2..n (all of them when only one layer finished; None when none did)."""
    if not seconds:
        return None
    return statistics.median(seconds[1:] if len(seconds) > 1 else seconds)


def total(data: dict[str, Any]) -> dict[str, Any]:
    """Quantize seconds of all layers: measured (complete run) or projected (partial run), labelled."""
    seconds, layers = data["layers"]["seconds"], data["layers"]["total"]
    if len(seconds) == layers and data["status"] == "complete":
        return {"seconds": round(sum(seconds), 1), "label": "measured", "note": f"sum of the {layers} measured layers"}
    median = steady_median(seconds)
    if median is None:
        return {"seconds": None, "label": PROJECTION, "note": "no layer finished: nothing to project from"}
    missing = layers - len(seconds)
    return {"seconds": round(sum(seconds) + missing * median, 1), "label": PROJECTION,
            "note": f"{len(seconds)} measured layers + {missing} x {median:.3f}s (median of its layers "
                    f"{'2' if len(seconds) > 1 else '1'}..{len(seconds)}); excludes the save"}


def compare(a: dict[str, Any], b: dict[str, Any], name_a: str, name_b: str) -> dict[str, Any]:
    """The comparison of two results (refused with :class:`Refused` when they differ in setup)."""
    check_comparable(a, b, name_a, name_b)
    sa, sb = a["layers"]["seconds"], b["layers"]["seconds"]
    n = min(len(sa), len(sb))
    runs = {}
    for key, name, data, seconds in (("a", name_a, a, sa), ("b", name_b, b, sb)):
        runs[key] = {"file": name, "variant": data.get("variant", "ours"), "routing": data.get("routing"),
                     "status": data["status"],
                     "layers_done": len(seconds), "layers_total": data["layers"]["total"],
                     "median_s_all_layers": round(statistics.median(seconds), 3) if seconds else None,
                     "peak_gpu_bytes": data.get("peak_gpu_bytes"),
                     "total": total(data)}
    out: dict[str, Any] = {"a": runs["a"], "b": runs["b"], "backend": a["backend"], "device": a.get("device"),
                           "shape": a["shape"], "checked_equal": [k for k in SAME if k in a and k in b],
                           "not_checked": [k for k in SAME if (k in a) != (k in b)]}
    if n >= 2:
        ma, mb = statistics.median(sa[1:n]), statistics.median(sb[1:n])
        out["steady_state"] = {"label": "measured", "layers": f"2..{n}", "layers_compared": n - 1,
                               "note": f"median seconds of layers 2..{n}: the layers both runs completed, the first left out",
                               "a_median_s": round(ma, 3), "b_median_s": round(mb, 3),
                               "ratio_a_over_b": round(ma / mb, 3) if mb > 0 else None}
    else:
        out["steady_state"] = {"label": "none", "note": f"both runs completed {n} layer(s): no layers 2..n to compare"}
    ta, tb = runs["a"]["total"]["seconds"], runs["b"]["total"]["seconds"]
    projected = PROJECTION in (runs["a"]["total"]["label"], runs["b"]["total"]["label"])
    out["total_ratio_a_over_b"] = {"value": round(ta / tb, 3) if ta and tb else None,
                                   "label": PROJECTION if projected else "measured",
                                   "note": "quantize seconds of all layers, A / B (totals above)"}
    pa, pb = runs["a"]["peak_gpu_bytes"], runs["b"]["peak_gpu_bytes"]
    if pa and pb:
        out["peak_gpu_ratio_a_over_b"] = round(pa / pb, 3)
    variants = (runs["a"]["variant"], runs["b"]["variant"])
    if sorted(variants) == ["ours", "stock"]:
        out["a_over_b_means"] = "stock / ours: the speed-up" if variants[0] == "stock" else "ours / stock: < 1 is faster"
    return out


def markdown(result: dict[str, Any]) -> str:
    """A small table of the comparison."""
    a, b, st, tr = result["a"], result["b"], result["steady_state"], result["total_ratio_a_over_b"]
    rows = ["| | A | B | A / B |", "|---|---|---|---|",
            f"| file | {a['file']} | {b['file']} | |",
            f"| variant, status | {a['variant']}, {a['status']} | {b['variant']}, {b['status']} | |",
            f"| calibration routing | {a['routing'] or 'not recorded'} | {b['routing'] or 'not recorded'} | |",
            f"| layers done | {a['layers_done']}/{a['layers_total']} | {b['layers_done']}/{b['layers_total']} | |",
            f"| median s/layer (all its layers) | {a['median_s_all_layers']} | {b['median_s_all_layers']} | |"]
    if "ratio_a_over_b" in st:
        rows.append(f"| median s/layer, layers {st['layers']} (measured) | {st['a_median_s']} | {st['b_median_s']} | "
                    f"{st['ratio_a_over_b']} |")
    label = lambda t: "measured" if t["label"] == "measured" else "PROJECTION"  # noqa: E731
    rows.append(f"| quantize s, all layers | {a['total']['seconds']} ({label(a['total'])}) | "
                f"{b['total']['seconds']} ({label(b['total'])}) | {tr['value']} ({label(tr)}) |")
    if "peak_gpu_ratio_a_over_b" in result:
        rows.append(f"| peak GPU GiB | {a['peak_gpu_bytes'] / 2**30:.1f} | {b['peak_gpu_bytes'] / 2**30:.1f} | "
                    f"{result['peak_gpu_ratio_a_over_b']} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path, help="whole_model_gpu.py result A (e.g. the --stock run)")
    p.add_argument("b", type=Path, help="whole_model_gpu.py result B")
    p.add_argument("--output", type=Path, default=None)
    args = p.parse_args(argv)
    try:
        result = compare(load(args.a), load(args.b), str(args.a), str(args.b))
    except Refused as exc:
        logger.error("%s", exc)
        return EXIT_REFUSED
    out = args.output
    if out is None:
        name = f"whole_model_compare_{result['backend']}.json"
        out = Path(os.environ["OUT"]) / name if os.environ.get("OUT") else HERE / "results" / name
    table = markdown(result)
    result["markdown"] = table
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(table)
    logger.info("wrote %s", out)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
