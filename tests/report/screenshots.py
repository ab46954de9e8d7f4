"""Make the README figures from the demo model and photo: `python tests/report/screenshots.py docs`.

Writes, into the given folder:
  report.png     the top of the demo job's HTML report, as headless Chromium shows it
  demo-grid.png  the demo model's first conv layer on the demo photo (the engine's grid)
  demo-vs-random.png  that grid beside the same layer of the untrained (random) network
  gallery.png    the batch gallery of three crops of the demo photo
The pages are rendered by the same code as a worker's, through the engine.
"""

from __future__ import annotations

import io
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from chromium import Browser  # noqa: E402
from jobs import analyze_images, photo_crops, publish_job  # noqa: E402
from PIL import Image  # noqa: E402

REPORT_HEIGHT = 1500  # the header, the depth chart and the first layers


def make_screenshots(out: Path) -> list[Path]:
    from producer.contract import batch_key
    from producer.storage import FileStore
    from worker.demo import image_path, model_path
    from worker.engine import open_model
    from worker.report.gallery import render_gallery

    out.mkdir(parents=True, exist_ok=True)
    demo = open_model(str(model_path()), uri="builtin:demo", trusted=False)
    written = []
    with tempfile.TemporaryDirectory() as tmp, Browser(width=1280, height=REPORT_HEIGHT) as browser:
        root = Path(tmp)
        # The options `actviz demo` uses: the defaults.
        [artifacts] = analyze_images(demo, [image_path().read_bytes()], layers=None, overlay=False)
        index = publish_job(root, "demo", artifacts, image_uri="builtin:demo-photo.jpg")
        page = browser.open(index)
        if page.errors:
            raise RuntimeError(f"the demo report has errors: {page.errors}")
        shot = Image.open(io.BytesIO(page.screenshot(full_page=False)))
        written.append(_save(shot, out / "report.png"))
        grid = Image.open(index.parent / artifacts.manifest["layers"][0]["grid"]["png"])
        small = grid.convert("RGB").resize(
            (grid.width * 2 // 3, grid.height * 2 // 3), Image.LANCZOS
        )
        written.append(_save(small, out / "demo-grid.png"))
        untrained = _untrained_grid(root)
        written.append(_save(_beside(small, untrained), out / "demo-vs-random.png"))

        results = analyze_images(demo, photo_crops(3, side=150), layers="conv1,conv2,conv3")
        jobs = []
        for number, artifacts in enumerate(results):
            job_id = f"crop-{number}"
            publish_job(root, job_id, artifacts, image_uri=f"builtin:crop-{number}.png")
            manifest = dict(artifacts.manifest, job_id=job_id)
            manifest["image"] = dict(manifest["image"], uri=f"builtin:crop-{number}.png")
            jobs.append((job_id, manifest))
        FileStore(root).put(batch_key("demo"), render_gallery("demo", jobs))
        page = browser.open(root / batch_key("demo"))
        if page.errors:
            raise RuntimeError(f"the gallery has errors: {page.errors}")
        shot = Image.open(io.BytesIO(page.screenshot(full_page=False)))
        written.append(_save(shot.crop((0, 0, 1280, 1100)), out / "gallery.png"))
    return written


def _untrained_grid(folder: Path) -> Image.Image:
    """conv1 of the demo architecture with its initial (random, seeded) weights."""
    import keras

    from worker.demo import image_path
    from worker.demo.train import build_model
    from worker.engine import open_model

    keras.utils.set_random_seed(0)
    path = folder / "untrained.keras"
    build_model(150).save(path)
    loaded = open_model(str(path), uri="untrained", trusted=False)
    [artifacts] = analyze_images(loaded, [image_path().read_bytes()], layers="conv1")
    grid = Image.open(io.BytesIO(artifacts.files[artifacts.manifest["layers"][0]["grid"]["png"]]))
    return grid.convert("RGB").resize((grid.width * 2 // 3, grid.height * 2 // 3), Image.LANCZOS)


def _beside(trained: Image.Image, untrained: Image.Image) -> Image.Image:
    from PIL import ImageDraw

    gap, band = 24, 28
    canvas = Image.new(
        "RGB", (trained.width + gap + untrained.width, trained.height + band), "white"
    )
    canvas.paste(trained, (0, band))
    canvas.paste(untrained, (trained.width + gap, band))
    draw = ImageDraw.Draw(canvas)
    font = _font()
    draw.text((4, 4), "conv1, trained demo model", fill="black", font=font)
    draw.text(
        (trained.width + gap + 4, 4), "conv1, same network untrained", fill="black", font=font
    )
    return canvas


def _font():
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=18)
    except TypeError:  # Pillow < 10.1 has one fixed-size default font
        return ImageFont.load_default()


def _save(image: Image.Image, path: Path) -> Path:
    # An adaptive palette keeps the figures small in the repository.
    image.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(
        path, optimize=True
    )
    return path


if __name__ == "__main__":
    for written in make_screenshots(Path(sys.argv[1] if len(sys.argv) > 1 else "docs")):
        print(written, written.stat().st_size, "bytes")
