"""The batch gallery: every image of a batch side by side, layer by layer.

`render_gallery(batch_id, jobs)` returns batches/<id>/index.html. Each row is
one layer, each column one job, so the same channel can be compared across
images: clicking a tile opens that channel of every image at once. Links are
relative (`../../jobs/<id>/...`), so the page works wherever the job folders
sit next to it, like the per-job report it links.
"""

from __future__ import annotations

from typing import Any

from producer.contract import ERROR_FILE, INPUT_FILE, REPORT_FILE, batch_key, job_prefix
from worker.report.page import format_number, format_shape, grid_data, render_page, safe_href


def render_gallery(
    batch_id: str,
    jobs: list[tuple[str, dict[str, Any] | None]],
    page: int = 1,
    pages: int = 1,
) -> bytes:
    """(batch id, [(job_id, manifest or None for a failed job)]) -> UTF-8 HTML.

    Jobs keep the given order. Layers are matched by name and listed in the
    order they first appear. `page` of `pages`: a large batch's gallery is
    several pages of PAGE_SIZE images (worker/jobs/batches.py), linked to
    each other. Raises ValueError for an invalid batch or job id.
    """
    batch_key(batch_id)  # validates the id
    prefixes = ["../../" + job_prefix(job_id) for job_id, _ in jobs]
    names = _layer_names([manifest for _, manifest in jobs])
    data_rows: list[list[dict[str, Any] | None]] = []
    rows = []
    for position, name in enumerate(names):
        items = []
        for (job_id, manifest), prefix in zip(jobs, prefixes, strict=True):
            layer = _find_layer(manifest, name)
            item = grid_data(layer, prefix) if layer else None
            if item:
                item["label"] = _label(job_id, manifest)
            items.append(item)
        data_rows.append(items)
        first = next((layer for _, m in jobs if (layer := _find_layer(m, name))), {})
        rows.append(
            {
                "position": position,
                "name": name,
                "class_name": str(first.get("class_name", "")),
                "shape": format_shape(first.get("output_shape")),
                "cells": [
                    {"src": item["grid"], "label": item["label"]} if item and item["grid"] else None
                    for item in items
                ],
            }
        )
    return render_page(
        "gallery.html.j2",
        f"actviz · batch {batch_id}",
        {"rows": data_rows},
        batch_id=batch_id,
        columns=[
            _column(job_id, manifest, prefix)
            for (job_id, manifest), prefix in zip(jobs, prefixes, strict=True)
        ],
        rows=rows,
        cams=_cam_cells(jobs, prefixes),
        page=page,
        pages=pages,
        page_links=_page_links(batch_id, page, pages),
    )


def _cam_cells(
    jobs: list[tuple[str, dict[str, Any] | None]], prefixes: list[str]
) -> list[dict[str, str] | None]:
    """Per job, its first explained class's Grad-CAM overlay; [] when no job has one."""
    cells: list[dict[str, str] | None] = []
    for (_, manifest), prefix in zip(jobs, prefixes, strict=True):
        classes = ((manifest or {}).get("gradcam") or {}).get("classes") or []
        src = safe_href(classes[0].get("overlay"), prefix) if classes else None
        if not src:
            cells.append(None)
            continue
        first = classes[0]
        name = first.get("name")
        label = f"{name} ({first.get('class')})" if name else f"class {first.get('class')}"
        cells.append(
            {
                "src": src,
                "label": label,
                "score": format_number(first.get("score")),
                "report": prefix + REPORT_FILE,
            }
        )
    return cells if any(cells) else []


def _page_links(batch_id: str, page: int, pages: int) -> dict[str, str | None]:
    """Relative links to the previous and next pages of the gallery (same folder)."""

    def name(number: int) -> str:
        return batch_key(batch_id, number).rsplit("/", 1)[-1]

    return {
        "previous": name(page - 1) if page > 1 else None,
        "next": name(page + 1) if page < pages else None,
        "first": name(1) if page > 1 else None,
    }


def _column(job_id: str, manifest: dict[str, Any] | None, prefix: str) -> dict[str, Any]:
    """The head of one job's column: its input and report, or its error."""
    label = _label(job_id, manifest)
    if manifest and manifest.get("layers") is not None:
        return {
            "failed": False,
            "label": label,
            "image": safe_href(manifest.get("input") or INPUT_FILE, prefix),
            "report": prefix + REPORT_FILE,
        }
    return {"failed": True, "label": label, "error": prefix + ERROR_FILE}


def _layer_names(manifests: list[dict[str, Any] | None]) -> list[str]:
    names: dict[str, None] = {}
    for manifest in manifests:
        for layer in (manifest or {}).get("layers") or []:
            names.setdefault(str(layer.get("name", "")), None)
    return list(names)


def _find_layer(manifest: dict[str, Any] | None, name: str) -> dict[str, Any] | None:
    for layer in (manifest or {}).get("layers") or []:
        if str(layer.get("name", "")) == name:
            return layer
    return None


def _label(job_id: str, manifest: dict[str, Any] | None) -> str:
    """The image's name as its user gave it, else the last part of its URI, else the job id."""
    image = (manifest or {}).get("image") or {}
    if image.get("name"):
        return str(image["name"])
    uri = str(image.get("uri") or "")
    return uri.rstrip("/").rsplit("/", 1)[-1] or job_id
