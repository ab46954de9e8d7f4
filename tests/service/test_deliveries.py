"""Delivery counting against a real Redis: a finished job does not run again, a poison job stops."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from celery import Celery

from producer import contract
from producer.contract import JobSpec
from producer.errors import WorkerLost
from producer.settings import Settings
from producer.storage import FileStore
from worker.jobs.deliveries import admit_delivery
from worker.runtime import running
from worker.runtime.running import running_key
from worker.transport import CONSUMERS_KEY, consumer_key, consumer_name

REDIS_DB = 13


@pytest.fixture
def task(redis_url: str) -> SimpleNamespace:
    """What admit_delivery reads of a Celery task: its Redis backend and its retry number."""
    app = Celery("deliveries-test", backend=redis_url, set_as_current=False)
    return SimpleNamespace(backend=app.backend, request=SimpleNamespace(retries=0))


def die_running(client, consumer: str, *job_ids: str) -> None:  # noqa: ANN001
    """A worker process that was running `job_ids` when it died: listed, running them,
    its liveness key gone."""
    client.sadd(CONSUMERS_KEY, consumer)
    client.sadd(running_key(consumer), *job_ids)


def test_a_finished_job_is_not_run_again_and_a_poison_job_stops(
    task: SimpleNamespace, tmp_path: Path
) -> None:
    store = FileStore(tmp_path)
    settings = Settings(broker_url="redis://unused", max_deliveries=2)
    client = task.backend.client
    done = JobSpec(job_id="finished-job", model="builtin:demo", image="s3://b/i.png")
    assert admit_delivery(task, done, store, settings) is None  # first delivery: run it
    store.put(contract.manifest_key(done.job_id), json.dumps({"job_id": done.job_id}).encode())
    again = admit_delivery(task, done, store, settings)
    assert again is not None and again["duplicate"] and again["status"] == "succeeded"

    poison = JobSpec(job_id="poison-job", model="builtin:demo", image="s3://b/i.png")
    held = JobSpec(job_id="held-job", model="builtin:demo", image="s3://b/i.png")
    for spec in (poison, held):
        assert admit_delivery(task, spec, store, settings) is None
    # Its worker dies running the poison job; the other job it only held (in its queue,
    # waiting for a pass) is charged nothing.
    die_running(client, "node-a:101", poison.job_id)
    for spec in (poison, held):
        assert admit_delivery(task, spec, store, settings) is None  # delivery 2: within the limit
    assert task.request.actviz_deaths == 0  # the held job's
    assert running.deaths(client, poison.job_id) == 1 and not client.exists(
        running_key("node-a:101")
    )
    die_running(client, "node-b:102", poison.job_id)
    with pytest.raises(WorkerLost, match="2 worker processes died while running the job"):
        admit_delivery(task, poison, store, settings)
    # A held job is not failed for its workers' deaths (deliveries 3 to 8 here), up to
    # the backstop: 4 x max_deliveries deliveries that no worker finished.
    for _ in range(6):
        assert admit_delivery(task, held, store, settings) is None
    with pytest.raises(WorkerLost, match="delivered 9 times and no worker finished it"):
        admit_delivery(task, held, store, settings)


def test_each_death_is_charged_once(task: SimpleNamespace) -> None:
    """Two workers that see the same dead consumer (the reconciler and an admission)
    charge its jobs once; a live consumer's jobs are never charged."""
    client = task.backend.client
    die_running(client, "node-c:7", "job-1", "job-2")
    client.sadd(CONSUMERS_KEY, "node-d:8")
    client.sadd(running_key("node-d:8"), "job-3")
    client.set(consumer_key("node-d:8"), "1", ex=60)
    assert running.charge_dead(client, 60) == ["job-1", "job-2"]
    assert running.charge_dead(client, 60) == []
    assert running.charge(client, ["node-c:7"], 60) == []
    assert [running.deaths(client, j) for j in ("job-1", "job-2", "job-3")] == [1, 1, 0]
    assert client.ttl(running.suspect_key("job-1")) > 0  # counters expire


