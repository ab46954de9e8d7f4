"""The per-job HTML report, rendered from real engine output and opened in Chromium."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from jobs import analyze_images, photo_crops, publish_job
from PIL import Image

from worker.report import render_report
from worker.report.page import significant

LAYERS_JS = "Array.from(document.querySelectorAll('section.layer'))"


@pytest.fixture(scope="module")
def job(seq_model, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """One published job of the test CNN on a photo crop: (index.html, manifest)."""
    [artifacts] = analyze_images(seq_model, photo_crops(1))
    root = tmp_path_factory.mktemp("store")
    index = publish_job(root, "job-1", artifacts, image_uri="file://photos/crop.png")
    manifest = json.loads((index.parent / "manifest.json").read_text())
    return index, manifest


@pytest.fixture(scope="module")
def page(browser, job):
    return browser.open(job[0])


def images_of(page) -> list[list]:
    return page.evaluate(
        "Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth])"
    )


def test_report_loads_every_image_without_console_errors(page, job) -> None:
    images = images_of(page)
    assert page.errors == []
    assert [src for src, complete, width in images if not complete or width == 0] == []
    manifest = job[1]
    grids = {layer["grid"]["png"] for layer in manifest["layers"] if layer["grid"]}
    overlays = {layer["overlay"] for layer in manifest["layers"] if layer.get("overlay")}
    assert overlays, "the job asked for overlays"
    # input + depth chart + one grid and one overlay per layer, each linked by its key
    assert sorted(src for src, _, _ in images) == sorted(
        {"input.png", "depth.svg"} | grids | overlays
    )
    assert page.evaluate("document.getElementById('linknote').hidden") is True


def test_each_byte_is_stored_once(page, job) -> None:
    """The page links the images instead of embedding them: each is stored once, as
    its own file."""
    folder = job[0].parent
    html = job[0].read_bytes()
    assert b"data:image" not in html and b"base64," not in html
    shown = {src for src, _, _ in images_of(page)}
    assert shown and all((folder / src).is_file() for src in shown)


def test_report_alone_explains_why_its_images_are_missing(browser, job, tmp_path: Path) -> None:
    """index.html without its folder (as from a presigned link made by hand) says why
    its images do not load, and how to open it."""
    alone = tmp_path / "alone" / "index.html"
    alone.parent.mkdir()
    alone.write_bytes(job[0].read_bytes())
    page = browser.open(alone)
    assert page.evaluate("document.getElementById('linknote').hidden") is False
    assert "actviz open" in page.evaluate("document.getElementById('linknote').textContent")


def test_depth_chart_is_an_svg_shown_on_the_page(page, job) -> None:
    import xml.etree.ElementTree as ElementTree

    chart = ElementTree.fromstring((job[0].parent / "depth.svg").read_bytes())
    width, height = int(chart.get("width")), int(chart.get("height"))
    assert chart.tag.endswith("svg") and width >= 500
    assert page.evaluate("document.getElementById('depth-chart').naturalWidth") == width
    assert page.evaluate("document.getElementById('depth-chart').naturalHeight") == height


def test_every_layer_is_shown_in_model_order_with_its_summary(page, job) -> None:
    manifest = job[1]
    shown = page.evaluate(
        f"{LAYERS_JS}.map(s => [s.querySelector('h2').firstChild.textContent.trim(),"
        " Array.from(s.querySelectorAll('table.stats td')).map(td => td.textContent)])"
    )
    assert [name for name, _ in shown] == [layer["name"] for layer in manifest["layers"]]
    for (_, cells), layer in zip(shown, manifest["layers"], strict=True):
        summary = layer["summary"]
        assert float(cells[0]) == pytest.approx(summary["mean"], rel=1e-3, abs=1e-6)
        assert float(cells[4]) == pytest.approx(summary["sparsity"], rel=1e-3, abs=1e-6)
        assert int(cells[5]) == summary["dead_count"]


def test_dead_channels_are_outlined_on_their_tiles(page, job) -> None:
    layer = job[1]["layers"][0]
    dead = layer["stats"]["dead"]
    assert layer["name"] == "conv2d_1" and 1 in dead  # the test model kills channel 1
    grid = layer["grid"]
    centres = page.evaluate(
        "(() => { const s = document.querySelector('section.layer');"
        " const g = s.querySelector('img.grid').getBoundingClientRect();"
        " return Array.from(s.querySelectorAll('.deadmark')).map(m => {"
        " const r = m.getBoundingClientRect();"
        " return [(r.left + r.width / 2 - g.left) / g.width,"
        " (r.top + r.height / 2 - g.top) / g.height]; }); })()"
    )
    marked = []
    for x, y in centres:
        col = int(x * grid["width"]) // (grid["tile_w"] + grid["separator"])
        row = int(y * grid["height"]) // (grid["tile_h"] + grid["separator"])
        marked.append(row * grid["cols"] + col)
    assert marked == dead


def test_clicking_a_grid_tile_opens_that_channel_with_its_stats(page, job) -> None:
    index = 2  # conv2d_2: 6 channels in a 3x2 grid
    layer = job[1]["layers"][index]
    grid = layer["grid"]
    channel = 4
    left, top, width, height = page.evaluate(
        f"(() => {{ const img = {LAYERS_JS}[{index}].querySelector('img.grid');"
        " img.scrollIntoView(); const r = img.getBoundingClientRect();"
        " return [r.left, r.top, r.width, r.height]; })()"
    )
    row, col = divmod(channel, grid["cols"])
    x = left + (col * (grid["tile_w"] + 1) + grid["tile_w"] / 2) * width / grid["width"]
    y = top + (row * (grid["tile_h"] + 1) + grid["tile_h"] / 2) * height / grid["height"]
    assert page.evaluate("document.getElementById('lightbox').hidden") is True
    page.click(x, y)
    state = page.evaluate(
        "(() => { const b = document.getElementById('lightbox'); return [b.hidden,"
        " document.getElementById('lb-title').textContent,"
        " Array.from(b.querySelectorAll('.lbstats tr')).map(r => [r.cells[0].textContent, r.cells[1].textContent])]; })()"
    )
    hidden, title, rows = state
    assert hidden is False
    assert title == f"{layer['name']} · channel {channel}"
    stats = dict(rows)
    assert float(stats["mean"]) == pytest.approx(
        layer["stats"]["mean"][channel], rel=1e-3, abs=1e-6
    )
    assert float(stats["max"]) == pytest.approx(layer["stats"]["max"][channel], rel=1e-3, abs=1e-6)
    page.evaluate("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape'}))")
    assert page.evaluate("document.getElementById('lightbox').hidden") is True


def test_top_k_tiles_show_their_own_channel(page, job) -> None:
    """Each top-k sprite shows the pixels of its channel's tile, cut from the grid."""
    layer = job[1]["layers"][0]
    grid = layer["grid"]
    grid_rgb = np.asarray(Image.open(job[0].parent / grid["png"]).convert("RGB"), np.float32)
    page.bring_to_front()
    page.evaluate("document.querySelector('section.layer .topk').scrollIntoView()")
    # Wait until every image is decoded; the screenshot itself forces a fresh paint.
    page.evaluate("Promise.all(Array.from(document.images).map(i => i.decode()))")
    tiles = page.evaluate(
        "Array.from(document.querySelector('section.layer').querySelectorAll('button.tile'))"
        ".map(b => { const r = b.getBoundingClientRect();"
        " return [+b.dataset.channel, r.left, r.top, r.width, r.height]; })"
    )
    assert [c for c, *_ in tiles] == layer["summary"]["top_k"]
    shot = Image.open(io.BytesIO(page.screenshot(full_page=False))).convert("RGB")
    shot = np.asarray(shot, np.float32)
    for channel, left, top, width, height in tiles:
        row, col = divmod(channel, grid["cols"])
        y0, x0 = row * (grid["tile_h"] + 1), col * (grid["tile_w"] + 1)
        tile = grid_rgb[y0 : y0 + grid["tile_h"], x0 : x0 + grid["tile_w"]]
        shown = shot[int(top) + 2 : int(top + height) - 2, int(left) + 2 : int(left + width) - 2]
        assert np.abs(shown.mean(axis=(0, 1)) - tile.mean(axis=(0, 1))).max() < 12, channel


