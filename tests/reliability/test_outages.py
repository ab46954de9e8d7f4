"""The storage endpoint and the Redis server go away for a while; jobs still complete.

S3 outage: the worker reaches the S3 server through a TCP proxy, and the outage
is the proxy refusing and cutting every connection for 10 s. That models the
endpoint (or the network to it) failing while the storage behind it keeps its
objects, as S3 or MinIO on disks do. Stopping moto_server instead would also
erase its in-memory buckets, which is not what an outage does to real storage;
SIGSTOP would leave connections hanging rather than failing.

Redis restart: a private `redis-server` with AOF and `appendfsync always`, so a
restart keeps the queued messages, as the compose and k8s Redis are configured.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import harness
import pytest

from producer import Client, Settings

OUTAGE_S = 10
pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    return tmp_path


class ManifestPoller(threading.Thread):
    """Checks, until stopped, that every manifest in view names only existing objects."""

    def __init__(self, s3, bucket: str, job_ids: list[str]) -> None:  # noqa: ANN001
        super().__init__(daemon=True)
        self.s3, self.bucket, self.job_ids = s3, bucket, job_ids
        self.checks = 0
        self.seen_manifests = 0
        self.violations: list[tuple[str, list[str]]] = []
        self._stop_event = threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            seen = 0
            for job_id in self.job_ids:
                missing = harness.missing_objects(self.s3, self.bucket, f"results/jobs/{job_id}/")
                self.checks += 1
                if missing is not None:
                    seen += 1
                    if missing:
                        self.violations.append((job_id, missing))
            self.seen_manifests = seen

    def stop(self) -> None:
        self._stop_event.set()
        self.join(30)


def test_s3_outage_mid_run_jobs_retry_and_succeed_without_partial_manifests(
    s3, bucket: str, redis_url: str, s3_endpoint: str, models: dict, logs: Path
) -> None:  # noqa: ANN001
    proxy = harness.TcpProxy(int(s3_endpoint.rsplit(":", 1)[1]))
    env = harness.worker_env(
        redis_url,
        f"s3://{bucket}/results",
        [f"s3://{bucket}/models/"],
        AWS_ENDPOINT_URL_S3=proxy.endpoint,
        ACTVIZ_MAX_RETRIES="12",
        ACTVIZ_MODEL_CACHE_DIR=str(logs / "models"),
    )
    worker = harness.start_worker(env, logs / "worker.log")
    # The producer talks to the S3 server directly: only the worker's path fails.
    client = Client(settings=Settings.from_env(environ={**env, "AWS_ENDPOINT_URL_S3": s3_endpoint}))
    try:

        def submit(i: int):  # noqa: ANN202
            image = harness.random_png(10 + i, 64, 64)
            return client.submit(models["heavy"], image, layers="conv_0,conv_1", channel_pngs=True)

        jobs = [submit(i) for i in range(4)]
        poller = ManifestPoller(s3, bucket, [job.id for job in jobs])
        poller.start()
        harness.wait_for(
            lambda: jobs[0].state(check_storage=False).state != "queued", 90, "first job started"
        )
        proxy.down()
        # Jobs that arrive during the outage cannot even fetch their model: they must retry.
        jobs += [submit(i) for i in range(4, 8)]
        poller.job_ids = [job.id for job in jobs]
        time.sleep(OUTAGE_S)
        proxy.up()
        for job in jobs:
            job.wait(timeout=180)
        poller.stop()
    finally:
        proxy.down()
        worker.stop()
    log = worker.log_text()
    retries = log.count("] retry: Retry in")
    assert retries >= 1, "no job met the outage"
    assert [job.status() for job in jobs] == ["succeeded"] * len(jobs)
    for job in jobs:
        assert harness.missing_objects(s3, bucket, f"results/jobs/{job.id}/") == []
    assert poller.violations == []
    assert poller.checks > len(jobs)
    harness.record("Faults", "S3 outage: length (s)", OUTAGE_S)
    harness.record("Faults", "S3 outage: jobs / succeeded", f"{len(jobs)} / {len(jobs)}")
    harness.record("Faults", "S3 outage: task retries", retries)
    harness.record("Faults", "S3 outage: manifest checks, partial seen", f"{poller.checks}, 0")


def test_redis_restart_worker_reconnects_and_queued_jobs_complete(
    s3, bucket: str, models: dict, logs: Path
) -> None:  # noqa: ANN001
    server = harness.RedisServer(logs)
    server.start()
    env = harness.worker_env(
        server.url,
        f"s3://{bucket}/results",
        [f"s3://{bucket}/models/"],
        ACTVIZ_MODEL_CACHE_DIR=str(logs / "models"),
    )
    client = Client(settings=Settings.from_env(environ=env))
    worker = harness.start_worker(env, logs / "worker.log")
    try:
        # 1. Redis restarts under an idle worker.
        server.stop()
        time.sleep(2)
        server.start()
        first = client.submit(models["tiny"], harness.random_png(20, 16, 16))
        assert first.wait(timeout=90).layers == ["conv_a", "conv_b"]
        assert "Connected to redis" in worker.log_text()
        reconnects = worker.log_text().count("Connected to redis") - 1

        # 2. Redis restarts while jobs wait in the queue (nobody consuming).
        worker.stop()
        queued = [
            client.submit(models["tiny"], harness.random_png(21 + i, 16, 16)) for i in range(5)
        ]
        with server.client() as conn:
            assert conn.llen("gpu") == 5
        server.stop()
        server.start()
        with server.client() as conn:
            assert conn.llen("gpu") == 5  # the AOF kept them
        worker = harness.start_worker(env, logs / "worker-2.log")
        for job in queued:
            job.wait(timeout=90)
        states = [job.status() for job in queued]
    finally:
        worker.stop()
        server.stop()
    assert states == ["succeeded"] * 5
    assert reconnects >= 1
    harness.record("Faults", "Redis restart under idle worker: reconnected", "yes")
    harness.record("Faults", "Redis restart with 5 queued jobs: succeeded", "5 / 5")
