"""A census through the real service, and a worker SIGKILLed in the middle of one.

Redis, the S3 test server and real `actviz worker` processes. The same images
are censused twice: once undisturbed, once with the worker killed (SIGKILL,
nothing acknowledged) after some of its jobs have finished and a new worker
started. Both censuses count every image once and agree on every statistic.
"""

from __future__ import annotations

import json
from pathlib import Path

import harness
import numpy as np
import pytest

from producer import Client, Settings
from producer.contract import census_key, manifest_key

IMAGES = 10
REDELIVER_AFTER = 8
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def env(redis_url: str, bucket: str, tmp_path_factory) -> dict:  # noqa: ANN001
    return harness.worker_env(
        redis_url,
        f"s3://{bucket}/results",
        [f"s3://{bucket}/models/"],
        ACTVIZ_MODEL_CACHE_DIR=str(tmp_path_factory.mktemp("model-cache")),
        ACTVIZ_REDELIVER_AFTER=str(REDELIVER_AFTER),
        ACTVIZ_BATCH_SIZE="2",
        ACTVIZ_BATCH_WAIT_MS="50",
    )


def read_census(s3, bucket: str, batch_id: str) -> dict:  # noqa: ANN001
    key = "results/" + census_key(batch_id)
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def stored(s3, bucket: str, job_id: str) -> bool:  # noqa: ANN001
    return bool(harness.keys_of(s3, bucket, "results/" + manifest_key(job_id)))


def finish(client: Client, jobs: list, batch_id: str) -> None:
    for job in jobs:
        job.wait(timeout=180)
    # Up to a lease (30 s) and a sweep (15 s) after the worker holding the fold died.
    harness.wait_for(lambda: client.census_url(batch_id), 120, "the census page", 0.2)


def by_image(census: dict) -> dict:
    """The census's per-channel results, top images named by their position."""
    out = {}
    for layer in census["layers"]:
        tops = [[int(t["job_id"].rsplit("-", 1)[1]) for t in top] for top in layer["top"]]
        out[layer["name"]] = {**layer, "top": tops}
    return out


def test_a_census_completes_and_a_worker_killed_mid_census_changes_no_statistic(
    env: dict, models: dict[str, str], s3, bucket: str, tmp_path: Path
) -> None:
    client = Client(settings=Settings.from_env(environ=env))
    images = [harness.random_png(seed, 20, 24) for seed in range(IMAGES)]

    worker = harness.start_worker(env, tmp_path / "calm.log")
    try:
        calm_jobs = client.census(models["tiny"], images, top_k=3)
        calm_id = calm_jobs[0].batch_id
        finish(client, calm_jobs, calm_id)
    finally:
        worker.stop()
    calm = read_census(s3, bucket, calm_id)
    assert calm["images"] == IMAGES and calm["failed"] == 0
    assert [layer["name"] for layer in calm["layers"]] == ["conv_a", "conv_b"]
    page = s3.get_object(Bucket=bucket, Key="results/" + census_key(calm_id, "census.html"))
    assert b"conv_b" in page["Body"].read()

    jobs = client.census(models["tiny"], images, top_k=3)
    batch_id = jobs[0].batch_id
    first = harness.start_worker(env, tmp_path / "killed.log")
    try:
        harness.wait_for(
            lambda: sum(stored(s3, bucket, job.id) for job in jobs) >= 3, 120, "3 jobs done", 0.05
        )
    finally:
        first.kill()
    done_before = sum(stored(s3, bucket, job.id) for job in jobs)
    second = harness.start_worker(env, tmp_path / "after.log")
    try:
        finish(client, jobs, batch_id)
    finally:
        second.stop()
    killed = read_census(s3, bucket, batch_id)
    harness.record("Faults", "census: jobs done when its worker was killed", done_before)

    assert killed["images"] == IMAGES and killed["failed"] == 0
    one, other = by_image(calm), by_image(killed)
    assert one.keys() == other.keys()
    for name, layer in one.items():
        # The two runs batch the images differently; float32 rounding may differ in the
        # last bits, so values are compared within 1e-6, counts exactly.
        assert layer["count"] == other[name]["count"], name
        assert layer["top"] == other[name]["top"], name
        for key in ("mean", "std", "min", "max", "sparsity", "dead_fraction"):
            np.testing.assert_allclose(layer[key], other[name][key], rtol=1e-6, atol=1e-9)
