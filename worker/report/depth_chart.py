"""The report's depth chart: sparsity and mean activation of each layer against its depth.

An SVG written as text, once per job: two lines with markers over one x axis
of layer names, sparsity (fraction of exact zeros, 0..1) on the left axis and
the job's mean-activation range on the right. A plotting library spent most
of a job's report time on this chart (text layout of tick labels, rasterizing,
palette quantization); the SVG costs well under a millisecond, is a few KB,
and stays sharp at any zoom. Layer names are XML-escaped; an SVG shown
through <img> runs no script in any case.

Every marker carries `data-layer` (its position) and `data-value` (the
manifest's value) beside its coordinates, so the picture can be checked
against the manifest.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any
from xml.sax.saxutils import escape, quoteattr

SPARSITY_COLOR = "#c0392b"
MEAN_COLOR = "#2c6fbb"
MAX_NAMES = 40  # at most this many layer names on the x axis
STEP = 34  # px per layer on the x axis
MIN_PLOT_WIDTH, MAX_PLOT_WIDTH = 420, 1100
PLOT_HEIGHT = 220
LEFT, RIGHT, TOP = 58, 70, 34  # margins (px); the bottom one holds the rotated names
FONT = "font-family='system-ui,sans-serif' font-size='11'"
SPARSITY_RANGE = (-0.02, 1.02)


@dataclass(frozen=True)
class Frame:
    """Where a value lands: the plot area and each axis's range."""

    left: float
    top: float
    width: float
    height: float
    count: int
    means: tuple[float, float]

    def x(self, position: int) -> float:
        return self.left + (position + 0.5) * self.width / max(1, self.count)

    def y(self, value: float, span: tuple[float, float]) -> float:
        low, high = span
        return self.top + (1.0 - (value - low) / (high - low)) * self.height


def render_depth_chart(layers: list[dict[str, Any]]) -> bytes:
    """SVG (UTF-8) of each layer's mean sparsity and mean activation against its position.

    x is the layer's position in the report (model order). Missing or
    non-finite values leave a gap in their line.
    """
    names = [_short(str(layer.get("name", ""))) for layer in layers]
    sparsity = [summary_value(layer, "sparsity") for layer in layers]
    means = [summary_value(layer, "mean") for layer in layers]
    count = len(layers)
    plot_width = min(MAX_PLOT_WIDTH, max(MIN_PLOT_WIDTH, STEP * count))
    bottom = 44 + 6 * max((len(name) for name in names), default=0)
    frame = Frame(LEFT, TOP, plot_width, PLOT_HEIGHT, count, value_range(means))
    width, height = LEFT + plot_width + RIGHT, TOP + PLOT_HEIGHT + bottom
    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' {FONT}>",
        f"<rect width='{width}' height='{height}' fill='white'/>",
    ]
    out += _axes(frame, names)
    out += _series(frame, sparsity, SPARSITY_RANGE, SPARSITY_COLOR, "sparsity", square=False)
    out += _series(frame, means, frame.means, MEAN_COLOR, "mean", square=True)
    out += _legend()
    out.append("</svg>")
    return "\n".join(out).encode()