def test_a_process_marks_the_jobs_it_runs_and_unmarks_them(
    task: SimpleNamespace, request: pytest.FixtureRequest
) -> None:
    client = task.backend.client
    running.bind(client, 120)
    request.addfinalizer(running.unbind)
    key = running_key(consumer_name())
    running.mark_running(["job-a", None, "job-b"])
    assert client.smembers(key) == {b"job-a", b"job-b"} and 0 < client.ttl(key) <= 120
    running.unmark("job-a")
    with running.running_now("job-b"):  # marked already: it stays so after the block
        pass
    with running.running_now("job-c"):  # a model load
        assert client.sismember(key, "job-c")
    assert client.smembers(key) == {b"job-b"}
    pipe = client.pipeline()
    running.leave(pipe, "job-b")
    pipe.execute()
    assert not client.exists(key)


def test_admission_marks_the_job_started_and_reads_its_cancel_mark_in_one_round_trip(
    task: SimpleNamespace, tmp_path: Path
) -> None:
    """A delivery's admission counts it, marks the registry entry started and reads the
    cancel mark in one transaction; the first cancel check after it uses what it read,
    and later checks ask Redis again."""
    from producer.errors import Cancelled
    from producer.job_registry import job_key
    from worker.jobs.steps import raise_if_cancelled

    client = task.backend.client
    store = FileStore(tmp_path)
    settings = Settings(broker_url="redis://unused")
    spec = JobSpec(job_id="admitted-job", model="builtin:demo", image="s3://b/i.png")
    task.request.id = spec.job_id
    client.hset(job_key(spec.job_id), mapping={"state": "queued"})
    before = client.info("commandstats")
    assert admit_delivery(task, spec, store, settings) is None
    after = client.info("commandstats")
    assert after["cmdstat_exec"]["calls"] - before.get("cmdstat_exec", {"calls": 0})["calls"] == 1
    assert client.hget(job_key(spec.job_id), "state") == b"started"
    assert task.request.actviz_cancelled is False
    client.set(contract.cancel_key(spec.job_id), "1")
    raise_if_cancelled(task, "before it ran")  # what admission read: not cancelled then
    with pytest.raises(Cancelled, match="before its render stage"):
        raise_if_cancelled(task, "before its render stage")  # asks Redis: cancelled now
    assert admit_delivery(task, spec, store, settings) is None  # the next delivery reads it
    with pytest.raises(Cancelled, match="before it ran"):
        raise_if_cancelled(task, "before it ran")


def test_a_running_job_is_started_from_its_admission_without_celerys_own_start_write(
    task: SimpleNamespace, redis_url: str, tmp_path: Path, png_bytes: bytes
) -> None:
    """With Redis, Celery records no STARTED state (one backend read and write, and a
    message to every watcher, a job): the admission's registry mark is what `Job.state()`
    reads as started. The embedded mode, which has no registry, keeps Celery's."""
    from producer import Client
    from producer.broker import celery_config

    settings = Settings(broker_url=redis_url, storage_url=tmp_path.as_uri())
    assert celery_config(settings)["task_track_started"] is False
    assert celery_config(Settings())["task_track_started"] is True  # embedded
    producer = Client(settings=settings)
    job = producer.submit("builtin:demo", png_bytes, queue="cpu")
    assert job.status() == "queued"
    task.request.id = job.id
    spec = JobSpec(job_id=job.id, model="builtin:demo", image="s3://b/i.png")
    assert admit_delivery(task, spec, FileStore(tmp_path), settings) is None
    assert job.state().state == "started"
    assert job.state(check_storage=False).state == "started"
    assert producer.app.AsyncResult(job.id).state == "PENDING"  # nothing written by Celery
    unknown = producer.job("nobody-submitted-this")
    assert unknown.status() == "unknown"
