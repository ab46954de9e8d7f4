"""Queues and priorities on Redis: jobs wait for a worker of their queue, urgent ones first."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import redis
from stack import start_worker, subprocess_env

from producer import Client, Settings

REDIS_DB = 12
pytestmark = pytest.mark.timeout(150)


def test_waiting_jobs_start_in_priority_order_on_their_queue(
    redis_url: str, bucket: str, saved_models: dict[str, Path], png_bytes: bytes, tmp_path: Path
) -> None:
    env = subprocess_env(
        ACTVIZ_BROKER_URL=redis_url,
        ACTVIZ_STORAGE_URL=f"s3://{bucket}/results",
        ACTVIZ_MODEL_ALLOW=saved_models["seq"].parent.as_uri() + "/",
        ACTVIZ_MODEL_CACHE_DIR=str(tmp_path / "cache"),
    )
    client = Client(settings=Settings.from_env(environ=env))
    model = saved_models["seq"]
    # No worker yet: everything waits in Redis. Lower numbers are served first.
    background = [client.submit(model, png_bytes, queue="cpu", priority=9) for _ in range(2)]
    urgent = client.submit(model, png_bytes, queue="cpu", priority=0)
    elsewhere = client.submit(model, png_bytes, queue="gpu", priority=0)

    # Messages carry URIs, not pixels: each stays small whatever the image size.
    conn = redis.Redis.from_url(redis_url)
    queued = [m for key in conn.keys("cpu*") + conn.keys("gpu*") for m in conn.lrange(key, 0, -1)]
    assert len(queued) == 4
    assert all(len(message) < 4096 for message in queued)
    assert len(png_bytes) > 4096

    worker = start_worker(env, tmp_path / "worker.log", "--queues", "cpu")
    try:
        for job in [*background, urgent]:
            job.wait(timeout=60)
        received = re.findall(r"actviz\.extract\[(\w+)\] received", worker.log_text())
        assert received[0] == urgent.id
        assert set(received) == {urgent.id, *(j.id for j in background)}
        assert elsewhere.status() == "queued"  # no worker consumes 'gpu' here
    finally:
        worker.stop()
