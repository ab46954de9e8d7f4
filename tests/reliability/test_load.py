"""Duplicates, load with a worker killed mid-run, and memory over a long run.

Tiny model (two 4-channel convs on 16x16) and tiny images, so 300 jobs fit
the suite's time budget on two cores.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

import harness
import pytest
import redis

from producer import Client, Settings
from producer.contract import TASK_NAME, JobSpec, job_key

REDELIVER_AFTER = 10
RECONCILE_AFTER = 10
LOAD_JOBS = 300
PRODUCERS = 4
pytestmark = pytest.mark.timeout(420)


@pytest.fixture(scope="module")
def env(redis_url: str, bucket: str, tmp_path_factory) -> dict:  # noqa: ANN001
    return harness.worker_env(
        redis_url,
        f"s3://{bucket}/results",
        [f"s3://{bucket}/models/"],
        ACTVIZ_MODEL_CACHE_DIR=str(tmp_path_factory.mktemp("model-cache")),
        ACTVIZ_REDELIVER_AFTER=str(REDELIVER_AFTER),
        ACTVIZ_RECONCILE_AFTER=str(RECONCILE_AFTER),
    )


@pytest.fixture(scope="module")
def client(env: dict) -> Client:
    return Client(settings=Settings.from_env(environ=env))


def objects_of(s3, bucket: str, job_id: str) -> dict[str, bytes]:  # noqa: ANN001
    prefix = f"results/jobs/{job_id}/"
    return {
        key[len(prefix) :]: s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        for key in harness.keys_of(s3, bucket, prefix)
    }


def comparable(manifest: dict) -> dict:
    """A manifest without what differs between two runs: ids, timings, worker, batch."""
    out = {
        k: v
        for k, v in manifest.items()
        if k not in ("job_id", "timings_ms", "cpu_ms", "worker", "batch")
    }
    return json.loads(json.dumps(out))


def test_duplicate_delivery_of_one_job_id_gives_one_state_and_identical_objects(
    env: dict, client: Client, models: dict, s3, bucket: str, tmp_path: Path
) -> None:
    image = client.upload_image(harness.random_png(30, 16, 16))
    spec = JobSpec(job_id="dup-job-1", model=models["tiny"], image=image)
    twin = JobSpec(job_id="dup-job-twin", model=models["tiny"], image=image)
    for message_spec in (spec, spec, twin):  # the same message twice, then the same work
        client.app.send_task(
            TASK_NAME, args=[message_spec.to_message()], task_id=message_spec.job_id
        )
    worker = harness.start_worker(env, tmp_path / "worker.log")
    try:
        client.job(spec.job_id).wait(timeout=60)
        client.job(twin.job_id).wait(timeout=60)
        harness.wait_for(
            lambda: worker.log_text().count(f"actviz.extract[{spec.job_id}] succeeded") == 2,
            30,
            "both deliveries handled",
        )
        before = s3.head_object(Bucket=bucket, Key=f"results/jobs/{spec.job_id}/manifest.json")
        # A third delivery after completion: nothing runs, nothing is rewritten.
        client.app.send_task(TASK_NAME, args=[spec.to_message()], task_id=spec.job_id)
        harness.wait_for(
            lambda: worker.log_text().count(f"actviz.extract[{spec.job_id}] succeeded") == 3,
            30,
            "third delivery handled",
        )
        log = worker.log_text()
    finally:
        worker.stop()
    after = s3.head_object(Bucket=bucket, Key=f"results/jobs/{spec.job_id}/manifest.json")
    assert after["LastModified"] == before["LastModified"] and after["ETag"] == before["ETag"]
    assert f"[{spec.job_id}] job already complete; returning the stored manifest" in log
    assert client.job(spec.job_id).status() == "succeeded"
    assert harness.missing_objects(s3, bucket, f"results/jobs/{spec.job_id}/") == []

    ours, theirs = objects_of(s3, bucket, spec.job_id), objects_of(s3, bucket, twin.job_id)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        if name == "manifest.json":
            assert comparable(json.loads(ours[name])) == comparable(json.loads(theirs[name]))
        elif name.endswith(".png"):
            assert ours[name] == theirs[name], name
    harness.record("Duplicates", "same job id delivered", "3 times -> 1 manifest, succeeded")
    harness.record("Duplicates", "PNG objects byte-identical to an independent run", "yes")


PRODUCER = """
import json, sys, numpy as np, io
from PIL import Image
from producer import Client
start, count = int(sys.argv[1]), int(sys.argv[2])
client = Client.from_env()
ids = []
for i in range(start, start + count):
    pixels = (np.random.default_rng(i).random((16, 16, 3)) * 255).astype("uint8")
    buf = io.BytesIO(); Image.fromarray(pixels).save(buf, format="PNG")
    job = client.submit(sys.argv[3], buf.getvalue())
    ids.append([job.id, client.upload_image(buf.getvalue())])