def test_layer_names_from_the_model_are_escaped(browser, tmp_path: Path) -> None:
    import keras

    from worker.engine import open_model

    evil = "<img src=x onerror=\"document.title='owned'\">"
    inputs = keras.Input((16, 16, 3))
    outputs = keras.layers.Conv2D(2, 3, name=evil)(inputs)
    path = tmp_path / "evil.keras"
    keras.Model(inputs, outputs, name="<b>model").save(path)
    loaded = open_model(str(path), uri="file://evil.keras", trusted=False)
    [artifacts] = analyze_images(loaded, photo_crops(1, side=16), layers="Conv2D")
    html = render_report(dict(artifacts.manifest, job_id="evil"))["index.html"]
    assert evil.encode() not in html and b"<b>model" not in html
    index = publish_job(tmp_path / "store", "evil", artifacts)
    page = browser.open(index)
    assert page.evaluate("document.title") != "owned"
    assert page.evaluate("document.querySelectorAll('img[src=x], b').length") == 0
    heading = page.evaluate("document.querySelector('section.layer h2').firstChild.textContent")
    assert heading.strip() == evil
    assert (
        page.evaluate(
            "JSON.parse(document.getElementById('actviz-data').textContent).layers[0].name"
        )
        == evil
    )
    assert page.errors == []


