"""Real services for the tests: Redis, an S3 server over HTTP, and `actviz worker` processes.

- `s3_endpoint` (session): `moto_server` on a free port; AWS_ENDPOINT_URL_S3 and test
  credentials are set for this process and handed to every subprocess.
- `bucket` (module): a fresh bucket per test module.
- `redis_url` (module): a Redis database per module (`REDIS_DB` in the module), flushed
  before and after.
- `start_worker(env, log)`: a real `actviz worker` subprocess, logs captured to a file.
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from stack import ACTVIZ, BIN, REDIS_HOST, S3_ENV, free_port, start_worker, subprocess_env, wait_for  # noqa: F401

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server over HTTP; boto3 in this process and its children points at it."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )

    def up() -> bool:
        try:
            urllib.request.urlopen(endpoint, timeout=1).close()
            return True
        except OSError:
            return proc.poll() is not None

    wait_for(up, 30, "moto_server")
    assert proc.poll() is None, log.read_text()
    saved = {k: os.environ.get(k) for k in [*S3_ENV, "AWS_ENDPOINT_URL_S3"]}
    os.environ.update(S3_ENV, AWS_ENDPOINT_URL_S3=endpoint)
    yield endpoint
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def s3(s3_endpoint: str):  # noqa: ANN201
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture(scope="module")
def bucket(s3, request: pytest.FixtureRequest) -> str:  # noqa: ANN001
    name = "actviz-" + request.module.__name__.rsplit(".", 1)[-1].replace("_", "-")[:40]
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def redis_url(request: pytest.FixtureRequest) -> Iterator[str]:
    """redis://.../<REDIS_DB of the module>, flushed before and after the module."""
    import redis

    db = getattr(request.module, "REDIS_DB", 9)
    url = f"redis://{REDIS_HOST}/{db}"
    conn = redis.Redis.from_url(url)
    conn.flushdb()
    yield url
    conn.flushdb()
    conn.close()


@pytest.fixture(scope="session")
def saved_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny real Keras models saved once: 'seq' (.keras, 32x32), 'seq_h5', 'small_h5' (24x24)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import models

    out = tmp_path_factory.mktemp("service-models")
    seq = out / "seq_cnn.keras"
    models.sequential_cnn().save(seq)
    small = out / "small.h5"
    models.sequential_cnn(side=24).save(small)
    return {"seq": seq, "seq_h5": models.save_sequential_h5(out), "small_h5": small}


@pytest.fixture(scope="session")
def png_bytes() -> bytes:
    import io

    import numpy as np
    from PIL import Image

    pixels = (np.random.default_rng(3).random((40, 48, 3)) * 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()
