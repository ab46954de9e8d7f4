"""Transient faults retry with backoff, then fail with storage_error."""

from __future__ import annotations

from pathlib import Path

import pytest
from stack import S3_ENV, free_port, start_worker, subprocess_env

from producer import Client, ErrorCode, JobFailed, Settings

REDIS_DB = 11
pytestmark = pytest.mark.timeout(150)


@pytest.fixture(scope="module")
def dead_s3_worker(redis_url: str, saved_models: dict[str, Path], tmp_path_factory):  # noqa: ANN001, ANN201
    """A worker whose S3 endpoint refuses connections (nothing listens on the port)."""
    env = subprocess_env(
        ACTVIZ_BROKER_URL=redis_url,
        ACTVIZ_STORAGE_URL="s3://unreachable/results",
        ACTVIZ_MODEL_ALLOW=saved_models["seq"].parent.as_uri() + "/",
        ACTVIZ_MAX_RETRIES="2",
        AWS_ENDPOINT_URL_S3=f"http://127.0.0.1:{free_port()}",
        AWS_MAX_ATTEMPTS="1",
        **S3_ENV,
    )
    log = tmp_path_factory.mktemp("dead-s3-worker") / "worker.log"
    proc = start_worker(env, log)
    yield proc
    proc.stop()


@pytest.fixture
def client(redis_url: str, tmp_path: Path) -> Client:
    # The producer's own storage works; only the worker's S3 is unreachable.
    return Client(settings=Settings(broker_url=redis_url, storage_url=tmp_path.as_uri()))


def test_unreachable_storage_is_retried_then_fails_as_storage_error(
    dead_s3_worker, client: Client, saved_models: dict[str, Path]
) -> None:
    job = client.submit(saved_models["seq"], "s3://unreachable/inputs/cat.png")
    with pytest.raises(JobFailed) as failed:
        job.wait(timeout=120)
    assert failed.value.code == ErrorCode.STORAGE_ERROR
    log = dead_s3_worker.log_text()
    assert log.count(f"actviz.extract[{job.id}] retry") == 2  # max_retries, then give up