def _axes(frame: Frame, names: list[str]) -> list[str]:
    right = frame.left + frame.width
    bottom = frame.top + frame.height
    out = [
        f"<rect class='plot' x='{frame.left}' y='{frame.top}' width='{frame.width}' "
        f"height='{frame.height}' fill='none' stroke='#444'/>"
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = frame.y(tick, SPARSITY_RANGE)
        out.append(
            f"<line x1='{frame.left}' x2='{right}' y1='{y:.1f}' y2='{y:.1f}' stroke='#ddd'/>"
        )
        out.append(
            f"<text x='{frame.left - 6}' y='{y + 4:.1f}' text-anchor='end' "
            f"fill='{SPARSITY_COLOR}'>{tick:g}</text>"
        )
    for tick in nice_ticks(*frame.means):
        y = frame.y(tick, frame.means)
        out.append(
            f"<text class='mean-tick' x='{right + 6}' y='{y + 4:.1f}' "
            f"fill='{MEAN_COLOR}'>{tick:.4g}</text>"
        )
    step = max(1, -(-len(names) // MAX_NAMES))
    for position in range(0, len(names), step):
        x = frame.x(position)
        out.append(
            f"<line x1='{x:.1f}' x2='{x:.1f}' y1='{bottom}' y2='{bottom + 4}' stroke='#444'/>"
        )
        out.append(
            f"<text class='name' x='{x:.1f}' y='{bottom + 14}' text-anchor='end' "
            f"transform='rotate(-45 {x:.1f} {bottom + 14})'>{escape(names[position])}</text>"
        )
    middle = frame.top + frame.height / 2
    out.append(
        f"<text x='14' y='{middle:.1f}' transform='rotate(-90 14 {middle:.1f})' "
        f"text-anchor='middle' fill='{SPARSITY_COLOR}'>sparsity</text>"
    )
    edge = right + RIGHT - 10
    out.append(
        f"<text x='{edge}' y='{middle:.1f}' transform='rotate(90 {edge} {middle:.1f})' "
        f"text-anchor='middle' fill='{MEAN_COLOR}'>mean activation</text>"
    )
    return out


def _series(
    frame: Frame,
    values: list[float],
    span: tuple[float, float],
    color: str,
    name: str,
    square: bool,
) -> list[str]:
    """One line (split at missing values) and its markers."""
    points = [
        (position, value, frame.x(position), frame.y(value, span))
        for position, value in enumerate(values)
        if math.isfinite(value)
    ]
    out, run, last = [], [], None
    dash = " stroke-dasharray='5 3'" if square else ""
    for position, _, x, y in points:
        if last is not None and position != last + 1 and len(run) > 1:
            out.append(_polyline(run, color, dash))
            run = []
        elif last is not None and position != last + 1:
            run = []
        run.append((x, y))
        last = position
    if len(run) > 1:
        out.append(_polyline(run, color, dash))
    for position, value, x, y in points:
        data = f"class={quoteattr(name)} data-layer='{position}' data-value='{value!r}'"
        if square:
            out.append(
                f"<rect {data} x='{x - 3.5:.2f}' y='{y - 3.5:.2f}' width='7' height='7' "
                f"fill='{color}'/>"
            )
        else:
            out.append(f"<circle {data} cx='{x:.2f}' cy='{y:.2f}' r='3.5' fill='{color}'/>")
    return out


def _polyline(points: list[tuple[float, float]], color: str, dash: str) -> str:
    coords = " ".join(f"{x:.2f},{y:.2f}" for x, y in points)
    return f"<polyline points='{coords}' fill='none' stroke='{color}' stroke-width='1.6'{dash}/>"


def _legend() -> list[str]:
    y = TOP - 14
    return [
        f"<circle cx='{LEFT + 6}' cy='{y - 4}' r='3.5' fill='{SPARSITY_COLOR}'/>",
        f"<text x='{LEFT + 14}' y='{y}'>sparsity (fraction of zeros)</text>",
        f"<rect x='{LEFT + 192.5}' y='{y - 7.5}' width='7' height='7' fill='{MEAN_COLOR}'/>",
        f"<text x='{LEFT + 204}' y='{y}'>mean activation</text>",
    ]


def value_range(values: list[float]) -> tuple[float, float]:
    """Axis limits around the finite values, with 5% margins."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    low, high = min(finite), max(finite)
    if high == low:
        pad = abs(low) * 0.05 or 0.5
        return low - pad, high + pad
    pad = (high - low) * 0.05
    return low - pad, high + pad


def nice_ticks(low: float, high: float, count: int = 6) -> list[float]:
    """About `count` round values (1, 2, 2.5 or 5 x 10^k apart) within [low, high]."""
    span = high - low
    if not (math.isfinite(span) and span > 0):
        return [low]
    raw = span / max(1, count - 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    first = math.ceil(low / step) * step
    ticks, tick = [], first
    while tick <= high + step * 1e-9:
        ticks.append(round(tick, 12) + 0.0)
        tick += step
    return ticks


def summary_value(layer: dict[str, Any], key: str) -> float:
    value = (layer.get("summary") or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else math.nan


def _short(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"
