"""Micro-batching through the real stack: Redis, moto S3 and an `actviz worker` process.

Jobs are queued before the worker starts, so it finds them all waiting.
"""

from __future__ import annotations

import io
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from stack import free_port, start_worker, subprocess_env

from producer import Client, ErrorCode, JobFailed, Settings

REDIS_DB = 6
BATCH = 6
pytestmark = pytest.mark.timeout(180)


def png(seed: int) -> bytes:
    pixels = (np.random.default_rng(seed).random((40, 48, 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def metric(text: str, name: str) -> float:
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name)]
    assert values, f"{name} not in the metrics"
    return values[0]


@pytest.fixture(scope="module")
def env(redis_url: str, bucket: str, s3, saved_models: dict[str, Path], tmp_path_factory) -> dict:  # noqa: ANN001
    s3.upload_file(str(saved_models["seq"]), bucket, "models/seq_cnn.keras")
    return subprocess_env(
        ACTVIZ_BROKER_URL=redis_url,
        ACTVIZ_STORAGE_URL=f"s3://{bucket}/results",
        ACTVIZ_MODEL_ALLOW=f"s3://{bucket}/models/",
        ACTVIZ_MODEL_CACHE_DIR=str(tmp_path_factory.mktemp("model-cache")),
        ACTVIZ_BATCH_SIZE=str(BATCH),
        ACTVIZ_BATCH_WAIT_MS="500",
    )


def test_jobs_queued_together_share_forward_passes_and_a_bad_image_fails_alone(
    env: dict, s3, bucket: str, tmp_path: Path
) -> None:
    model = f"s3://{bucket}/models/seq_cnn.keras"
    client = Client(settings=Settings.from_env(environ=env))
    images = [png(seed) for seed in range(BATCH - 1)]
    good = [client.submit(model, image, layers=":3") for image in images[:3]]
    bad = client.submit(model, b"GIF89a but not an image", layers=":3")
    good += [client.submit(model, image, layers=":3") for image in images[3:]]

    port = free_port()
    worker = start_worker(
        {**env, "ACTVIZ_METRICS_PORT": str(port)}, tmp_path / "worker.log", "--preload", model
    )
    try:
        results = [job.wait(timeout=120) for job in good]
        with pytest.raises(JobFailed) as failed:
            bad.wait(timeout=60)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            metrics = resp.read().decode()
    finally:
        worker.stop()

    assert failed.value.code == ErrorCode.INVALID_IMAGE
    error = s3.get_object(Bucket=bucket, Key=f"results/jobs/{bad.id}/error.json")
    assert json.loads(error["Body"].read())["code"] == ErrorCode.INVALID_IMAGE
    # Each job has its own complete manifest, naming its own image.
    for job, result in zip(good, results, strict=True):
        key = f"results/jobs/{job.id}/manifest.json"
        manifest = json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
        assert manifest["job_id"] == job.id == result.manifest["job_id"]
        assert manifest["image"]["sha256"] == result.manifest["image"]["sha256"]
        assert len(manifest["layers"]) == 3
        assert manifest["batch"]["activation_bytes"] > 0
        assert 0 < manifest["batch"]["d2h_bytes"] <= manifest["batch"]["activation_bytes"]
    assert len({r.manifest["image"]["sha256"] for r in results}) == len(good)
    # Fewer forward passes than good images; the preload's warm-up is not one of them.
    passes = metric(metrics, "actviz_forward_batch_images_count")
    assert metric(metrics, "actviz_forward_batch_images_sum") == len(good)
    assert passes < len(good)
    sizes = [r.manifest["batch"]["size"] for r in results]
    assert max(sizes) > 1
    numbers = {r.manifest["batch"]["number"] for r in results}
    assert len(numbers) == passes
    # The histogram tells each pass size to 8 apart, as the manifests count them.
    size_of = {r.manifest["batch"]["number"]: r.manifest["batch"]["size"] for r in results}
    for bound in range(1, 9):
        bucket = f'actviz_forward_batch_images_bucket{{le="{bound}.0"}}'
        assert metric(metrics, bucket) == sum(size <= bound for size in size_of.values())
