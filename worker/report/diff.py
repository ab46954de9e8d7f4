"""The diff report: a job's index.html (one image), and a batch's diff.html (all its images).

Per matched layer: its relative L2 distance, mean channel correlation and
the changes in sparsity and mean; for a job, the grids of A, B (shared
per-channel bounds) and |A - B| side by side. Above: a chart of the distance
by depth with the threshold, and the first divergent layer called out. Below:
the layers that did not match, and why.
"""

from __future__ import annotations

from typing import Any

from worker.report.page import format_number, render_page, safe_href

WIDTH, HEIGHT, LEFT, TOP, STEP = 560, 180, 56, 16, 46


def render_diff(manifest: dict[str, Any]) -> bytes:
    """A diff job's manifest -> its index.html, linking its grids by relative key."""
    diff = manifest.get("diff") or {}
    model = manifest.get("model") or {}
    against = diff.get("against") or {}
    return _page(
        diff,
        title=f"actviz · diff · {manifest.get('job_id', '')}",
        heading=f"{model.get('name') or model.get('uri')} vs {against.get('name') or against.get('uri')}",
        subtitle=f"job {manifest.get('job_id', '')} · image "
        f"{(manifest.get('image') or {}).get('name') or (manifest.get('image') or {}).get('uri') or ''}",
        input_src=safe_href(manifest.get("input") or "input.png"),
        grid_src=safe_href,
        jobs=[],
    )


def render_diff_summary(summary: dict[str, Any]) -> bytes:
    """A batch's diff.json content -> diff.html (links to each image's report)."""
    return _page(
        summary,
        title=f"actviz · diff · batch {summary.get('batch_id', '')}",
        heading=f"{(summary.get('model') or {}).get('name')} vs "
        f"{(summary.get('against') or {}).get('name')}",
        subtitle=f"batch {summary.get('batch_id', '')} · {summary.get('images', 0)} images, "
        "distances averaged over them",
        input_src=None,
        grid_src=lambda key: None,
        jobs=[
            {"href": f"../../jobs/{job_id}/index.html", "label": job_id}
            for job_id in summary.get("jobs") or []
        ],
    )


def _page(diff: dict[str, Any], **context: Any) -> bytes:
    layers = diff.get("layers") or []
    grid_src = context.pop("grid_src")
    views = []
    for layer in layers:
        grids = layer.get("grids") or {}
        views.append(
            {
                "name": layer.get("name"),
                "partner": layer.get("partner"),
                "shape": "×".join(str(d) for d in layer.get("output_shape") or []),
                "divergent": layer.get("name") == diff.get("first_divergent"),
                "numbers": [
                    ("relative L2", format_number(layer.get("relative_l2"))),
                    ("max |A−B|", format_number(layer.get("max_abs_diff"))),
                    ("mean channel correlation", format_number(layer.get("mean_correlation"))),
                    (
                        "sparsity A → B",
                        f"{format_number(layer.get('sparsity_a'))} → "
                        f"{format_number(layer.get('sparsity_b'))}",
                    ),
                    (
                        "mean A → B",
                        f"{format_number(layer.get('mean_a'))} → {format_number(layer.get('mean_b'))}",
                    ),
                ],
                "grids": [
                    (label, grid_src(grids.get(key)))
                    for key, label in (("a", "A"), ("b", "B"), ("delta", "|A − B|"))
                    if grids.get(key)
                ],
            }
        )
    return render_page(
        "diff.html.j2",
        context.pop("title"),
        {},
        diff=diff,
        chart=_chart(layers, float(diff.get("threshold") or 0.0), diff.get("first_divergent")),
        layers=views,
        **context,
    )


def _chart(layers: list[dict[str, Any]], threshold: float, first: str | None) -> str:
    """SVG: each layer's relative L2 distance by depth, the threshold dashed."""
    values = [float(layer.get("relative_l2") or 0.0) for layer in layers]
    top = max([threshold, *values]) * 1.15 or 1.0
    width = LEFT + max(WIDTH, STEP * len(values)) + 20
    height = TOP + HEIGHT + 110

    def y(value: float) -> float:
        return TOP + HEIGHT * (1.0 - value / top)

    points = [(LEFT + STEP * (i + 0.5), y(v)) for i, v in enumerate(values)]
    out = [
        f"<svg xmlns='http://www.w3.org/2000/svg' width='{width}' height='{height}' "
        f"viewBox='0 0 {width} {height}' font-family='sans-serif' font-size='11'>",
        f"<rect width='{width}' height='{height}' fill='white'/>",
        f"<line x1='{LEFT}' y1='{TOP + HEIGHT}' x2='{width - 20}' y2='{TOP + HEIGHT}' stroke='#555'/>",
        f"<line x1='{LEFT}' y1='{TOP}' x2='{LEFT}' y2='{TOP + HEIGHT}' stroke='#555'/>",
        f"<text x='{LEFT - 6}' y='{TOP + 4}' text-anchor='end'>{top:.3g}</text>",
        f"<text x='{LEFT - 6}' y='{TOP + HEIGHT + 4}' text-anchor='end'>0</text>",
        f"<text x='14' y='{TOP + HEIGHT / 2}' transform='rotate(-90 14 {TOP + HEIGHT / 2})' "
        "text-anchor='middle'>relative L2 distance</text>",
    ]
    if threshold > 0:
        out.append(
            f"<line x1='{LEFT}' y1='{y(threshold):.1f}' x2='{width - 20}' y2='{y(threshold):.1f}' "
            "stroke='#b03a2e' stroke-dasharray='4 3'/>"
            f"<text x='{width - 22}' y='{y(threshold) - 4:.1f}' text-anchor='end' fill='#b03a2e'>"
            f"threshold {threshold:g}</text>"
        )
    if len(points) > 1:
        path = " ".join(f"{px:.1f},{py:.1f}" for px, py in points)
        out.append(f"<polyline points='{path}' fill='none' stroke='#2c6fbb' stroke-width='2'/>")
    for layer, (px, py) in zip(layers, points, strict=True):
        name = _escape(str(layer.get("name", "")))
        hit = layer.get("name") == first
        colour = "#b03a2e" if hit else "#2c6fbb"
        out.append(f"<circle cx='{px:.1f}' cy='{py:.1f}' r='{5 if hit else 3.5}' fill='{colour}'/>")
        out.append(
            f"<text x='{px:.1f}' y='{TOP + HEIGHT + 12}' transform='rotate(45 {px:.1f} "
            f"{TOP + HEIGHT + 12})'>{name[:28]}</text>"
        )
    out.append("</svg>")
    return "\n".join(out)


def _escape(text: str) -> str:
    return (
        text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("'", "&#39;")
    )
