"""The coverage heatmap: a layer x expert PNG of a :class:`~.coverage.CoverageReport`.

Kept apart from the counting so matplotlib is only imported when a picture is asked for. Two
panels on one log colour scale: the tokens the router sent to each expert, and the top-up a
routing mode pushed through it (``all``, ``budgeted``); without any top-up the second panel
shows the calibrated total. ``min_tokens`` is marked on the colour bars, experts under it are
outlined in red, and small grids carry their counts in the cells.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

#: Grids with at most this many cells get their counts written in the cells.
ANNOTATE_MAX_CELLS = 256


def _grid(report: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max((layer.num_experts for layer in report.layers), default=1)
    shape = (max(len(report.layers), 1), width)
    routed, forced, calibrated = (torch.full(shape, float("nan")) for _ in range(3))
    for i, layer in enumerate(report.layers):
        for e in layer.experts:
            routed[i, e.expert], forced[i, e.expert], calibrated[i, e.expert] = e.routed, e.forced, e.calibrated
    return routed, forced, calibrated


# ``report`` is a CoverageReport, typed loosely: coverage.py imports this module lazily, and the
# import-cycle test counts TYPE_CHECKING imports too.
def coverage_figure(report: Any) -> Any:
    """The heatmap as a matplotlib ``Figure`` (not saved)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    routed, forced, calibrated = _grid(report)
    rows, width = routed.shape
    topped_up = bool(forced.nan_to_num(0).sum() > 0)
    second, second_title = (forced, "top-up tokens (routing mode)") if topped_up else (calibrated, "calibrated tokens")
    vmax = max(float(calibrated.nan_to_num(0).max()), float(report.min_tokens), 2.0)
    norm = LogNorm(1, vmax + 1)
    fig = Figure(figsize=(min(4 + 0.35 * width, 30) * 2, min(2.5 + 0.4 * rows, 30)), layout="constrained")
    FigureCanvasAgg(fig)
    labels = [str(layer.layer_index) if layer.layer_index is not None else layer.path for layer in report.layers]
    axes = fig.subplots(1, 2, squeeze=True)
    annotate = rows * width <= ANNOTATE_MAX_CELLS
    for ax, data, title in ((axes[0], routed, "routed tokens"), (axes[1], second, second_title)):
        # +1 so zero counts show (darkest) on the log scale; NaN cells are padding (no such expert)
        image = ax.imshow((data + 1).numpy(), aspect="auto", interpolation="nearest", norm=norm)
        ax.set_title(f"{title} (+1, log)")
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(labels)), labels)
        if width <= 32:
            ax.set_xticks(range(width))
        bar = fig.colorbar(image, ax=ax)
        bar.ax.axhline(report.min_tokens + 1, color="red", linewidth=2)
        bar.ax.text(1.1, report.min_tokens + 1, f"min_tokens={report.min_tokens}", color="red",
                    transform=bar.ax.get_yaxis_transform(), va="center", fontsize="small")
        if annotate:
            for (i, j), value in ((ij, float(data[ij])) for ij in zip(*torch.where(~data.isnan()))):
                bright = value + 1 > (vmax + 1) ** 0.5
                ax.text(int(j), int(i), f"{int(value)}", ha="center", va="center", fontsize="x-small",
                        color="black" if bright else "white")
    row_of = {layer.path: i for i, layer in enumerate(report.layers)}
    marks = [(row_of[ref.layer], ref.expert) for ref in report.under_threshold]
    if marks:
        ys, xs = zip(*marks)
        for ax in axes:
            # an outline around the cell, so a count written in it stays readable
            ax.scatter(xs, ys, marker="s", s=(220 if annotate else 40), facecolors="none", edgecolors="red",
                       linewidths=1.5, label=f"calibrated < {report.min_tokens}")
        # below the panels, never over the cells
        axes[0].legend(loc="upper left", bbox_to_anchor=(0.0, -0.12), fontsize="small", frameon=False)
    totals = report.totals
    fig.suptitle(f"Expert coverage: {totals.under_threshold} of {totals.experts} under min_tokens={report.min_tokens}")
    return fig


def plot_coverage(report: Any, path: str | Path, *, dpi: int = 120) -> Path:
    """Save the heatmap of ``report`` as a PNG at ``path`` and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    coverage_figure(report).savefig(path, dpi=dpi, format="png")
    return path
