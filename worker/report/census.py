"""A census's page: batches/<id>/census.html, the "dataset examples" view.

Per layer: its channels ordered by how often they fire over the dataset
(the share of positions above zero), channels dead on every image marked,
and each channel's top-k images as crops around the channel's peak (the
receptive field), drawn from each job's input.png by CSS, so the page adds
no image files; then a depth chart of sparsity and mean over the dataset.
"""

from __future__ import annotations

from typing import Any

from producer.contract import INPUT_FILE, REPORT_FILE, job_prefix
from worker.report.depth_chart import render_depth_chart
from worker.report.page import format_number, format_shape, render_page

CROP_PX = 56  # a crop's side on the page


def render_census(census: dict[str, Any]) -> bytes:
    """census.json's content -> census.html (UTF-8)."""
    layers = census.get("layers") or []
    chart = [{"name": layer["name"], "summary": _layer_summary(layer)} for layer in layers]
    depth = render_depth_chart(chart).decode()
    return render_page(
        "census.html.j2",
        f"actviz · census {census.get('batch_id', '')}",
        {},
        census=census,
        model=(census.get("model") or {}).get("name") or (census.get("model") or {}).get("uri"),
        depth_svg=depth,
        layers=[_layer_view(layer) for layer in layers],
    )


def _layer_summary(layer: dict[str, Any]) -> dict[str, float]:
    counts = layer.get("count") or [0]
    zeros = layer.get("zeros") or [0]
    means = layer.get("mean") or [0.0]
    return {
        "sparsity": sum(zeros) / max(1, sum(counts)),
        "mean": sum(means) / max(1, len(means)),
    }


def _layer_view(layer: dict[str, Any]) -> dict[str, Any]:
    dead = set(layer.get("dead_everywhere") or [])
    channels = []
    for c in layer.get("by_firing") or []:
        # A channel dead on every image has no peak to show.
        crops = [] if c in dead else [_crop(top) for top in (layer.get("top") or [[]])[c]]
        channels.append(
            {
                "channel": c,
                "fires": format_number(1.0 - layer["sparsity"][c]),
                "mean": format_number(layer["mean"][c]),
                "std": format_number(layer["std"][c]),
                "max": format_number(layer["max"][c]),
                "dead_fraction": format_number(layer["dead_fraction"][c]),
                "dead": c in dead,
                "crops": [crop for crop in crops if crop],
            }
        )
    summary = _layer_summary(layer)
    return {
        "name": layer["name"],
        "class_name": layer.get("class_name", ""),
        "shape": format_shape(layer.get("output_shape")),
        "radius": layer.get("receptive_radius"),
        "images": layer.get("images", 0),
        "sparsity": format_number(summary["sparsity"]),
        "dead_count": len(dead),
        "channels": channels,
    }


def _crop(top: dict[str, Any]) -> dict[str, str] | None:
    """A CSS crop of the job's input around the peak, or a plain link without a crop."""
    prefix = "../../" + job_prefix(top["job_id"])
    crop = top.get("crop")
    item = {"report": prefix + REPORT_FILE, "value": format_number(top.get("value"))}
    if not crop or len(crop) != 6 or min(crop[2], crop[3]) <= 0:
        return None
    y, x, h, w, height, width = (int(v) for v in crop)
    scale = CROP_PX / max(h, w)
    item["style"] = (
        f"width:{round(w * scale)}px;height:{round(h * scale)}px;"
        f"background-image:url('{prefix}{INPUT_FILE}');"
        f"background-size:{width * scale:.1f}px {height * scale:.1f}px;"
        f"background-position:{-x * scale:.1f}px {-y * scale:.1f}px"
    )
    return item
