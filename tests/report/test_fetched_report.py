"""The report as a user gets it: `actviz submit` to a real worker, then `actviz fetch`.

A real `actviz worker` process, a real Redis and a real S3-compatible server
(moto's standalone server, shared by the suite: tests/conftest.py); the folder
`actviz fetch` writes is opened in Chromium.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from worker.demo import image_path

REDIS_DB = 11  # the shared `redis_url` fixture flushes this database
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def env(s3_endpoint: str, bucket: str, redis_url: str, tmp_path_factory) -> dict[str, str]:
    """Environment for actviz subprocesses: the shared Redis db and S3 server, a fresh bucket."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path_factory.mktemp("home")),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "ACTVIZ_BROKER_URL": redis_url,
        "ACTVIZ_STORAGE_URL": f"s3://{bucket}",
        "AWS_ENDPOINT_URL_S3": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }


@pytest.fixture(scope="module")
def worker(env, tmp_path_factory: pytest.TempPathFactory):
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "actviz"), "worker"], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    yield log
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def actviz(env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "actviz"), *args], env=env, capture_output=True, text=True, timeout=240
    )


@pytest.fixture(scope="module")
def fetched(env, worker, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo job's folder as `actviz fetch` writes it."""
    submit = actviz(
        env, "submit", "--model", "builtin:demo", "--image", str(image_path()), "--wait", "--json"
    )
    assert submit.returncode == 0, submit.stderr + worker.read_text(errors="replace")[-3000:]
    job_id = json.loads(submit.stdout)["job_id"]
    out = tmp_path_factory.mktemp("fetched") / job_id
    fetch = actviz(env, "fetch", job_id, "--out", str(out))
    assert fetch.returncode == 0, fetch.stderr
    return out


def test_fetched_demo_report_opens_with_every_image_and_no_errors(browser, fetched) -> None:
    manifest = json.loads((fetched / "manifest.json").read_text())
    assert (fetched / "depth.svg").is_file()
    page = browser.open(fetched / "index.html")
    images = page.evaluate(
        "Array.from(document.images).map(i => [i.id, i.complete, i.naturalWidth])"
    )
    assert page.errors == []
    assert images and all(complete and width > 0 for _, complete, width in images)
    assert "depth-chart" in [image_id for image_id, _, _ in images]
    names = page.evaluate(
        "Array.from(document.querySelectorAll('section.layer h2'))"
        ".map(h => h.firstChild.textContent.trim())"
    )
    assert names == [layer["name"] for layer in manifest["layers"]]
    assert names[0] == "conv1"


def test_open_prints_a_link_that_signs_every_image_the_report_shows(browser, env, fetched) -> None:
    """A private bucket refuses a page's relative requests: the link `actviz open` prints
    carries each image's presigned query in its fragment, and the page uses them."""
    from urllib.parse import parse_qsl, urlsplit

    from producer.signed import signed_refs

    opened = actviz(env, "open", fetched.name)
    assert opened.returncode == 0, opened.stderr
    url = opened.stdout.strip()
    refs = signed_refs(url)
    manifest = json.loads((fetched / "manifest.json").read_text())
    grids = {layer["grid"]["png"] for layer in manifest["layers"] if layer["grid"]}
    assert {"input.png", "depth.svg"} | grids <= set(refs)
    page_query = dict(parse_qsl(urlsplit(url).query))
    signature = "X-Amz-Signature" if "X-Amz-Signature" in page_query else "Signature"
    for ref, signed in refs.items():
        query = dict(parse_qsl(urlsplit(signed).query))
        assert urlsplit(signed).path.endswith(f"/{fetched.name}/{ref}")
        # every parameter of a presigned URL, and its own signature
        assert query.keys() == page_query.keys(), ref
        assert query[signature] != page_query[signature], ref
    assert len(url.partition("#")[2]) < 200 * len(refs)  # about 100 characters an image

    page = browser.open_url(url)
    images = page.evaluate(
        "Array.from(document.images).map(i => [i.currentSrc, i.complete, i.naturalWidth])"
    )
    assert page.errors == []
    assert images and all(complete and width > 0 for _, complete, width in images)
    assert sorted(src for src, _, _ in images) == sorted(
        refs[ref] for ref in refs if ref.endswith((".png", ".svg"))
    )
    assert page.evaluate("document.getElementById('linknote').hidden") is True


@pytest.fixture(scope="module")
def gallery_link(env, worker, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The link `actviz batch --wait` prints for a gallery of three demo jobs, signed for a
    public endpoint other than the one the producer uses (localhost for 127.0.0.1), as a
    compose stack's producer signs for http://127.0.0.1:9000 while it talks to s3:9000."""
    import shutil

    folder = tmp_path_factory.mktemp("batch-images")
    for i in range(3):
        shutil.copy(image_path(), folder / f"photo-{i}.jpg")
    public = env["AWS_ENDPOINT_URL_S3"].replace("127.0.0.1", "localhost")
    out = actviz(
        {**env, "ACTVIZ_S3_PUBLIC_ENDPOINT": public},
        "batch", "--model", "builtin:demo", "--layers", ":3", str(folder), "--wait",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr + worker.read_text(errors="replace")[-3000:]
    (link,) = [
        line.split("gallery: ", 1)[1] for line in out.stdout.splitlines() if "gallery: " in line
    ]
    assert link.startswith(public + "/"), link
    return link


def test_a_gallery_link_loads_every_image_from_the_private_bucket(browser, gallery_link) -> None:
    from producer.signed import signed_refs

    refs = signed_refs(gallery_link)
    page = browser.open_url(gallery_link)
    images = page.evaluate(
        "Array.from(document.images).map(i => [i.currentSrc, i.complete, i.naturalWidth])"
    )
    assert page.errors == []
    assert len(images) >= 3 * 4  # three inputs, and three grids for each
    assert all(complete and width > 0 for _, complete, width in images), images
    assert all(
        src.startswith(gallery_link.split("/", 3)[0] + "//localhost:") for src, _, _ in images
    )
    # Each job's report link is signed too (its own images need `actviz open`, as it says).
    hrefs = page.evaluate("Array.from(document.querySelectorAll('a[href]')).map(a => a.href)")
    reports = {h for h in hrefs if "/jobs/" in h and "index.html" in h}
    assert len(reports) == 3 and all("Signature=" in h for h in reports)
    # What loaded is exactly what the link signed.
    assert {src for src, _, _ in images} <= set(refs.values())


def test_the_same_gallery_without_its_signatures_shows_no_image_and_says_why(browser, gallery_link):
    """The bucket really is private: the page alone loads, its images are refused."""
    page = browser.open_url(gallery_link.partition("#")[0])
    loaded = page.evaluate("Array.from(document.images).filter(i => i.naturalWidth > 0).length")
    assert loaded == 0
    assert page.evaluate("document.getElementById('linknote').hidden") is False