print(json.dumps(ids))
"""


def completed(log: str) -> int:
    return log.count("] succeeded in ")


def test_300_jobs_from_4_producers_survive_a_worker_killed_mid_run(
    env: dict, client: Client, models: dict, s3, bucket: str, tmp_path: Path
) -> None:
    workers = [
        harness.start_worker(env, tmp_path / f"w{i}.log", "--name", f"load{i}@%h") for i in (0, 1)
    ]
    started = time.monotonic()
    per = LOAD_JOBS // PRODUCERS
    producers = [
        subprocess.Popen(
            [sys.executable, "-c", PRODUCER, str(1000 + i * per), str(per), models["tiny"]],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for i in range(PRODUCERS)
    ]
    try:
        harness.wait_for(
            lambda: completed(workers[0].log_text()) >= 40, 120, "40 jobs done on worker 0"
        )
        workers[0].kill()
        killed_after = completed(workers[0].log_text())
        workers[0] = harness.start_worker(env, tmp_path / "w0-restarted.log", "--name", "load0b@%h")
        submitted = []
        for proc in producers:
            out, err = proc.communicate(timeout=180)
            assert proc.returncode == 0, err.decode()[-2000:]
            submitted += json.loads(out)
        ids = [job_id for job_id, _ in submitted]
        # Nothing is sent again by the test: a job the killed worker had popped but not
        # recorded (kombu's BRPOP window) is brought back by the registry's reconciler.
        deadline = time.monotonic() + 300
        for job_id in ids:
            with contextlib.suppress(TimeoutError):
                client.job(job_id).wait(timeout=max(1, deadline - time.monotonic()))
        elapsed = time.monotonic() - started
        states = [client.job(job_id).status() for job_id in ids]
        with contextlib.closing(redis.Redis.from_url(client.settings.broker_url)) as conn:
            resent = [i for i in ids if conn.hget(job_key(i), "resent")]
    finally:
        for worker in workers:
            worker.stop()
        for proc in producers:
            proc.kill()
    assert len(set(ids)) == LOAD_JOBS
    lost = [job_id for job_id, state in zip(ids, states, strict=True) if state != "succeeded"]
    assert lost == []  # none lost, none left unfinished
    assert states == ["succeeded"] * LOAD_JOBS
    wanted = {f"results/jobs/{i}/manifest.json" for i in ids}
    manifests = [k for k in harness.keys_of(s3, bucket, "results/jobs/") if k in wanted]
    assert len(manifests) == len(wanted) == LOAD_JOBS
    redelivered = sum(
        log.count("delivery 2 of this job")
        for log in map(Path.read_text, [tmp_path / "w0-restarted.log", tmp_path / "w1.log"])
    )
    harness.record("Load", "jobs / producers / workers", f"{LOAD_JOBS} / {PRODUCERS} / 2")
    harness.record("Load", "worker killed (SIGKILL) after its jobs", killed_after)
    harness.record("Load", "jobs redelivered after the kill", redelivered)
    harness.record(
        "Load", "lost in transport at the kill, sent again by the reconciler", len(resent)
    )
    harness.record("Load", "lost", len(lost))
    harness.record("Load", "succeeded, with one manifest each", f"{states.count('succeeded')}")
    harness.record("Load", "wall time (s)", round(elapsed, 1))
    harness.record("Load", "jobs/s (including the kill and restart)", round(LOAD_JOBS / elapsed, 1))


def test_worker_memory_stays_flat_over_300_jobs_on_one_warm_model(
    env: dict, client: Client, models: dict, tmp_path: Path
) -> None:
    worker = harness.start_worker(env, tmp_path / "soak.log")
    try:
        jobs = [
            client.submit(models["tiny"], harness.random_png(5000 + i, 16, 16)) for i in range(300)
        ]
        harness.wait_for(lambda: completed(worker.log_text()) >= 20, 120, "20 jobs done")
        rss_20, family_20 = worker.rss_kib(), worker.family_rss_kib()
        for job in jobs:
            job.wait(timeout=240)
        harness.wait_for(lambda: completed(worker.log_text()) >= 300, 30, "300 jobs logged")
        rss_300, family_300 = worker.rss_kib(), worker.family_rss_kib()
    finally:
        worker.stop()
    growth = (rss_300 - rss_20) / rss_20
    harness.record("Soak", "RSS after 20 jobs (MiB)", round(rss_20 / 1024, 1))
    harness.record("Soak", "RSS after 300 jobs (MiB)", round(rss_300 / 1024, 1))
    harness.record("Soak", "growth", f"{growth:+.1%}")
    harness.record(
        "Soak",
        "with report helper processes: after 20 / after 300 (MiB)",
        f"{family_20 / 1024:.1f} / {family_300 / 1024:.1f}",
    )
    assert growth < 0.10
