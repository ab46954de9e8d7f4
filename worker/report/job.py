"""The per-job HTML report: index.html next to the grids it shows.

`render_report(manifest)` returns {"index.html", "depth.svg"}, keyed relative
to the job folder like the engine's files. The page (templates/job.html.j2)
has inline CSS and script only, and links its images (input, grids,
overlays, depth chart) by relative key: each byte is stored once. The page
opens from its folder (`actviz fetch`), from a bucket that allows reads, and
from a private bucket through `Result.url()` / `actviz open`, whose presigned
link carries the signatures of the page's images in its fragment
(producer/signed.py; the page script applies them).

This module turns a manifest into what the template shows; escaping is the
template engine's (see worker/report/page.py).
"""

from __future__ import annotations

from typing import Any

from producer.contract import DEPTH_CHART_FILE, REPORT_FILE
from worker.report.depth_chart import render_depth_chart
from worker.report.page import (
    STAT_COLUMNS,
    format_number,
    format_shape,
    geometry,
    grids_data,
    render_page,
    safe_href,
    tile_style,
)

TOP_TILE_PX = 96  # top-k tiles are drawn this many CSS pixels on their long side
STRIP_PX = 32  # height of a non-spatial layer's strip of values
DEAD_MARK_LIMIT = 1024  # more dead channels than this are listed, not outlined
DEAD_LISTED = 64  # dead channels named in the text


def render_report(manifest: dict[str, Any]) -> dict[str, bytes]:
    """One job's manifest -> {"index.html": UTF-8, "depth.svg": SVG}.

    The page links the images the manifest names by their keys relative to
    the job folder. Layers without a grid (no spatial output) get their
    stats only.
    """
    layers = list(manifest.get("layers") or [])
    depth = render_depth_chart(layers)
    title = f"actviz · {_model_name(manifest)}"
    if manifest.get("job_id"):
        title += f" · {manifest['job_id']}"
    page = render_page(
        "job.html.j2",
        title,
        {
            "layers": grids_data(layers, ""),
            # The page script outlines each layer's dead channels on their tiles.
            "dead_mark_limit": DEAD_MARK_LIMIT,
        },
        model_name=_model_name(manifest),
        job_id=manifest.get("job_id"),
        input_src=safe_href(manifest.get("input")),
        meta=_meta(manifest),
        depth_src=safe_href(DEPTH_CHART_FILE) if layers or not manifest.get("gradcam") else None,
        gradcam=_gradcam_view(manifest.get("gradcam")),
        stat_columns=STAT_COLUMNS,
        layers=[_layer_view(position, layer) for position, layer in enumerate(layers)],
    )
    return {REPORT_FILE: page, DEPTH_CHART_FILE: depth}


