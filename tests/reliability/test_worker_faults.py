"""A worker dies or is stopped in the middle of a job; the job still ends exactly once.

Redelivery on Redis happens when an unacknowledged message is older than the
visibility timeout; these tests shorten it with ACTVIZ_REDELIVER_AFTER so it
takes seconds. "In the middle of a job" means the job reported the forward,
rendering or uploading stage: the job is heavy (a wide fully-convolutional
model, one PNG per channel), so it stays there for seconds.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import harness
import pytest

from producer import Client, ErrorCode, JobFailed, Settings

REDELIVER_AFTER = 8
pytestmark = pytest.mark.timeout(240)

MID_JOB = ("forward", "rendering", "uploading")
HEAVY = {"layers": None, "channel_pngs": True}


@pytest.fixture(scope="module")
def env(redis_url: str, bucket: str, s3_endpoint: str, tmp_path_factory) -> dict:  # noqa: ANN001
    cache = tmp_path_factory.mktemp("model-cache")
    return harness.worker_env(
        redis_url,
        f"s3://{bucket}/results",
        [f"s3://{bucket}/models/"],
        ACTVIZ_MODEL_CACHE_DIR=str(cache),
        ACTVIZ_REDELIVER_AFTER=str(REDELIVER_AFTER),
        ACTVIZ_MAX_DELIVERIES="2",
    )


@pytest.fixture
def client(env: dict) -> Client:
    return Client(settings=Settings.from_env(environ=env))


@pytest.fixture
def logs(tmp_path: Path) -> Path:
    return tmp_path


def wait_for_stage(client: Client, job_id: str, stages: tuple[str, ...], timeout: float) -> str:
    def stage() -> str | None:
        state = client.job(job_id).state(check_storage=False)
        return state.stage if state.stage in stages else None

    return harness.wait_for(stage, timeout, f"job {job_id} in {stages}", interval=0.05)


def assert_one_complete_manifest(s3, bucket: str, job_id: str) -> dict:  # noqa: ANN001
    prefix = f"results/jobs/{job_id}/"
    keys = harness.keys_of(s3, bucket, prefix)
    assert keys.count(prefix + "manifest.json") == 1
    assert prefix + "error.json" not in keys
    assert harness.missing_objects(s3, bucket, prefix) == []
    return json.loads(s3.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())


def test_sigkilled_worker_job_is_redelivered_and_completes_on_another_worker(
    env: dict, client: Client, models: dict, s3, bucket: str, logs: Path
) -> None:
    first = harness.start_worker(env, logs / "first.log", "--name", "first@%h")
    try:
        job = client.submit(models["heavy"], harness.random_png(1, 256, 256), **HEAVY)
        stage = wait_for_stage(client, job.id, MID_JOB, timeout=90)
        first.kill()
        killed_at = time.monotonic()
        assert client.job(job.id).status() == "started"  # nobody finished it
        assert not harness.keys_of(s3, bucket, f"results/jobs/{job.id}/manifest.json")
    finally:
        first.kill()

    second = harness.start_worker(env, logs / "second.log", "--name", "second@%h")
    try:
        job.wait(timeout=120)
        recovered_s = time.monotonic() - killed_at
    finally:
        second.stop()
    assert client.job(job.id).status() == "succeeded"
    manifest = assert_one_complete_manifest(s3, bucket, job.id)
    assert manifest["job_id"] == job.id and len(manifest["layers"]) == 6
    assert "delivery 2 of this job" in second.log_text()
    harness.record("Faults", "SIGKILL mid-job: stage at kill", stage)
    harness.record("Faults", "SIGKILL mid-job: killed -> succeeded (s)", round(recovered_s, 1))


def test_sigterm_mid_job_finishes_the_job_or_requeues_it(
    env: dict, client: Client, models: dict, s3, bucket: str, logs: Path
) -> None:
    """Warm shutdown (SIGTERM) finishes the job; a cold one (SIGQUIT after it) re-queues it."""
    outcomes = {}
    for name, signals in (("warm", [signal.SIGTERM]), ("cold", [signal.SIGTERM, signal.SIGQUIT])):
        worker = harness.start_worker(env, logs / f"{name}.log")
        job = client.submit(models["heavy"], harness.random_png(2, 256, 256), **HEAVY)
        try:
            wait_for_stage(client, job.id, MID_JOB, timeout=90)
            for sig in signals:
                worker.proc.send_signal(sig)
                time.sleep(0.3)
            code = worker.proc.wait(60)
        finally:
            worker.kill()
        state = client.job(job.id).status()
        if state != "succeeded":
            # Not finished: the message must be back on the queue for the next worker.
            assert state in ("queued", "started")
            rescuer = harness.start_worker(env, logs / f"{name}-rescuer.log")
            try:
                job.wait(timeout=120)
            finally:
                rescuer.stop()
            # Put back on the queue at shutdown, not left for the visibility timeout.
            assert "Restoring 1 unacknowledged message(s)" in worker.log_text()
        assert client.job(job.id).status() == "succeeded"
        assert_one_complete_manifest(s3, bucket, job.id)
        outcomes[name] = ("finished" if state == "succeeded" else "re-queued", code)
    assert outcomes["warm"] == ("finished", 0)
    harness.record(
        "Faults", "SIGTERM mid-job", f"{outcomes['warm'][0]}, exit {outcomes['warm'][1]}"
    )
    harness.record(
        "Faults", "SIGTERM+SIGQUIT mid-job", f"{outcomes['cold'][0]}, exit {outcomes['cold'][1]}"
    )


def limit_cpu(worker: harness.Worker, seconds: int) -> None:
    """Let the kernel end the worker (SIGXCPU) after `seconds` more seconds of CPU."""
    fields = Path(f"/proc/{worker.pid}/stat").read_text().rsplit(")", 1)[1].split()
    used = (int(fields[11]) + int(fields[12])) // 100  # utime + stime, in clock ticks
    soft = used + seconds
    subprocess.run(
        ["prlimit", f"--pid={worker.pid}", f"--cpu={soft}:{soft + 5}"], check=True, timeout=10
    )


def test_job_that_kills_every_worker_fails_as_worker_lost_and_the_queue_moves_on(
    env: dict, client: Client, models: dict, s3, bucket: str, logs: Path
) -> None:
    """A job that needs more CPU than the kernel allows a worker: every delivery ends it.

    ACTVIZ_MAX_DELIVERIES=2 here, so the third delivery fails the job.
    """
    poison = client.submit(
        models["heavy"], harness.random_png(3, 1024, 1024), layers=None, channel_pngs=True
    )
    good = client.submit(models["tiny"], harness.random_png(4, 16, 16))
    deaths = []
    for attempt in range(4):
        worker = harness.start_worker(env, logs / f"poisoned-{attempt}.log")
        limit_cpu(worker, 4)
        try:

            def settled(worker: harness.Worker = worker) -> bool:
                return not worker.alive() or poison.status() == "failed"

            harness.wait_for(settled, 150, "the worker dies or the poison job fails", 0.2)
        finally:
            alive = worker.alive()
            if alive:
                after = client.submit(models["tiny"], harness.random_png(5, 16, 16))
                after_result = after.wait(timeout=60)
            worker.kill()
        if alive:
            break
        deaths.append(worker.proc.returncode)
    assert deaths == [-signal.SIGXCPU, -signal.SIGXCPU]  # the kernel ended it, twice
    with pytest.raises(JobFailed) as failed:
        poison.wait(timeout=5)
    assert failed.value.code == ErrorCode.WORKER_LOST
    error = json.loads(
        s3.get_object(Bucket=bucket, Key=f"results/jobs/{poison.id}/error.json")["Body"].read()
    )
    assert error["code"] == ErrorCode.WORKER_LOST
    assert not harness.keys_of(s3, bucket, f"results/jobs/{poison.id}/manifest.json")
    assert good.wait(timeout=5).layers == ["conv_a", "conv_b"]
    assert after_result.layers == ["conv_a", "conv_b"]
    harness.record("Faults", "poison job: worker deaths before worker_lost", len(deaths))
