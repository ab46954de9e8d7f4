"""Redis at maxmemory: a submit is refused with `queue_full`, and nothing of it stays queued.

A private redis-server (this suite's `redis_url`), filled to a `maxmemory` just
above what it holds, with the `noeviction` policy the compose stack uses. The
Python API and the CLI both refuse the job with its code; no registry entry, no
queued message, no batch record is left behind; once there is room again the
same submit succeeds.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import harness
import pytest
import redis as redis_py
from stack import ACTVIZ

from producer import Client, ErrorCode, Settings
from producer.errors import QueueFull

pytestmark = pytest.mark.timeout(120)


def fill(conn: redis_py.Redis) -> None:
    """Set maxmemory just above the current use and write until Redis refuses."""
    conn.config_set("maxmemory-policy", "noeviction")
    conn.config_set("maxmemory", str(int(conn.info("memory")["used_memory"]) + 200_000))
    with pytest.raises(redis_py.exceptions.OutOfMemoryError):
        for i in range(100_000):
            conn.set(f"ballast:{i}", "x" * 1000)


def test_a_full_broker_refuses_jobs_with_queue_full_and_keeps_nothing_of_them(
    redis_url: str, s3_endpoint: str, tmp_path: Path
) -> None:
    conn = redis_py.Redis.from_url(redis_url)
    conn.flushdb()
    image = tmp_path / "cat.png"
    image.write_bytes(harness.random_png(1, 24, 24))
    env = harness.worker_env(redis_url, (tmp_path / "results").as_uri(), [])
    client = Client(settings=Settings.from_env(environ=env))
    fill(conn)
    keys_before = set(conn.keys("*"))

    with pytest.raises(QueueFull) as refused:
        client.submit("builtin:demo", image)
    assert refused.value.code == ErrorCode.QUEUE_FULL
    assert "maxmemory" in refused.value.message and "nothing was queued" in refused.value.message
    with pytest.raises(QueueFull):
        client.submit_many("builtin:demo", [image, image])
    done = subprocess.run(
        [str(ACTVIZ), "submit", "--model", "builtin:demo", "--image", str(image), "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert json.loads(done.stdout)["error"]["code"] == "queue_full"
    # Nothing half-enqueued: no registry entry, no message, no batch record.
    assert set(conn.keys("*")) == keys_before

    conn.config_set("maxmemory", "0")  # room again (the operator raised the limit)
    job = client.submit("builtin:demo", image)
    assert conn.exists(f"actviz:job:{job.id}") and conn.llen("gpu") == 1
