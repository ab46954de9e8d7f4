"""The report as a user gets it: `actviz submit` to a real worker, then `actviz fetch`.

A real `actviz worker` process, a real Redis and a real S3-compatible server
(moto's standalone server); the folder `actviz fetch` writes is opened in Chromium.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import boto3
import pytest
import redis

from worker.demo import image_path

REDIS_DB = 11
BUCKET = "actviz-report"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory):
    """Environment for actviz subprocesses: local Redis db, a fresh S3 server and bucket."""
    port = free_port()
    s3 = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.05)
    values = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path_factory.mktemp("home")),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "ACTVIZ_BROKER_URL": f"redis://127.0.0.1:6379/{REDIS_DB}",
        "ACTVIZ_STORAGE_URL": f"s3://{BUCKET}",
        "AWS_ENDPOINT_URL_S3": endpoint,
        "AWS_ACCESS_KEY_ID": "report-test",
        "AWS_SECRET_ACCESS_KEY": "report-test",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="report-test",
        aws_secret_access_key="report-test",
        region_name="us-east-1",
    ).create_bucket(Bucket=BUCKET)
    db = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB)
    db.flushdb()
    yield values
    db.flushdb()
    s3.terminate()
    s3.wait(10)


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
    assert (fetched / "depth.png").is_file()
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
