"""Diff jobs through the real stack: Redis, the S3 test server and an `actviz worker`."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
from stack import noise_png as png
from stack import start_worker, subprocess_env

from producer import Client, ErrorCode, JobFailed, Settings
from producer.contract import census_key

pytestmark = pytest.mark.timeout(240)


def wait_for(probe, timeout: float):  # noqa: ANN001, ANN201
    deadline = time.monotonic() + timeout
    while (found := probe()) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


@pytest.fixture(scope="module")
def env(redis_url: str, bucket: str, s3, tmp_path_factory) -> dict:  # noqa: ANN001
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import models

    folder = tmp_path_factory.mktemp("diff-models")
    model = models.softmax_cnn()
    model.save(folder / "a.keras")
    weights = model.get_layer("conv_b").get_weights()
    model.get_layer("conv_b").set_weights([weights[0] * 1.1, weights[1]])
    model.save(folder / "b.keras")
    for name in ("a", "b"):
        s3.upload_file(str(folder / f"{name}.keras"), bucket, f"models/{name}.keras")
    return subprocess_env(
        ACTVIZ_BROKER_URL=redis_url,
        ACTVIZ_STORAGE_URL=f"s3://{bucket}/results",
        ACTVIZ_MODEL_ALLOW=f"s3://{bucket}/models/",
        ACTVIZ_MODEL_CACHE_DIR=str(tmp_path_factory.mktemp("model-cache")),
    )


def test_a_diff_of_two_checkpoints_completes_and_finds_the_changed_layer(
    env: dict, s3, bucket: str, tmp_path: Path
) -> None:
    a, b = f"s3://{bucket}/models/a.keras", f"s3://{bucket}/models/b.keras"
    client = Client(settings=Settings.from_env(environ=env))
    jobs = client.diff(a, b, [png(seed) for seed in range(3)])
    outside = client.diff(a, f"s3://{bucket}/elsewhere/b.keras", [png(9)])
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        results = [job.wait(timeout=150) for job in jobs]
        with pytest.raises(JobFailed) as refused:
            outside[0].wait(timeout=60)
        batch_id = jobs[0].batch_id or ""
        page = wait_for(lambda: client.diff_url(batch_id), 40)
    finally:
        worker.stop()
    assert refused.value.code == ErrorCode.MODEL_NOT_ALLOWED  # `against` is allow-listed too
    for job, result in zip(jobs, results, strict=True):
        diff = result.manifest["diff"]
        assert diff["first_divergent"] == "conv_b"
        assert [e["relative_l2"] for e in diff["layers"][:2]] == [0.0, 0.0]
        assert diff["against"]["uri"] == b
        stored = s3.get_object(Bucket=bucket, Key=f"results/jobs/{job.id}/diff.json")
        assert json.loads(stored["Body"].read())["first_divergent"] == "conv_b"
        report = s3.get_object(Bucket=bucket, Key=f"results/jobs/{job.id}/index.html")
        assert b"first divergent" in report["Body"].read()
    assert page, "the batch's diff.html was not written"
    summary = json.loads(
        s3.get_object(Bucket=bucket, Key="results/" + census_key(batch_id, "diff.json"))[
            "Body"
        ].read()
    )
    assert summary["images"] == 3 and summary["first_divergent"] == "conv_b"
    assert [layer["name"] for layer in summary["layers"]] == ["conv_a", "pool_a", "conv_b"]
