"""The batch gallery: three real jobs side by side, opened in Chromium."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import unquote

import pytest
from jobs import analyze_images, photo_crops, publish_job

from producer.contract import batch_key
from producer.storage import FileStore
from worker.report.gallery import render_gallery

JOB_IDS = ("job-a", "job-b", "job-c")


@pytest.fixture(scope="module")
def batch(seq_model, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list]:
    """Three crops analyzed in one call, published as jobs plus a gallery with one failed job."""
    root = tmp_path_factory.mktemp("store")
    results = analyze_images(seq_model, photo_crops(3))
    jobs = []
    for job_id, artifacts, name in zip(JOB_IDS, results, ("a", "b", "c"), strict=True):
        index = publish_job(root, job_id, artifacts, image_uri=f"file://photos/{name}.png")
        jobs.append(
            (
                job_id,
                {
                    **artifacts.manifest,
                    "job_id": job_id,
                    "image": {**artifacts.manifest["image"], "uri": f"file://photos/{name}.png"},
                },
            )
        )
        assert index.exists()
    jobs.append(("job-failed", None))
    FileStore(root).put(batch_key("b1"), render_gallery("b1", jobs))
    return root / batch_key("b1"), jobs


@pytest.fixture(scope="module")
def page(browser, batch):
    return browser.open(batch[0])


def test_gallery_loads_every_grid_and_input_without_errors(page, batch) -> None:
    images = page.evaluate(
        "Array.from(document.images).map(i => [i.getAttribute('src'), i.naturalWidth])"
    )
    assert page.errors == []
    assert [src for src, width in images if width == 0] == []
    manifests = [m for _, m in batch[1] if m]
    grids = sum(1 for m in manifests for layer in m["layers"] if layer["grid"])
    assert sum(1 for src, _ in images if "/layers/" in src) == grids
    assert sum(1 for src, _ in images if src.endswith("/input.png")) == 3


def test_gallery_links_resolve_to_each_jobs_report(page, batch) -> None:
    hrefs = page.evaluate("Array.from(document.links).map(a => a.getAttribute('href'))")
    folder = batch[0].parent
    reports = {h for h in hrefs if h.endswith("index.html")}
    assert reports == {f"../../jobs/{job_id}/index.html" for job_id in JOB_IDS}
    for href in reports:
        assert (folder / unquote(href)).resolve().is_file(), href
    assert "../../jobs/job-failed/error.json" in hrefs


def test_gallery_rows_put_each_layer_of_every_image_side_by_side(page, batch) -> None:
    rows = page.evaluate(
        "Array.from(document.querySelectorAll('table.gallery tr')).slice(1).map(tr =>"
        " [tr.querySelector('th').firstChild.textContent,"
        " Array.from(tr.querySelectorAll('img.grid')).map(i => i.getAttribute('src'))])"
    )
    manifest = batch[1][0][1]
    assert [name for name, _ in rows] == [layer["name"] for layer in manifest["layers"]]
    for (name, srcs), layer in zip(rows, manifest["layers"], strict=True):
        assert srcs == [f"../../jobs/{job_id}/{layer['grid']['png']}" for job_id in JOB_IDS], name


def test_clicking_a_tile_compares_that_channel_across_images(page, batch) -> None:
    layer = batch[1][0][1]["layers"][0]
    grid = layer["grid"]
    channel = 2
    left, top, width, height = page.evaluate(
        "(() => { const img = document.querySelectorAll('table.gallery tr')[1]"
        ".querySelectorAll('img.grid')[1]; img.scrollIntoView();"
        " const r = img.getBoundingClientRect(); return [r.left, r.top, r.width, r.height]; })()"
    )
    row, col = divmod(channel, grid["cols"])
    page.click(
        left + (col * (grid["tile_w"] + 1) + grid["tile_w"] / 2) * width / grid["width"],
        top + (row * (grid["tile_h"] + 1) + grid["tile_h"] / 2) * height / grid["height"],
    )
    hidden, title, captions, means = page.evaluate(
        "(() => { const b = document.getElementById('lightbox'); return [b.hidden,"
        " document.getElementById('lb-title').textContent,"
        " Array.from(b.querySelectorAll('figcaption')).map(c => c.textContent),"
        " Array.from(b.querySelectorAll('.lbstats')).map(t => t.rows[0].cells[1].textContent)]; })()"
    )
    assert hidden is False
    assert title == f"{layer['name']} · channel {channel}"
    assert captions == ["a.png", "b.png", "c.png"]
    expected = [m["layers"][0]["stats"]["mean"][channel] for _, m in batch[1] if m]
    assert [float(v) for v in means] == pytest.approx(expected, rel=1e-3, abs=1e-6)


def test_gallery_rejects_an_unsafe_batch_or_job_id() -> None:
    with pytest.raises(ValueError):
        render_gallery("../b1", [])
    with pytest.raises(ValueError):
        render_gallery("b1", [("../escape", None)])


def test_pages_declare_their_icon_so_no_favicon_is_fetched() -> None:
    """A page opened over HTTP (a bucket's signed link) with no icon of its own makes the
    browser ask the server for /favicon.ico: a 404 in the console of every report."""
    html = render_gallery("b1", []).decode()
    assert '<link rel="icon" href="data:,">' in html.split("</head>", 1)[0]