def test_top_tiles_written_unescaped_hold_numbers_whatever_the_manifest_says() -> None:
    """The template writes the top-k tiles without escaping them (a page draws dozens):
    a manifest whose means are markup still yields numbers and '–' only there."""
    hostile = "<script>alert(1)</script>"
    grid = {"rows": 1, "cols": 3, "tile_h": 4, "tile_w": 4, "separator": 1, "channels": 3}
    grid |= {"width": 14, "height": 4, "png": "layers/00-conv.png"}
    manifest = {
        "version": 1,
        "layers": [
            {
                "name": "conv",
                "grid": grid,
                "stats": {"mean": [hostile, 2.5, ["<b>"]]},
                "summary": {"mean": 1.0, "top_k": [1, 0, 2]},
            }
        ],
    }
    html = render_report(manifest)["index.html"].decode()
    assert hostile not in html and "<b>" not in html
    figures = html.split('<div class="topk">', 1)[1].split("</div>", 1)[0]
    captions = [part.split("</figcaption>")[0] for part in figures.split("<figcaption>")[1:]]
    assert captions == ["#1 · mean 2.5", "#0 · mean –", "#2 · mean –"]
    assert figures.count('data-layer="0"') == 3


def test_report_without_grid_geometry_or_layers_still_renders() -> None:
    manifest = {
        "version": 1,
        "model": {"uri": "s3://b/m.h5"},
        "layers": [
            {
                "name": "dense",
                "class_name": "Dense",
                "output_shape": [10],
                "grid": None,
                "stats": {},
                "summary": {"mean": 0.5, "sparsity": 0.1, "dead_count": 0, "top_k": []},
            },
        ],
    }
    out = render_report(manifest)
    assert b"no spatial output" in out["index.html"]
    assert out["depth.svg"].startswith(b"<svg")


def test_page_stats_are_the_manifests_to_five_significant_digits() -> None:
    rng = np.random.default_rng(0)
    values = (rng.standard_normal(2000) * 10.0 ** rng.integers(-12, 12, 2000)).tolist()
    values += [0.0, -0.0, 1.0, 99999.5, 123456789.0, 1.23455, 1e-30, 1e30, None]
    got = significant(values, 5).tolist()
    want = [float(f"{v:.5g}") if v is not None else None for v in values]
    assert got[:-1] == want[:-1] and np.isnan(got[-1])
    manifest = {
        "version": 1,
        "layers": [{"name": "conv", "stats": {"mean": values, "std": [0.5] * len(values)}}],
    }
    html = render_report(manifest)["index.html"].decode()
    payload = html.split('id="actviz-data"', 1)[1].split(">", 1)[1].split("</script>", 1)[0]
    stats = json.loads(payload)["layers"][0]["stats"]
    assert stats["mean"] == want  # None (a NaN in the manifest) stays null: strict JSON
    assert stats["std"] == [0.5] * len(values) and stats["max"] == []
    odd = significant([1.234567, "x", [2]], 5)  # what is not a number becomes NaN (null)
    assert odd[0] == 1.2346 and np.isnan(odd[1:]).all()
