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
