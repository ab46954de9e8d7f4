"""A job whose quarantine helper never starts, through every retry, fails as worker_lost.

A real worker and Redis. The job is marked as one a worker died running (one
death charged, and each attempt already delivered once), so every delivery of
it runs in the quarantine process. The helper gets 1 s to say it is ready,
less than its imports take, so none ever does: the task retries
HelperUnavailable like a storage fault, then gives up with worker_lost and an
error.json that says why.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from stack import noise_png, start_worker, subprocess_env

from producer import Client, ErrorCode, JobFailed, Settings
from producer.contract import error_key
from producer.storage import FileStore

REDIS_DB = 5
pytestmark = pytest.mark.timeout(180)


def test_a_helper_that_never_starts_through_every_retry_fails_the_job_as_worker_lost(
    redis_url: str, saved_models: dict[str, Path], tmp_path: Path
) -> None:
    import redis

    from worker.jobs.deliveries import delivery_key
    from worker.runtime.running import suspect_key

    retries = 1
    store = tmp_path / "store"
    client = Client(settings=Settings(broker_url=redis_url, storage_url=store.as_uri()))
    job = client.submit(saved_models["seq"], noise_png(0))
    conn = redis.Redis.from_url(redis_url)
    conn.set(suspect_key(job.id), 1)  # a worker died running it
    for retry in range(retries + 1):  # and every attempt was delivered once before
        conn.set(delivery_key(job.id, retry), 1)
    env = subprocess_env(
        ACTVIZ_BROKER_URL=redis_url,
        ACTVIZ_STORAGE_URL=store.as_uri(),
        ACTVIZ_MODEL_ALLOW=saved_models["seq"].parent.as_uri() + "/",
        ACTVIZ_MAX_RETRIES=str(retries),
        ACTVIZ_QUARANTINE_START_S="1",
    )
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        with pytest.raises(JobFailed) as failed:
            job.wait(timeout=150)
    finally:
        worker.stop()
    assert failed.value.code == ErrorCode.WORKER_LOST
    assert "no quarantine process started" in failed.value.message
    assert f"through {retries} retries" in failed.value.message
    log = worker.log_text()
    assert log.count(f"actviz.extract[{job.id}] retry") == retries
    assert log.count("it runs in the quarantine process") == retries + 1
    error = json.loads(FileStore(store).get(error_key(job.id)))
    assert error["code"] == ErrorCode.WORKER_LOST and error["job_id"] == job.id
