"""Real jobs for the report tests: photo crops -> engine -> a job folder on disk."""

from __future__ import annotations

import io
from pathlib import Path

from producer.contract import JobOptions, job_prefix, manifest_key
from producer.settings import Settings
from producer.storage import FileStore

# Top-left corners of 200x200 crops of the demo photo: face, flag, medals.
CROPS = ((170, 110), (0, 0), (300, 390), (60, 250))


def photo_crops(count: int, side: int = 48) -> list[bytes]:
    """`count` different PNG crops of the demo photo, `side` pixels square."""
    from PIL import Image

    from worker.demo import image_path

    with Image.open(image_path()) as photo:
        photo = photo.convert("RGB")
        width, height = photo.size
        crops = []
        for i in range(count):
            left, top = CROPS[i % len(CROPS)]
            left, top = min(left, width - 200), min(top, height - 200)
            crop = photo.crop((left, top, left + 200, top + 200)).resize((side, side))
            buffer = io.BytesIO()
            crop.save(buffer, format="PNG")
            crops.append(buffer.getvalue())
    return crops


def analyze_images(loaded, images: list[bytes], **options) -> list:
    """Engine results for `images`; options default to every layer, overlays on."""
    from worker.engine import analyze

    options.setdefault("layers", ":")
    options.setdefault("overlay", True)
    return analyze(loaded, images, JobOptions(**options), Settings())


def publish_job(root: Path, job_id: str, artifacts, image_uri: str | None = None) -> Path:
    """Write one job the way the worker does (files, report, manifest last); returns index.html."""
    from worker.engine import manifest_bytes
    from worker.report import render_report

    manifest = dict(artifacts.manifest, job_id=job_id)
    manifest["image"] = dict(manifest["image"], uri=image_uri)
    files = dict(artifacts.files)
    files.update(render_report(manifest))
    store = FileStore(root)
    for key, data in files.items():
        store.put(job_prefix(job_id) + key, data)
    store.put(manifest_key(job_id), manifest_bytes(manifest))
    return root / job_prefix(job_id) / "index.html"
