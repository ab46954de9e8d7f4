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

REDIS_DB = 13


@pytest.fixture
def task(redis_url: str) -> SimpleNamespace:
    """What admit_delivery reads of a Celery task: its Redis backend and its retry number."""
    app = Celery("deliveries-test", backend=redis_url, set_as_current=False)
    return SimpleNamespace(backend=app.backend, request=SimpleNamespace(retries=0))


def test_a_finished_job_is_not_run_again_and_a_poison_job_stops(
    task: SimpleNamespace, tmp_path: Path
) -> None:
    store = FileStore(tmp_path)
    settings = Settings(broker_url="redis://unused", max_deliveries=2)
    done = JobSpec(job_id="finished-job", model="builtin:demo", image="s3://b/i.png")
    assert admit_delivery(task, done, store, settings) is None  # first delivery: run it
    store.put(contract.manifest_key(done.job_id), json.dumps({"job_id": done.job_id}).encode())
    again = admit_delivery(task, done, store, settings)
    assert again is not None and again["duplicate"] and again["status"] == "succeeded"

    poison = JobSpec(job_id="poison-job", model="builtin:demo", image="s3://b/i.png")
    assert admit_delivery(task, poison, store, settings) is None
    assert admit_delivery(task, poison, store, settings) is None  # delivery 2: within the limit
    with pytest.raises(WorkerLost, match="delivered 3 times"):
        admit_delivery(task, poison, store, settings)
    task.request.retries = 1  # a retry of a transient fault is a new attempt, counted anew
    assert admit_delivery(task, poison, store, settings) is None
