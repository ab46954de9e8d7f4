"""Grad-CAM jobs through the real stack: Redis, moto S3 and an `actviz worker` process.

Jobs are queued before the worker starts, so it finds them all waiting and
batches them: Grad-CAM jobs of one model, layer and classes share forward and
backward passes, as activations jobs share forward passes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from stack import noise_png as png
from stack import start_worker, subprocess_env

from producer import Client, ErrorCode, InvalidJob, JobFailed, Settings

BATCH = 6
pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def env(redis_url: str, bucket: str, s3, tmp_path_factory) -> dict:  # noqa: ANN001
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import models

    path = models.save_softmax_keras(tmp_path_factory.mktemp("gradcam-model"))
    s3.upload_file(str(path), bucket, "models/softmax.keras")
    return subprocess_env(
        ACTVIZ_BROKER_URL=redis_url,
        ACTVIZ_STORAGE_URL=f"s3://{bucket}/results",
        ACTVIZ_MODEL_ALLOW=f"s3://{bucket}/models/",
        ACTVIZ_MODEL_CACHE_DIR=str(tmp_path_factory.mktemp("model-cache")),
        ACTVIZ_BATCH_SIZE=str(BATCH),
        ACTVIZ_BATCH_WAIT_MS="500",
    )


def read_json(s3, bucket: str, key: str) -> dict:  # noqa: ANN001
    return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())


def test_grad_cam_jobs_share_passes_write_their_files_and_fail_alone(
    env: dict, s3, bucket: str, tmp_path: Path
) -> None:
    model = f"s3://{bucket}/models/softmax.keras"
    client = Client(settings=Settings.from_env(environ=env))
    labels = ["cat", "dog", "bird", "fish"]
    cams = [
        client.submit(model, png(seed), kind="gradcam", top=2, labels=labels)
        for seed in range(BATCH)
    ]
    out_of_range = client.submit(model, png(50), kind="gradcam", classes=[7])
    both = client.submit(model, png(60), gradcam=True, classes=[1], layers=":3")

    worker = start_worker(env, tmp_path / "worker.log")
    try:
        results = [job.wait(timeout=150) for job in cams]
        with pytest.raises(JobFailed) as failed:
            out_of_range.wait(timeout=60)
        combined = both.wait(timeout=60)
    finally:
        worker.stop()

    # Fewer forward/backward passes than jobs: the worker batched them.
    numbers = {r.manifest["batch"]["number"] for r in results}
    assert len(numbers) < len(cams)
    assert max(r.manifest["batch"]["size"] for r in results) > 1
    for job in cams:
        manifest = read_json(s3, bucket, f"results/jobs/{job.id}/manifest.json")
        assert manifest["kind"] == "gradcam" and manifest["job_id"] == job.id
        section = manifest["gradcam"]
        assert section["layer"] == "conv_b" and section["scores"] == "softmax"
        assert [c["rank"] for c in section["classes"]] == [1, 2]
        assert all(c["name"] in labels for c in section["classes"])
        for entry in section["classes"]:
            for name in ("heatmap", "overlay", "values"):
                key = f"results/jobs/{job.id}/{entry[name]}"
                assert s3.head_object(Bucket=bucket, Key=key)["ContentLength"] > 0
        report = s3.get_object(Bucket=bucket, Key=f"results/jobs/{job.id}/index.html")
        assert b"Grad-CAM at conv_b" in report["Body"].read()
        timings = manifest["timings_ms"]  # the pass's end to the image's files, waits included
        assert timings["gradcam_render_wall"] >= timings["gradcam_render"] > 0, timings

    assert failed.value.code == ErrorCode.INVALID_JOB
    assert "the model has 4 classes" in failed.value.message
    error = read_json(s3, bucket, f"results/jobs/{out_of_range.id}/error.json")
    assert error["code"] == ErrorCode.INVALID_JOB

    # An activations job that asked for Grad-CAM too: one manifest, one report, both parts.
    manifest = combined.manifest
    assert manifest["kind"] == "activations" and len(manifest["layers"]) == 3
    assert [c["class"] for c in manifest["gradcam"]["classes"]] == [1]
    assert manifest["gradcam"]["classes"][0]["heatmap"] in manifest["files"]
    assert {"render_wall", "gradcam", "gradcam_render_wall"} <= set(manifest["timings_ms"])
    report = s3.get_object(Bucket=bucket, Key=f"results/jobs/{both.id}/index.html")
    page = report["Body"].read()
    assert b"Grad-CAM at conv_b" in page and b"Sparsity and mean activation by depth" in page


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"kind": "gradcam", "classes": [-1]}, "class indices"),
        ({"kind": "gradcam", "classes": [1, 1]}, "names a class twice"),
        ({"kind": "gradcam", "top": 0}, "top must be an integer"),
        ({"kind": "gradcam", "top": 2, "classes": [1]}, "not both"),
        ({"kind": "gradcam", "method": "scorecam"}, "method 'scorecam' unknown"),
        ({"kind": "gradcam", "layer": "a,b"}, "must name one layer"),
        ({"classes": [1]}, "use kind 'gradcam'"),
        ({"kind": "gradcam", "labels": "no-such-labels.txt"}, "cannot be read"),
    ],
)
def test_bad_grad_cam_options_are_refused_at_submit(
    env: dict, options: dict, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    client = Client(settings=Settings.from_env(environ=env))
    with pytest.raises(InvalidJob, match=message):
        client.submit("s3://nowhere/models/m.keras", png(1), **options)
