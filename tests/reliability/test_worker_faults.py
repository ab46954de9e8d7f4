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
import sys
import time
from pathlib import Path

import harness
import numpy as np
import pytest

from producer import Client, ErrorCode, JobFailed, Settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models as test_models  # noqa: E402

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
    """Warm shutdown (SIGTERM) finishes the job; a cold one (SIGQUIT after it) re-queues it.

    The cold case signals while the job is still in its forward pass or rendering,
    seconds before its end, so it must take the re-queue branch, and is asserted to.
    """
    outcomes = {}
    for name, signals in (("warm", [signal.SIGTERM]), ("cold", [signal.SIGTERM, signal.SIGQUIT])):
        worker = harness.start_worker(env, logs / f"{name}.log")
        job = client.submit(models["heavy"], harness.random_png(2, 256, 256), **HEAVY)
        stages = MID_JOB if name == "warm" else ("forward", "rendering")
        try:
            wait_for_stage(client, job.id, stages, timeout=90)
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
    assert outcomes["cold"][0] == "re-queued"
    harness.record(
        "Faults", "SIGTERM mid-job", f"{outcomes['warm'][0]}, exit {outcomes['warm'][1]}"
    )
    harness.record(
        "Faults", "SIGTERM+SIGQUIT mid-job", f"{outcomes['cold'][0]}, exit {outcomes['cold'][1]}"
    )


@pytest.fixture(scope="module")
def tripwire(s3, bucket: str, tmp_path_factory) -> str:  # noqa: ANN001
    """A trusted model whose forward pass kills its process when a batch holds a white image."""
    path = test_models.code_lambda_model(
        tmp_path_factory.mktemp("tripwire") / "tripwire.keras", test_models.TRIPWIRE
    )
    s3.upload_file(str(path), bucket, f"trusted/{path.name}")
    return f"s3://{bucket}/trusted/{path.name}"


def test_job_that_kills_its_worker_fails_alone_and_its_pass_mates_succeed(
    env: dict, client: Client, tripwire: str, bucket: str, s3, logs: Path
) -> None:
    """A crash in one image's forward pass kills every job of that pass with the worker.

    On their next delivery each runs in the quarantine process, one at a time:
    the poison job ends that process and fails `worker_lost` at once; the job
    that only shared its pass succeeds; the worker itself stays up.
    """
    env = {
        **env,
        "ACTVIZ_MODEL_ALLOW": f"{env['ACTVIZ_MODEL_ALLOW']},s3://{bucket}/trusted/",
        "ACTVIZ_MODEL_TRUSTED": f"s3://{bucket}/trusted/",
        # Both images wait for each other: they share one forward pass.
        "ACTVIZ_BATCH_WAIT_MS": "3000",
        # Both redelivered jobs run in the quarantine process one after the other, each
        # in a cold one (the poison ends the first): about 12 s on a loaded 2-core
        # machine, longer than REDELIVER_AFTER. The worker's heartbeat keeps the mate
        # it holds from being handed out again meanwhile (worker/transport.py).
    }
    white = harness.png(np.full((16, 16, 3), 255, dtype=np.uint8))
    dark = harness.png(np.full((16, 16, 3), 90, dtype=np.uint8))
    poison = client.submit(tripwire, white)
    mate = client.submit(tripwire, dark)
    first = harness.start_worker(env, logs / "tripped.log")
    try:
        harness.wait_for(lambda: not first.alive(), 90, "the tripwire kills the worker", 0.2)
    finally:
        first.kill()
    assert first.proc.returncode == -signal.SIGKILL
    assert mate.status() != "succeeded"  # it died with the pass it shared

    second = harness.start_worker(env, logs / "after.log")
    try:
        assert mate.wait(timeout=150).layers == ["code", "conv"]
        with pytest.raises(JobFailed) as failed:
            poison.wait(timeout=60)
        alive = second.alive()
        log = second.log_text()
    finally:
        second.stop()
    assert failed.value.code == ErrorCode.WORKER_LOST
    assert "alone" in failed.value.message and "SIGKILL" in failed.value.message
    assert alive, log[-3000:]
    assert "quarantine" in log
    error = json.loads(
        s3.get_object(Bucket=bucket, Key=f"results/jobs/{poison.id}/error.json")["Body"].read()
    )
    assert error["code"] == ErrorCode.WORKER_LOST
    harness.record("Faults", "poison job: worker deaths before worker_lost", 1)
    harness.record("Faults", "job that shared the poison pass", "succeeded on redelivery")


def test_a_live_workers_long_jobs_are_not_handed_out_again(
    env: dict, client: Client, models: dict[str, str], redis_url: str, logs: Path
) -> None:
    """Jobs held longer than the visibility timeout by a live worker run once.

    With a 3 s timeout, heavy jobs (several seconds each) and a batch of them
    waiting behind each other, every held message outlives the timeout many
    times: only the worker's heartbeat (worker/transport.py) keeps Redis from
    handing them to the second worker that is up and polling meanwhile.
    ACTVIZ_REDELIVER_AFTER=5 makes that timeout (5 less a 5/6 s beat and a 1 s sweep,
    whole seconds): more than three beats of margin.
    """
    import redis as redis_py

    from worker.jobs.deliveries import delivery_key

    env = {**env, "ACTVIZ_REDELIVER_AFTER": "5"}
    jobs = [
        client.submit(models["heavy"], harness.random_png(20 + i, 256, 256), **HEAVY)
        for i in range(4)
    ]
    holder = harness.start_worker(env, logs / "holder.log")
    try:
        wait_for_stage(client, jobs[0].id, ("forward", "rendering", "uploading"), 90)
        other = harness.start_worker(env, logs / "other.log")
        try:
            for job in jobs:
                job.wait(timeout=180)
            seconds = sum(job.wait(timeout=5).manifest["timings_ms"]["render"] for job in jobs)
        finally:
            other.stop()
    finally:
        holder.stop()
    counts = redis_py.Redis.from_url(redis_url)
    deliveries = [int(counts.get(delivery_key(job.id, 0)) or 0) for job in jobs]
    assert deliveries == [1, 1, 1, 1], deliveries
    assert "an earlier one was lost" not in holder.log_text() + other.log_text()
    harness.record("Faults", "jobs held past a 3 s visibility timeout, delivered twice", 0)
    assert seconds > 0
