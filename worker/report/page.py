"""What the job page and the batch gallery share: templates, styles, script, small formats.

Pages are Jinja2 templates (worker/report/templates/) rendered with
autoescape on: every value the model or the manifest supplies (layer names
are chosen by whoever built the model) is escaped by the template engine,
never by hand. The CSS and the script (worker/report/static/) are inlined, so
a page is one file. Keys are linked only when they are plain relative paths
(`safe_href`).
"""

from __future__ import annotations

import re
from functools import cache, lru_cache
from importlib import resources
from typing import Any

import jinja2
import numpy as np
import orjson
from markupsafe import Markup

_SAFE_KEY = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]*$")
STAT_COLUMNS = ("mean", "std", "min", "max", "sparsity")


@cache
def environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.PackageLoader("worker.report", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
        # The templates are the package's own files: no stat of each on every page.
        auto_reload=False,
    )


@cache
def _static(name: str) -> Markup:
    # Our own files, not data: safe to put in the page as they are.
    return Markup(resources.files("worker.report").joinpath("static", name).read_text())


def render_page(template: str, title: str, data: dict[str, Any], **context: Any) -> bytes:
    """A whole page, UTF-8: `template` with `context`, `data` for the page script."""
    # JSON inside <script> must not contain '</script>' or '<!--'.
    # orjson writes a NaN as null, so the payload is always strict JSON.
    payload = orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY).decode().replace("<", "\\u003c")
    page = (
        environment()
        .get_template(template)
        .render(
            title=title,
            css=_static("report.css"),
            script=_static("report.js"),
            data_json=Markup(payload),
            **context,
        )
    )
    return page.encode()


def safe_href(key: Any, prefix: str = "") -> str | None:
    """A relative key such as 'layers/03-conv.png' as an href (unescaped), or None.

    Only plain relative keys pass: no scheme, no leading '/', no '..', no
    quotes or spaces; `prefix` (e.g. '../../jobs/<id>/') is trusted.
    """
    if not isinstance(key, str) or not _SAFE_KEY.match(key) or ".." in key.split("/"):
        return None
    return prefix + key


def grid_data(layer: dict[str, Any], prefix: str) -> dict[str, Any]:
    """What the page script needs about one layer: name, grid href + geometry, stats."""
    return grids_data([layer], prefix)[0]


def grids_data(layers: list[dict[str, Any]], prefix: str) -> list[dict[str, Any]]:
    """`grid_data` of each layer; their stats rounded together, in one call."""
    stats = [layer.get("stats") or {} for layer in layers]
    columns = _rounded_columns(stats)
    items = []
    for layer, layer_stats, layer_columns in zip(layers, stats, columns, strict=True):
        grid = layer.get("grid") or None
        href = safe_href(grid.get("png"), prefix) if grid else None
        items.append(
            {
                "name": str(layer.get("name", "")),
                "grid": href,
                "geometry": geometry(grid) if href else None,
                "stats": layer_columns,
                "dead": layer_stats.get("dead") or [],
            }
        )
    return items


def _rounded_columns(stats: list[dict[str, Any]]) -> list[dict[str, np.ndarray]]:
    """Each layer's per-channel stat columns, to five significant digits (the page's
    lightbox shows four; the manifest keeps them all), every layer's in one call."""
    if not stats:
        return []
    columns = [list(layer.get(key) or []) for layer in stats for key in STAT_COLUMNS]
    flat = significant([v for column in columns for v in column], 5)
    parts = np.split(flat, np.cumsum([len(column) for column in columns])[:-1])
    width = len(STAT_COLUMNS)
    return [
        dict(zip(STAT_COLUMNS, parts[i : i + width], strict=True))
        for i in range(0, len(parts), width)
    ]


def significant(values: list[Any], digits: int) -> np.ndarray:
    """`values` (numbers or None) rounded to `digits` significant digits, None as NaN.

    The same numbers as `float(f"{v:.{digits}g}")` but for the whole list at once
    (a job's report rounds thousands); each is the double nearest its short
    decimal, so JSON writes it short. NaN is written as null.
    """
    try:
        x = np.array(values, dtype=np.float64)
    except (TypeError, ValueError):  # not all numbers: a manifest this engine did not write
        x = np.array([v if isinstance(v, (int, float)) else None for v in values], np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        magnitude = np.floor(np.log10(np.abs(x)))
    decimals = digits - 1 - np.where(np.isfinite(magnitude), magnitude, 0.0)
    # Scale by exact powers of ten: 10**d for d >= 0 (exact to 10**22), 10**-d otherwise.
    up = decimals >= 0
    power = 10.0 ** np.abs(np.clip(decimals, -22, 22))
    with np.errstate(invalid="ignore", over="ignore"):
        rounded = np.where(up, np.round(x * power) / power, np.round(x / power) * power)
    # Beyond the exact powers (|x| under 1e-18 or over 1e22), keep the value as it is.
    return np.where(np.abs(decimals) <= 22, rounded, x)


def format_number(value: Any) -> str:
    """A stat as short text: 4 significant digits, '–' for missing."""
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.4g}"


def format_shape(shape: Any) -> str:
    """[None, 74, 74, 32] -> '(None, 74, 74, 32)'."""
    if isinstance(shape, (list, tuple)):
        return "(" + ", ".join(str(d) for d in shape) + ")"
    return str(shape)


def tile_style(grid: dict[str, Any], channel: int, long_side: int) -> str:
    """Inline CSS that sizes and positions a sprite of one channel's tile.

    The grid is scaled so the tile's long side is `long_side` CSS pixels and
    positioned so only that tile shows; the page script sets the grid image
    itself (from the layer's <img>, so an embedded grid is not repeated).
    """
    return _tile_style(
        int(grid["tile_h"]),
        int(grid["tile_w"]),
        int(grid["separator"]),
        int(grid["cols"]),
        int(grid["width"]),
        int(grid["height"]),
        int(channel),
        int(long_side),
    )


@lru_cache(maxsize=8192)
def _tile_style(
    tile_h: int,
    tile_w: int,
    separator: int,
    cols: int,
    width: int,
    height: int,
    channel: int,
    long_side: int,
) -> str:
    # Kept: every job of a model draws the same tiles (its grids' geometry and, mostly,
    # its top channels), and five float formats per tile were most of a page's tiles.
    step_h, step_w = tile_h + separator, tile_w + separator
    row, col = divmod(channel, cols)
    scale = long_side / max(tile_h, tile_w)
    return (
        f"width:{tile_w * scale:.1f}px;height:{tile_h * scale:.1f}px;"
        f"background-size:{width * scale:.1f}px {height * scale:.1f}px;"
        f"background-position:-{col * step_w * scale:.1f}px -{row * step_h * scale:.1f}px"
    )


def geometry(grid: dict[str, Any] | None) -> dict[str, int] | None:
    """The grid geometry as ints, or None when the manifest lacks it."""
    keys = ("rows", "cols", "tile_h", "tile_w", "channels")
    if not grid or any(not isinstance(grid.get(k), int) for k in keys):
        return None
    shape = {k: int(grid[k]) for k in keys}
    shape["separator"] = int(grid.get("separator") or 0)
    shape["downsample"] = int(grid.get("downsample") or 1)
    shape["width"] = int(
        grid.get("width")
        or shape["cols"] * shape["tile_w"] + (shape["cols"] - 1) * shape["separator"]
    )
    shape["height"] = int(
        grid.get("height")
        or shape["rows"] * shape["tile_h"] + (shape["rows"] - 1) * shape["separator"]
    )
    return shape
