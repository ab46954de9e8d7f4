"""The depth chart draws a job's values over a background drawn once per set of layer names."""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

from worker.report import depth_chart
from worker.report.depth_chart import render_depth_chart, value_range


def layers(sparsity: list[float], means: list[float], prefix: str = "conv") -> list[dict]:
    return [
        {"name": f"{prefix}_{i}", "summary": {"sparsity": s, "mean": m}}
        for i, (s, m) in enumerate(zip(sparsity, means, strict=True))
    ]


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def test_the_same_values_give_the_same_png_and_other_values_another() -> None:
    first = layers([0.1, 0.5, 0.9], [2.0, 1.0, 0.5])
    a = render_depth_chart(first)
    assert render_depth_chart(first) == a  # the kept background is not drawn over
    b = render_depth_chart(layers([0.9, 0.5, 0.1], [0.5, 1.0, 2.0]))
    assert b != a
    assert Image.open(io.BytesIO(a)).format == "PNG"


def test_a_blitted_chart_matches_a_full_draw_of_the_same_figure() -> None:
    job = layers([0.2, 0.4, 0.7, 0.8], [3.0, 1.5, 0.4, 0.1], prefix="full_draw")
    blitted = pixels(render_depth_chart(job))
    chart = next(c for key, c in depth_chart._charts.items() if key[:1] == ("full_draw_0",))
    for artist in chart.dynamic:
        artist.set_animated(False)
    chart.canvas.draw()  # everything, the job's lines and axis included, the classic way
    full = np.asarray(chart.canvas.buffer_rgba())[..., :3].astype(int)
    depth_chart._charts.clear()
    assert blitted.shape == full.shape
    # Equal but for the palette's rounding of anti-aliased edges.
    differs = np.abs(blitted - full).max(axis=2) > 24
    assert differs.mean() < 0.01


def test_the_mean_axis_follows_each_jobs_values() -> None:
    low = pixels(render_depth_chart(layers([0.5, 0.5], [0.0, 1.0], prefix="axis")))
    high = pixels(render_depth_chart(layers([0.5, 0.5], [0.0, 1000.0], prefix="axis")))
    right_labels = (slice(None), slice(-70, None))  # the mean-activation tick labels
    assert np.abs(low[right_labels] - high[right_labels]).max() > 100


def test_missing_values_and_no_layers_still_draw() -> None:
    assert render_depth_chart([]).startswith(b"\x89PNG")
    assert render_depth_chart(layers([math.nan, 0.3], [math.nan, math.nan])).startswith(b"\x89PNG")
    assert value_range([math.nan]) == (0.0, 1.0)
    assert value_range([2.0, 2.0]) == (1.9, 2.1)
    assert value_range([0.0, 0.0]) == (-0.5, 0.5)


def test_charts_kept_per_process_are_bounded() -> None:
    for n in range(depth_chart.CACHED_CHARTS + 5):
        render_depth_chart(layers([0.5], [1.0], prefix=f"bounded{n}"))
    assert len(depth_chart._charts) == depth_chart.CACHED_CHARTS


def test_each_layers_points_are_drawn_at_its_manifest_values() -> None:
    """The PNG holds each layer's sparsity and mean markers where its summary puts them."""
    from matplotlib.colors import to_rgb

    sparsity, means = [0.1, 0.9, 0.3, 0.7, 0.5], [5.0, 1.0, 3.0, 0.5, 4.0]
    png = pixels(render_depth_chart(layers(sparsity, means, prefix="points")))
    chart = next(c for key, c in depth_chart._charts.items() if key[:1] == ("points_0",))
    height = png.shape[0]
    series = (
        (chart.sparsity.axes, sparsity, depth_chart.SPARSITY_COLOR),
        (chart.right, means, depth_chart.MEAN_COLOR),
    )
    for axes, values, color in series:
        expected = np.array(to_rgb(color)) * 255
        for position, value in enumerate(values):
            x, y = axes.transData.transform((position, value))
            row, col = int(round(height - y)), int(round(x))
            patch = png[row - 1 : row + 2, col - 1 : col + 2].reshape(-1, 3)
            # The marker's centre carries the line's colour (the palette rounds it a little).
            assert np.abs(patch - expected).max(axis=1).min() < 40, (color, position, value)
    depth_chart._charts.clear()
