"""The coverage heatmap: a layer x expert PNG of a :class:`~.coverage.CoverageReport`.

Kept apart from the counting so matplotlib is only imported when a picture is asked for.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


# ``report`` is a CoverageReport, typed loosely: coverage.py imports this module lazily, and the
# import-cycle test counts TYPE_CHECKING imports too.
def plot_coverage(report: Any, path: str | Path, *, dpi: int = 120) -> Path:
    """Save a layer x expert PNG (routed and calibrated tokens, log scale; under-threshold marked)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    width = max((layer.num_experts for layer in report.layers), default=1)
    rows = max(len(report.layers), 1)
    shape = (rows, width)
    routed = torch.full(shape, float("nan"))
    calibrated = torch.full(shape, float("nan"))
    for i, layer in enumerate(report.layers):
        for e in layer.experts:
            routed[i, e.expert] = e.routed
            calibrated[i, e.expert] = e.calibrated
    vmax = max(float(calibrated.nan_to_num(0).max()), 2.0)
    fig = Figure(figsize=(min(4 + 0.12 * width, 30) * 2, min(2 + 0.3 * rows, 30)))
    FigureCanvasAgg(fig)
    labels = [str(layer.layer_index) if layer.layer_index is not None else layer.path for layer in report.layers]
    axes = fig.subplots(1, 2, squeeze=True)
    for ax, data, title in ((axes[0], routed, "routed tokens"), (axes[1], calibrated, "calibrated tokens")):
        # +1 so zero counts show (darkest) on the log scale; NaN cells are padding (no such expert)
        image = ax.imshow((data + 1).numpy(), aspect="auto", interpolation="nearest", norm=LogNorm(1, vmax + 1))
        ax.set_title(f"{title} (+1, log)")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(labels)), labels)
        fig.colorbar(image, ax=ax)
    row_of = {layer.path: i for i, layer in enumerate(report.layers)}
    marks = [(row_of[ref.layer], ref.expert) for ref in report.under_threshold]
    if marks:
        ys, xs = zip(*marks)
        axes[1].scatter(xs, ys, marker="x", c="red", s=20, label=f"< {report.min_tokens}")
        axes[1].legend(loc="upper right", fontsize="small")
    totals = report.totals
    fig.suptitle(f"Expert coverage: {totals.under_threshold} of {totals.experts} under min_tokens={report.min_tokens}")
    fig.tight_layout()
    fig.savefig(path, dpi=dpi, format="png")
    return path
