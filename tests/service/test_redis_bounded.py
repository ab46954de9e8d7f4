"""Redis holds nothing per job forever: every per-job key expires, most with the results,
and the memory the jobs took returns."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import redis as redis_lib
from stack import start_worker, subprocess_env, wait_for

from producer import Client, Settings
from producer.batches import PENDING_FINALIZE
from worker.jobs.deliveries import KEY_PREFIX as DELIVERIES

REDIS_DB = 8
pytestmark = pytest.mark.timeout(240)
LIFETIME_S = 3


def worker_env(
    redis_url: str, saved_models: dict[str, Path], tmp_path: Path, lifetime: int
) -> dict:
    """A worker's environment whose results live `lifetime` seconds."""
    return subprocess_env(
        ACTVIZ_BROKER_URL=redis_url,
        ACTVIZ_STORAGE_URL=(tmp_path / "store").as_uri(),
        ACTVIZ_MODEL_ALLOW=f"{saved_models['seq'].parent.as_uri()}/",
        ACTVIZ_MODEL_CACHE_DIR=str(tmp_path / "cache"),
        ACTVIZ_RESULT_EXPIRES=str(lifetime),
    )


def test_per_job_keys_expire_and_leave_only_bounded_delivery_counters(
    redis_url: str, saved_models: dict[str, Path], png_bytes: bytes, tmp_path: Path
) -> None:
    env = worker_env(redis_url, saved_models, tmp_path, LIFETIME_S)
    redis = redis_lib.Redis.from_url(redis_url)
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        client = Client(settings=Settings.from_env(environ=env))
        idle = set(redis.keys())
        images = [png_bytes[:-1] + bytes([i]) for i in range(12)]
        jobs = client.submit_many(saved_models["seq"].as_uri(), images, layers="conv2d_1")
        for job in jobs:
            job.wait(timeout=90)
        # The batch's gallery is written after its last job, on a thread of the worker
        # that ended it; until then the batch is listed as pending (a set of every
        # batch's, with no expiry of its own).
        gallery = tmp_path / "store" / "batches" / jobs[0].batch_id / "index.html"
        wait_for(gallery.is_file, 30, "the batch gallery")
        wait_for(lambda: not redis.exists(PENDING_FINALIZE), 30, "the batch's finalization")
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


def test_redis_memory_per_job_returns_to_its_baseline_after_expiry(
    redis_url: str, saved_models: dict[str, Path], png_bytes: bytes, tmp_path: Path
) -> None:
    """used_memory grows by what each job keeps (result, registry entry, progress) and
    falls back when they expire; what stays is the delivery counters (about 100 B a job,
    expiring within the hour)."""
    lifetime = 20
    env = worker_env(redis_url, saved_models, tmp_path, lifetime)
    redis = redis_lib.Redis.from_url(redis_url)
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        client = Client(settings=Settings.from_env(environ=env))
        client.submit(saved_models["seq"].as_uri(), png_bytes, layers="conv2d_1").wait(timeout=90)
        time.sleep(lifetime + 2)  # the warm-up job's keys are gone too
        baseline = int(redis.info("memory")["used_memory"])
        count = 100
        images = [png_bytes[:-1] + bytes([i]) for i in range(count)]
        started = time.monotonic()
        jobs = client.submit_many(saved_models["seq"].as_uri(), images, layers="conv2d_1")
        for job in jobs:
            job.wait(timeout=90)
        assert time.monotonic() - started < lifetime, "the jobs must all be alive when measured"
        peak = int(redis.info("memory")["used_memory"])
        time.sleep(lifetime + 3)
        after = int(redis.info("memory")["used_memory"])
    finally:
        worker.stop()
    per_job = (peak - baseline) / count
    left_per_job = (after - baseline) / count
    assert per_job > 500, per_job  # the measure sees what jobs keep
    assert left_per_job < 0.25 * per_job, (per_job, left_per_job)
    print(f"Redis memory per job: {per_job:.0f} B while results live, {left_per_job:.0f} B after")