def _gradcam_view(section: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the template shows of a job's Grad-CAM: heatmaps per class, top predictions."""
    if not section:
        return None
    softmax = section.get("scores") == "softmax"
    pixels = section.get("target") == "pixels"
    shape = section.get("layer_shape")
    note = (
        f"{section.get('method', 'gradcam')} of the class "
        f"{'logit (the input of the softmax)' if softmax else 'score (the model output)'}"
        f"{', summed over every pixel,' if pixels else ''} "
        f"with respect to {section.get('layer')}'s output"
        + (f", {format_shape(shape)}" if shape else "")
        + (f" (output {section['output']})" if section.get("output") else "")
        + "; heatmaps are upsampled to the input and normalized to their maximum."
    )
    if pixels:
        score_name = "share of the pixels" if softmax else "mean score over the pixels"
    else:
        score_name = "probability" if softmax else "score"
    return {
        "layer": str(section.get("layer", "")),
        "method": str(section.get("method", "")),
        "shape": format_shape(shape),
        "score_name": score_name,
        "note": note,
        "predictions": [
            {"label": _class_label(row), "score": format_number(row.get("score"))}
            for row in section.get("predictions") or []
        ],
        "classes": [
            {
                "label": _class_label(cam),
                "score": format_number(cam.get("score")),
                "rank": cam.get("rank"),
                "empty": bool(cam.get("empty")),
                "overlay_src": safe_href(cam.get("overlay")),
                "heatmap_src": safe_href(cam.get("heatmap")),
                "values_href": safe_href(cam.get("values")),
            }
            for cam in section.get("classes") or []
        ],
    }


def _class_label(entry: dict[str, Any]) -> str:
    index = entry.get("class")
    return f"{entry['name']} ({index})" if entry.get("name") else f"class {index}"


def _model_name(manifest: dict[str, Any]) -> str:
    model = manifest.get("model") or {}
    if model.get("name"):
        return str(model["name"])
    uri = str(model.get("uri") or "model")
    return uri.rstrip("/").rsplit("/", 1)[-1]


def _meta(manifest: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) rows of the header table, the empty ones left out."""
    model = manifest.get("model") or {}
    image = manifest.get("image") or {}
    pre = manifest.get("preprocessing") or {}
    norm = manifest.get("normalization") or {}
    rows = [
        ("model", _text(model.get("uri"))),
        ("sha256", _text((model.get("sha256") or "")[:16])),
        ("input shape (H, W, C)", format_shape(model.get("input_shape"))),
        ("image", _text(image.get("uri") or image.get("sha256"))),
        ("original size (H, W)", format_shape(image.get("original_size"))),
        ("preprocessing", _describe(pre, ("size", "channels", "scale", "resample", "formula"))),
        ("scale", _text(pre.get("scale_note") or pre.get("scale_auto"))),
        ("normalization", _describe(norm, ("mode", "percentile"))),
        ("colormap", _text(manifest.get("colormap"))),
        ("timings (ms)", _describe(manifest.get("timings_ms") or {}, None)),
    ]
    return [(label, value) for label, value in rows if value not in (None, "", "()", "None")]


def _describe(values: dict[str, Any], keys: tuple[str, ...] | None) -> str | None:
    """'key=value, ...' for the present keys; None when none is present."""
    picked = [(k, values[k]) for k in (keys or values) if k in values and values[k] is not None]
    if not picked:
        return None
    parts = []
    for key, value in picked:
        if isinstance(value, list):
            shown = format_shape(value)
        elif isinstance(value, float):
            shown = format_number(value)
        else:
            shown = str(value)
        parts.append(f"{key}={shown}")
    return ", ".join(parts)


def _text(value: Any) -> str | None:
    return None if value in (None, "") else str(value)


def _layer_view(position: int, layer: dict[str, Any]) -> dict[str, Any]:
    """What the template shows of one layer."""
    summary = layer.get("summary") or {}
    stats = layer.get("stats") or {}
    grid = layer.get("grid") or None
    shape = geometry(grid)
    dead = [int(c) for c in stats.get("dead") or []]
    view: dict[str, Any] = {
        "position": position,
        "name": str(layer.get("name", "")),
        "class_name": str(layer.get("class_name", "")),
        "shape": format_shape(layer.get("output_shape")),
        "summary": [format_number(summary.get(k)) for k in STAT_COLUMNS]
        + [format_number(summary.get("dead_count"))],
        "dead_count": len(dead),
        "dead_listed": ", ".join(str(c) for c in dead[:DEAD_LISTED])
        + (" …" if len(dead) > DEAD_LISTED else ""),
        "grid_src": safe_href(grid.get("png")) if grid else None,
        "strip_style": None,
        "caption": _grid_caption(shape),
        "top": [],
        "overlay_src": safe_href(layer.get("overlay")),
    }
    if view["grid_src"] and shape:
        if not layer.get("spatial", True):
            # A strip of values (Dense, Flatten): keep it a strip instead of scaling it square.
            width = min(560, max(STRIP_PX, shape["width"] * 2))
            view["strip_style"] = f"height:{STRIP_PX}px;width:{width}px"
        top = [int(c) for c in summary.get("top_k") or []]
        if top and layer.get("spatial", True):
            view["top"] = _top_tiles(shape, top, stats)
    return view


def _grid_caption(shape: dict[str, int] | None) -> str:
    if not shape:
        return "channel grid"
    count = shape["channels"]
    text = f"{count} channel{'s' if count != 1 else ''}, {shape['rows']}×{shape['cols']} tiles"
    if shape.get("downsample", 1) > 1:
        text += f", every {shape['downsample']}th pixel"
    return text + "; click a tile to enlarge"


def _top_tiles(
    shape: dict[str, int], top: list[int], stats: dict[str, Any]
) -> list[tuple[int, str, str]]:
    """(channel, tile style, mean) of each top channel: tuples, unpacked by the template's
    loop (a job's page draws dozens of tiles; a dict's keys would each be looked up as an
    attribute first). The template writes them unescaped, so each is a number or CSS made
    of numbers whatever the manifest holds: an int, `tile_style` of ints, and the mean's
    text or '–' where it is not a number."""
    means = stats.get("mean") or []
    return [
        (
            int(channel),
            tile_style(shape, channel, TOP_TILE_PX),
            _number_text(means[channel]) if channel < len(means) else "–",
        )
        for channel in top
        if 0 <= channel < shape["channels"]
    ]


def _number_text(value: Any) -> str:
    """`format_number` of an int or a float; '–' for anything else (a string, a list)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return "–"
    return format_number(value)
