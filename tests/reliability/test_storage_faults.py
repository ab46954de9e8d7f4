"""Storage that refuses: a bucket that denies the worker's writes, a full model-cache disk.

Each fails the job with `storage_error` and a message naming the operation and
where, leaves nothing half-written, and the worker goes on serving.

- The bucket: a moto server of its own with IAM enforced (INITIAL_NO_AUTH_ACTION_COUNT
  lets the set-up run first); the producer's user may do anything, the worker's may
  read but not write.
- The disk: the worker runs in a mount namespace of its own (`unshare -Urm`) whose
  model cache is a 128 KiB tmpfs; the heavy model does not fit, the tiny one does.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import harness
import pytest
from stack import StrictS3

from producer import Client, JobFailed, Settings
from producer.contract import ErrorCode
from producer.storage import S3Store

pytestmark = pytest.mark.timeout(300)
BUCKET = "actviz-denied"
SETUP_ACTIONS = 8  # create the bucket, two users, their policies and keys


@pytest.fixture(scope="module")
def strict_s3(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """(endpoint, producer keys, worker keys) of a moto server that enforces IAM."""
    server = StrictS3(tmp_path_factory.mktemp("strict-s3") / "moto.log", SETUP_ACTIONS)
    everything = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
    read_only = {
        "Effect": "Allow",
        "Action": ["s3:GetObject", "s3:ListBucket"],
        "Resource": [f"arn:aws:s3:::{BUCKET}", f"arn:aws:s3:::{BUCKET}/*"],
    }
    try:
        server.client("s3").create_bucket(Bucket=BUCKET)
        keys = {
            "producer": server.user("producer", everything),
            "worker": server.user("worker", read_only),
        }
        server.enforce(BUCKET, keys["worker"])
        yield server.endpoint, keys
    finally:
        server.stop()


def test_a_bucket_that_denies_the_workers_writes_fails_the_job_with_storage_error(
    strict_s3, redis_url: str, rel_model_files: dict[str, Path], tmp_path: Path
) -> None:
    import boto3

    endpoint, keys = strict_s3
    base = harness.worker_env(redis_url, f"s3://{BUCKET}/results", [f"s3://{BUCKET}/models/"])
    base.update(AWS_ENDPOINT_URL_S3=endpoint, ACTVIZ_MODEL_CACHE_DIR=str(tmp_path / "cache"))
    producer_s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id=keys["producer"]["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=keys["producer"]["AWS_SECRET_ACCESS_KEY"],
    )
    producer_s3.upload_file(str(rel_model_files["tiny"]), BUCKET, "models/tiny.keras")
    worker = harness.start_worker({**base, **keys["worker"]}, tmp_path / "worker.log")
    try:
        # This process's boto3 holds the suite's credentials: the producer's store gets a
        # client of its own, with the producer user's keys.
        client = Client(settings=Settings.from_env(environ=base))
        client._store = S3Store(BUCKET, "results", client=producer_s3)
        job = client.submit(f"s3://{BUCKET}/models/tiny.keras", harness.random_png(3, 16, 16))
        with pytest.raises(JobFailed) as failed:
            job.wait(timeout=120)
        assert worker.alive()
        log = worker.log_text()
    finally:
        worker.stop()
    assert failed.value.code == ErrorCode.STORAGE_ERROR, failed.value.message
    message = failed.value.message
    assert "PutObject" in message and f"s3://{BUCKET}/results/jobs/{job.id}/" in message
    assert "s3:PutObject" in message and "AccessDenied" in message
    assert "Traceback" not in log.split("job failed", 1)[-1][:2000]
    harness.record(
        "Storage faults", "bucket denies the worker's writes", f"storage_error: {message[:90]}…"
    )


def test_a_full_model_cache_disk_fails_the_job_with_storage_error_and_leaves_no_part(
    redis_url: str, bucket: str, models: dict[str, str], tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    env = harness.worker_env(
        redis_url,
        f"s3://{bucket}/results",
        [f"s3://{bucket}/models/"],
        ACTVIZ_MODEL_CACHE_DIR=str(cache),
    )
    log = tmp_path / "worker.log"
    script = f'mount -t tmpfs -o size=128k tmpfs "{cache}" && exec "{harness.ACTVIZ}" worker'
    with log.open("wb") as out:
        proc = subprocess.Popen(
            ["unshare", "-Urm", "sh", "-c", script], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    worker = harness.Worker(proc, log)
    try:
        harness.wait_for(
            lambda: b" ready." in log.read_bytes() or proc.poll() is not None, 120, "worker"
        )
        assert proc.poll() is None, log.read_text()
        client = Client(settings=Settings.from_env(environ=env))
        heavy = client.submit(models["heavy"], harness.random_png(4, 16, 16), layers="conv_0")
        with pytest.raises(JobFailed) as failed:
            heavy.wait(timeout=120)
        seen = Path(f"/proc/{proc.pid}/root") / cache.relative_to("/")
        leftovers = [p.name for p in seen.rglob("*") if p.is_file()]
        tiny = client.submit(models["tiny"], harness.random_png(5, 16, 16)).wait(timeout=120)
        assert worker.alive()
    finally:
        worker.stop()
    assert failed.value.code == ErrorCode.STORAGE_ERROR, failed.value.message
    message = failed.value.message
    assert "No space left on device" in message and "ACTVIZ_MODEL_CACHE_DIR" in message
    assert models["heavy"] in message
    assert not [name for name in leftovers if name.endswith(".part")], leftovers
    assert tiny.layers == ["conv_a", "conv_b"]  # a model that fits still loads
    harness.record("Storage faults", "model cache disk full", f"storage_error: {message[:90]}…")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))
