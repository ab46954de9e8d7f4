"""Redis holds nothing per job forever: every per-job key expires, most with the results."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis as redis_lib
from stack import start_worker, subprocess_env

from producer import Client, Settings
from worker.jobs.deliveries import KEY_PREFIX as DELIVERIES

REDIS_DB = 8
pytestmark = pytest.mark.timeout(240)
LIFETIME_S = 3


def test_per_job_keys_expire_and_leave_only_bounded_delivery_counters(
    redis_url: str, saved_models: dict[str, Path], png_bytes: bytes, tmp_path: Path
) -> None:
    env = subprocess_env(
        ACTVIZ_BROKER_URL=redis_url,
        ACTVIZ_STORAGE_URL=(tmp_path / "store").as_uri(),
        ACTVIZ_MODEL_ALLOW=f"{saved_models['seq'].parent.as_uri()}/",
        ACTVIZ_MODEL_CACHE_DIR=str(tmp_path / "cache"),
        ACTVIZ_RESULT_EXPIRES=str(LIFETIME_S),
    )
    redis = redis_lib.Redis.from_url(redis_url)
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        client = Client(settings=Settings.from_env(environ=env))
        idle = set(redis.keys())
        images = [png_bytes[:-1] + bytes([i]) for i in range(12)]
        jobs = client.submit_many(saved_models["seq"].as_uri(), images, layers="conv2d_1")
        for job in jobs:
            job.wait(timeout=90)
        per_job = set(redis.keys()) - idle
        assert per_job, "jobs leave state in Redis while their results live"
        settings = Settings.from_env(environ=env)
        counter_ttl = settings.visibility_timeout * (settings.max_deliveries + 1) + (
            settings.time_limit
        )
        for key in per_job:
            ttl = redis.ttl(key)
            assert 0 < ttl <= max(LIFETIME_S, counter_ttl), (key, ttl)  # nothing forever
        time.sleep(LIFETIME_S + 1.5)
        left = {key.decode() for key in set(redis.keys()) - idle}
        # Results, registry, batch progress: gone with the results' lifetime. What stays a
        # while longer is one delivery counter per job attempt, itself expiring.
        assert all(key.startswith(DELIVERIES) for key in left), sorted(left)[:5]
        assert len(left) <= len(jobs)
    finally:
        worker.stop()
