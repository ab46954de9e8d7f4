"""The depth chart is an SVG whose markers sit where each layer's manifest values put them."""

from __future__ import annotations

import math
import xml.etree.ElementTree as ElementTree

import pytest

from worker.report import depth_chart
from worker.report.depth_chart import nice_ticks, render_depth_chart, value_range

SVG = "{http://www.w3.org/2000/svg}"


def layers(sparsity: list[float], means: list[float], prefix: str = "conv") -> list[dict]:
    return [
        {"name": f"{prefix}_{i}", "summary": {"sparsity": s, "mean": m}}
        for i, (s, m) in enumerate(zip(sparsity, means, strict=True))
    ]


def parse(svg: bytes) -> ElementTree.Element:
    root = ElementTree.fromstring(svg)
    assert root.tag == f"{SVG}svg"
    return root


def plot_area(root: ElementTree.Element) -> tuple[float, float, float, float]:
    plot = next(e for e in root.iter(f"{SVG}rect") if e.get("class") == "plot")
    return tuple(float(plot.get(k)) for k in ("x", "y", "width", "height"))


def test_each_layers_points_are_drawn_at_its_manifest_values() -> None:
    sparsity, means = [0.1, 0.9, 0.3, 0.7, 0.5], [5.0, 1.0, 3.0, 0.5, 4.0]
    root = parse(render_depth_chart(layers(sparsity, means)))
    left, top, width, height = plot_area(root)
    low, high = value_range(means)
    circles = [e for e in root.iter(f"{SVG}circle") if e.get("class") == "sparsity"]
    squares = [e for e in root.iter(f"{SVG}rect") if e.get("class") == "mean"]
    assert [int(c.get("data-layer")) for c in circles] == [0, 1, 2, 3, 4]
    assert [int(s.get("data-layer")) for s in squares] == [0, 1, 2, 3, 4]
    for position, (s, m) in enumerate(zip(sparsity, means, strict=True)):
        x = left + (position + 0.5) * width / len(sparsity)
        circle, square = circles[position], squares[position]
        assert float(circle.get("data-value")) == s and float(square.get("data-value")) == m
        assert float(circle.get("cx")) == pytest.approx(x, abs=0.01)
        # Sparsity: 0 at the bottom, 1 at the top (with 2% margins).
        expected = top + (1 - (s + 0.02) / 1.04) * height
        assert float(circle.get("cy")) == pytest.approx(expected, abs=0.01)
        # Mean: the job's own range, the square centred on the value.
        expected = top + (1 - (m - low) / (high - low)) * height
        assert float(square.get("y")) + 3.5 == pytest.approx(expected, abs=0.01)
    # Higher sparsity is drawn higher (smaller y).
    assert float(circles[1].get("cy")) < float(circles[0].get("cy"))


def test_the_mean_axis_follows_each_jobs_values() -> None:
    def ticks(means: list[float]) -> list[str]:
        root = parse(render_depth_chart(layers([0.5] * len(means), means)))
        return [e.text for e in root.iter(f"{SVG}text") if e.get("class") == "mean-tick"]

    assert ticks([0.0, 1.0]) != ticks([0.0, 1000.0])
    assert "1000" in ticks([0.0, 1000.0])
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(0.0, 1.0, count=5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert nice_ticks(-3.0, 17.0) == [0.0, 5.0, 10.0, 15.0]
    assert all(-0.05 <= t <= 1.05 for t in nice_ticks(*value_range([0.0, 1.0])))


def test_missing_values_leave_gaps_and_no_layers_still_draw() -> None:
    assert parse(render_depth_chart([])) is not None
    root = parse(render_depth_chart(layers([math.nan, 0.3, 0.4, math.nan, 0.6], [1.0] * 5)))
    circles = [e for e in root.iter(f"{SVG}circle") if e.get("class") == "sparsity"]
    assert [int(c.get("data-layer")) for c in circles] == [1, 2, 4]
    lines = [
        e for e in root.iter(f"{SVG}polyline") if e.get("stroke") == depth_chart.SPARSITY_COLOR
    ]
    assert [len(line.get("points").split()) for line in lines] == [2]  # 1-2 joined; 4 alone
    assert value_range([math.nan]) == (0.0, 1.0)
    assert value_range([2.0, 2.0]) == (1.9, 2.1)
    assert value_range([0.0, 0.0]) == (-0.5, 0.5)


def test_layer_names_are_escaped_and_long_axes_thinned() -> None:
    hostile = [{"name": "<script>alert(1)</script>", "summary": {"sparsity": 0.5, "mean": 1.0}}]
    svg = render_depth_chart(hostile)
    assert b"<script>" not in svg
    names = [e.text for e in parse(svg).iter(f"{SVG}text") if e.get("class") == "name"]
    assert names == ["<script>alert(1)<…"]  # shortened to 18, and read back as text
    many = parse(render_depth_chart(layers([0.5] * 200, [1.0] * 200)))
    shown = [e for e in many.iter(f"{SVG}text") if e.get("class") == "name"]
    assert 0 < len(shown) <= depth_chart.MAX_NAMES
