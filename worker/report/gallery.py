"""The batch gallery: every image of a batch side by side, layer by layer.

`render_gallery(batch_id, jobs)` returns batches/<id>/index.html. Each row is
one layer, each column one job, so the same channel can be compared across
images: clicking a tile opens that channel of every image at once. Links are
relative (`../../jobs/<id>/...`), so the page works wherever the job folders
sit next to it, like the per-job report it links.
"""

from __future__ import annotations

import html
from typing import Any

from producer.contract import ERROR_FILE, INPUT_FILE, REPORT_FILE, batch_key, job_prefix
from worker.report.job import format_shape, grid_data, page_html, safe_href


def render_gallery(batch_id: str, jobs: list[tuple[str, dict[str, Any] | None]]) -> bytes:
    """(batch id, [(job_id, manifest or None for a failed job)]) -> UTF-8 HTML.

    Jobs keep the given order. Layers are matched by name and listed in the
    order they first appear. Raises ValueError for an invalid batch or job id.
    """
    batch_key(batch_id)  # validates the id
    prefixes = ["../../" + job_prefix(job_id) for job_id, _ in jobs]
    names = _layer_names([manifest for _, manifest in jobs])
    rows: list[list[dict[str, Any] | None]] = []
    for name in names:
        row = []
        for (job_id, manifest), prefix in zip(jobs, prefixes, strict=True):
            layer = _find_layer(manifest, name)
            item = grid_data(layer, prefix) if layer else None
            if item:
                item["label"] = _label(job_id, manifest)
            row.append(item)
        rows.append(row)
    body = [
        f"<header><h1>batch {html.escape(batch_id)}</h1>"
        f'<p class="job">{len(jobs)} images · {len(names)} layers · click a tile to '
        "compare that channel across every image</p></header>",
        '<section class="gallerywrap"><table class="gallery">',
        _input_row(jobs, prefixes),
        *(
            _layer_row(position, name, row, jobs)
            for position, (name, row) in enumerate(zip(names, rows, strict=True))
        ),
        "</table></section>",
    ]
    return page_html(f"actviz · batch {batch_id}", "\n".join(body), {"rows": rows})


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
    uri = str(((manifest or {}).get("image") or {}).get("uri") or "")
    return uri.rstrip("/").rsplit("/", 1)[-1] or job_id


def _input_row(jobs: list[tuple[str, dict[str, Any] | None]], prefixes: list[str]) -> str:
    cells = ['<th scope="col">layer</th>']
    for (job_id, manifest), prefix in zip(jobs, prefixes, strict=True):
        label = html.escape(_label(job_id, manifest))
        if manifest and manifest.get("layers") is not None:
            image = safe_href(manifest.get("input") or INPUT_FILE, prefix)
            report = html.escape(prefix + REPORT_FILE, quote=True)
            cells.append(
                f'<th scope="col"><figure class="input"><a href="{report}">'
                f'<img src="{image}" alt="input {label}"></a>'
                f'<figcaption><a href="{report}">{label}</a></figcaption></figure></th>'
            )
        else:
            error = html.escape(prefix + ERROR_FILE, quote=True)
            cells.append(
                f'<th scope="col" class="failed">{label}<br>'
                f'<a href="{error}">failed: see error.json</a></th>'
            )
    return f"<tr>{''.join(cells)}</tr>"


def _layer_row(
    position: int,
    name: str,
    row: list[dict[str, Any] | None],
    jobs: list[tuple[str, dict[str, Any] | None]],
) -> str:
    first = next(
        (_find_layer(manifest, name) for _, manifest in jobs if _find_layer(manifest, name)), {}
    )
    head = (
        f'<th scope="row" class="lname">{html.escape(name)}<br>'
        f'<span class="cls">{html.escape(str(first.get("class_name", "")))}</span><br>'
        f'<span class="shape">{format_shape(first.get("output_shape"))}</span></th>'
    )
    cells = []
    for column, item in enumerate(row):
        if item and item["grid"]:
            alt = html.escape(f"{name} of {item['label']}", quote=True)
            src = html.escape(item["grid"], quote=True)
            cells.append(
                f'<td><img class="grid" data-layer="{position}" data-item="{column}" '
                f'src="{src}" alt="{alt}" title="click a tile to compare"></td>'
            )
        else:
            cells.append('<td class="note">–</td>')
    return f"<tr>{head}{''.join(cells)}</tr>"
