"""coverage.png worth looking at (issue 14 item 9): routed tokens and the top-up, min_tokens on
the colour bars, counts in the cells of small grids, the legend off the cells."""

from __future__ import annotations

import matplotlib.image

from defuser_quant.calibration.coverage import build_report
from defuser_quant.calibration.coverage_plot import ANNOTATE_MAX_CELLS, coverage_figure, plot_coverage


def _all_mode(layers: int = 2, experts: int = 4, min_tokens: int = 16):
    """As ``routing: all`` leaves it: every expert calibrated on every token, few routed."""
    counts = {}
    for layer in range(layers):
        routed = [(layer + e) % 5 * 3 for e in range(experts)]
        counts[f"model.layers.{layer}.mlp.experts"] = (routed, [60 - r for r in routed])
    return build_report(counts, min_tokens=min_tokens)


def _texts(ax):
    return [t.get_text() for t in ax.texts]


def test_all_mode_shows_routed_and_top_up_not_a_flat_panel():
    fig = coverage_figure(_all_mode())
    left, right = fig.axes[0], fig.axes[1]
    assert left.get_title().startswith("routed tokens") and right.get_title().startswith("top-up tokens")
    top_up = right.images[0].get_array()
    assert top_up.min() != top_up.max()  # not one flat colour


def test_routed_only_shows_calibrated_beside_routed():
    report = build_report({"model.layers.0.mlp.experts": ([0, 5, 40, 90], [0, 0, 0, 0])}, min_tokens=16)
    assert coverage_figure(report).axes[1].get_title().startswith("calibrated tokens")


def test_min_tokens_is_marked_on_every_colour_bar():
    fig = coverage_figure(_all_mode(min_tokens=16))
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(bars) == 2
    for bar in bars:
        assert any(line.get_ydata()[0] == 17 for line in bar.lines)  # +1 offset of the log scale
        assert "min_tokens=16" in _texts(bar)


def test_small_grids_are_annotated_large_ones_are_not():
    small = coverage_figure(_all_mode(layers=2, experts=4))
    assert sorted(_texts(small.axes[0])) == sorted(
        str(e.routed) for layer in _all_mode().layers for e in layer.experts
    )
    experts = ANNOTATE_MAX_CELLS  # 2 x 256 cells: too many to read
    big = coverage_figure(_all_mode(layers=2, experts=experts))
    assert _texts(big.axes[0]) == []


def test_legend_sits_outside_the_cells():
    report = build_report({"model.layers.0.mlp.experts": ([0, 5, 40, 90], [0, 0, 0, 0])}, min_tokens=16)
    fig = coverage_figure(report)
    fig.canvas.draw()
    legend = fig.axes[0].get_legend()
    assert legend is not None
    box, cells = legend.get_window_extent(), fig.axes[0].get_window_extent()
    assert box.y1 <= cells.y0 or not box.overlaps(cells)


def test_png_is_written(tmp_path):
    png = plot_coverage(_all_mode(), tmp_path / "plots" / "coverage.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(png).ndim == 3


def test_a_failing_picture_is_a_note_not_a_lost_result(tmp_path):
    from defuser_quant.jobs.runner import _draw_heatmap

    notes: list[str] = []
    blocked = tmp_path / "coverage.png"
    blocked.mkdir()  # a folder where the file should go: savefig fails for real
    (blocked / "x").write_text("")
    assert _draw_heatmap(_all_mode(), blocked, notes) is None
    assert notes and "coverage.png was not drawn" in notes[0]
