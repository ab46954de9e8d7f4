"""The report's depth chart: sparsity and mean activation of each layer against its depth.

A matplotlib figure, PNG, once per job. Most of what matplotlib spends on a
small chart is text: tick labels, axis labels, the legend. The layer names on
the x axis are the same for every job of a (model, layer set), so a `Chart`
per set of names draws everything that does not depend on the job once and
keeps the pixels (`copy_from_bbox`). A job restores them and draws only its
own artists: the two lines and the mean-activation axis (its range is the
job's). That costs about a fifth of a full draw, and the picture is the same
as a full draw of the same figure.
"""

from __future__ import annotations

import io
import math
import threading
from collections import OrderedDict
from typing import Any

SPARSITY_COLOR = "#c0392b"
MEAN_COLOR = "#2c6fbb"
MAX_NAMES = 40  # at most this many layer names on the x axis
PALETTE_COLORS = 64
CACHED_CHARTS = 16  # charts (one per set of layer names) kept drawn per process

_charts: OrderedDict[tuple[str, ...], Chart] = OrderedDict()
_charts_lock = threading.Lock()


def render_depth_chart(layers: list[dict[str, Any]]) -> bytes:
    """PNG: mean sparsity and mean activation of each layer against its position.

    x is the layer's position in the report (model order); sparsity (fraction
    of exact zeros, 0..1) on the left axis, mean activation on the right.
    """
    labels = tuple(_short(str(layer.get("name", ""))) for layer in layers)
    with _charts_lock:
        chart = _charts.pop(labels, None) or Chart(labels)
        _charts[labels] = chart
        while len(_charts) > CACHED_CHARTS:
            _charts.popitem(last=False)
    return chart.render(
        [summary_value(layer, "sparsity") for layer in layers],
        [summary_value(layer, "mean") for layer in layers],
    )


class Chart:
    """The figure for one x axis of layer names; `render` draws one job's values on it."""

    def __init__(self, labels: tuple[str, ...]) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        count = len(labels)
        depth = list(range(count))
        # Fixed margins in inches (room for the rotated names) instead of tight_layout.
        bottom = 0.55 + 0.045 * max((len(label) for label in labels), default=0)
        width, height = min(14.0, max(6.0, 0.3 * count + 2.5)), 2.8 + bottom
        self.figure = Figure(figsize=(width, height), dpi=100)
        self.canvas = FigureCanvasAgg(self.figure)
        self.figure.subplots_adjust(
            left=0.8 / width, right=1 - 0.8 / width, bottom=bottom / height, top=1 - 0.45 / height
        )
        axes = self.figure.add_subplot()
        nan = [math.nan] * count
        (self.sparsity,) = axes.plot(
            depth, nan, "o-", color=SPARSITY_COLOR, label="sparsity (fraction of zeros)"
        )
        axes.set_xlim(-0.5, max(count - 0.5, 0.5))
        axes.set_ylim(-0.02, 1.02)
        axes.set_ylabel("sparsity", color=SPARSITY_COLOR)
        axes.set_xlabel("layer (model order)")
        step = max(1, -(-count // MAX_NAMES))
        axes.set_xticks(depth[::step])
        axes.set_xticklabels(labels[::step], rotation=45, ha="right", fontsize=8)
        axes.grid(alpha=0.3)
        self.right = axes.twinx()
        (self.means,) = self.right.plot(
            depth, nan, "s--", color=MEAN_COLOR, label="mean activation"
        )
        self.right.set_ylabel("mean activation", color=MEAN_COLOR)
        # The legend sits above the plot, where no line can cross it: it is background.
        lines = [self.sparsity, self.means]
        axes.legend(
            lines,
            [line.get_label() for line in lines],
            loc="lower left",
            bbox_to_anchor=(0.0, 1.0),
            ncols=2,
            frameon=False,
            fontsize=8,
            borderaxespad=0.2,
        )
        # The per-job artists are drawn by `render` only, over the kept background.
        self.dynamic = (self.sparsity, self.means, self.right.yaxis)
        for artist in self.dynamic:
            artist.set_animated(True)
        self.canvas.draw()
        self.background = self.canvas.copy_from_bbox(self.figure.bbox)
        self.lock = threading.Lock()

    def render(self, sparsity: list[float], means: list[float]) -> bytes:
        from PIL import Image

        with self.lock:
            self.sparsity.set_ydata(sparsity)
            self.means.set_ydata(means)
            self.right.set_ylim(*value_range(means))
            self.canvas.restore_region(self.background)
            self.sparsity.axes.draw_artist(self.sparsity)
            self.right.draw_artist(self.means)
            self.right.draw_artist(self.right.yaxis)
            rgba = self.canvas.buffer_rgba()
            image = Image.frombuffer(
                "RGBA", self.canvas.get_width_height(), rgba, "raw", "RGBA", 0, 1
            )
            # A 64-colour palette holds the chart's few colours and their anti-aliasing:
            # a third of the bytes of RGB, and faster to encode.
            palette = image.convert("RGB").quantize(
                PALETTE_COLORS, method=Image.Quantize.FASTOCTREE
            )
        out = io.BytesIO()
        palette.save(out, format="PNG")
        return out.getvalue()


def value_range(values: list[float]) -> tuple[float, float]:
    """Axis limits around the finite values, with matplotlib's default 5% margins."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    low, high = min(finite), max(finite)
    if high == low:
        pad = abs(low) * 0.05 or 0.5
        return low - pad, high + pad
    pad = (high - low) * 0.05
    return low - pad, high + pad


def summary_value(layer: dict[str, Any], key: str) -> float:
    value = (layer.get("summary") or {}).get(key)
    return float(value) if isinstance(value, (int, float)) else math.nan


def _short(name: str, limit: int = 18) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "…"
