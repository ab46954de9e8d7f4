"""Cancel reaches queued jobs with no worker up, stops nothing that has ended, and a batch at
once; a running job shows its stages once it has run ACTVIZ_PROGRESS_AFTER_MS."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from stack import ACTVIZ, start_worker, subprocess_env, wait_for

from producer import Client, Settings
from producer.errors import JobFailed

REDIS_DB = 9
pytestmark = pytest.mark.timeout(240)


def test_jobs_cancelled_while_no_worker_is_up_end_cancelled_and_the_rest_run(
    redis_url: str, saved_models: dict[str, Path], png_bytes: bytes, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    env = subprocess_env(
        ACTVIZ_BROKER_URL=redis_url,
        ACTVIZ_STORAGE_URL=store.as_uri(),
        ACTVIZ_MODEL_ALLOW=f"{saved_models['seq'].parent.as_uri()}/",
        ACTVIZ_MODEL_CACHE_DIR=str(tmp_path / "cache"),
    )
    client = Client(settings=Settings.from_env(environ=env))
    model = saved_models["seq"].as_uri()
    images = [png_bytes[:-1] + bytes([i]) for i in range(3)]
    one = client.submit_many(model, images, layers="conv2d_1")
    two = client.submit_many(model, images[:2], layers="conv2d_1")

    def actviz(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(ACTVIZ), *args], env=env, capture_output=True, timeout=60)

    # Submitted and waiting is "queued"; an id nobody submitted is "unknown".
    assert one[1].status() == "queued"
    assert client.job("never-submitted").status() == "unknown"
    unknown = actviz("cancel", "never-submitted", "--json")
    assert json.loads(unknown.stdout) == {"job_id": "never-submitted", "cancel": "unknown job id"}
    # No worker is up: the marks wait in Redis.
    done = actviz("cancel", one[0].id, "--json")
    assert done.returncode == 0, done.stderr.decode()
    assert json.loads(done.stdout) == {"job_id": one[0].id, "cancel": "cancelled"}
    batch = actviz("cancel", "--batch", two[0].batch_id, "--json")
    assert sorted(json.loads(line)["job_id"] for line in batch.stdout.splitlines()) == sorted(
        job.id for job in two
    )
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        for job in (one[0], *two):
            with pytest.raises(JobFailed) as failed:
                job.wait(timeout=90)
            assert failed.value.code == "cancelled"
            error = json.loads((store / "jobs" / job.id / "error.json").read_text())
            assert error["code"] == "cancelled"
            assert not (store / "jobs" / job.id / "manifest.json").exists()  # it never ran
        for job in one[1:]:
            assert job.wait(timeout=90).manifest["job_id"] == job.id
        # Cancelling a job that has ended changes nothing, and says so.
        again = actviz("cancel", one[1].id, "--json")
        assert json.loads(again.stdout) == {"job_id": one[1].id, "cancel": "already succeeded"}
        assert one[1].wait(timeout=10).manifest["job_id"] == one[1].id
        # A batch of cancelled jobs still completes its bookkeeping: its gallery is written.
        gallery = store / "batches" / two[0].batch_id / "index.html"
        wait_for(gallery.is_file, 30, "the batch gallery")  # written after the last job
        progress = client.batch_progress(two[0].batch_id)
        assert (progress.succeeded, progress.failed) == (0, 2)
    finally:
        worker.stop()


def test_a_running_job_stops_at_its_next_stage_once_cancelled(redis_url: str) -> None:
    import redis as redis_lib
    from celery import Celery

    from producer.contract import cancel_key
    from producer.errors import Cancelled
    from worker.jobs.steps import report_stage

    app = Celery("cancel-test", broker=redis_url, backend=redis_url)

    @app.task(bind=True, name="cancel-test.job")
    def job(self) -> None:  # noqa: ANN001
        return None

    job.push_request(id="running-job")  # no start recorded: every stage is shown
    try:
        report_stage(job, "forward")  # not cancelled: reported
        redis_lib.Redis.from_url(redis_url).set(cancel_key("running-job"), b"1")
        with pytest.raises(Cancelled, match="before its rendering stage"):
            report_stage(job, "rendering")
    finally:
        job.pop_request()


def test_a_workers_stage_write_and_cancel_check_are_one_round_trip(redis_url: str) -> None:
    """With the worker's result backend, a stage due to be shown is written by the script
    that checks the cancel mark: one command sent, and no stage written once the job is
    cancelled."""
    import redis as redis_lib
    from celery import Celery

    from producer.contract import cancel_key
    from producer.errors import Cancelled
    from worker.jobs.steps import job_progress, report_stage
    from worker.result_backend import worker_backend_url

    app = Celery("cancel-guard-test", broker=redis_url, backend=worker_backend_url(redis_url))

    @app.task(bind=True, name="cancel-guard-test.job")
    def job(self) -> None:  # noqa: ANN001
        return None

    # The commands the job's side sends: the backend's client carries its writes and
    # its cancel checks (worker/jobs/deliveries.py redis_client).
    sent: list[str] = []
    backend_client = app.backend.client
    execute = backend_client.execute_command

    def recorded(*args: object, **options: object) -> object:
        sent.append(str(args[0]).upper())
        return execute(*args, **options)

    backend_client.execute_command = recorded
    client = redis_lib.Redis.from_url(redis_url)
    job.push_request(id="guarded-job")
    try:
        with job_progress(job, 0):
            report_stage(job, "loading_model")  # the backend loads its script
            sent.clear()
            report_stage(job, "forward")
            assert sent == ["EVALSHA"]
            assert app.AsyncResult("guarded-job").info == {"stage": "forward"}
            client.set(cancel_key("guarded-job"), b"1")
            sent.clear()
            with pytest.raises(Cancelled, match="before its rendering stage"):
                report_stage(job, "rendering")
            assert sent == ["EVALSHA"]
            assert app.AsyncResult("guarded-job").info == {"stage": "forward"}
    finally:
        job.pop_request()
        client.delete(cancel_key("guarded-job"))


def test_stages_show_at_most_once_per_progress_interval_and_never_after_the_end(
    redis_url: str,
) -> None:
    """ACTVIZ_PROGRESS_AFTER_MS: the first stage is written once the job has run that
    long, if it is still the job's stage (a long forward pass after a warm model's load),
    and later ones at most once per that interval, each replaced by a stage reached
    before its time; nothing is written after the job's end."""
    from celery import Celery

    from worker.jobs.limits import process_timer
    from worker.jobs.steps import job_progress, report_stage

    app = Celery("progress-test", broker=redis_url, backend=redis_url)

    @app.task(bind=True, name="progress-test.job")
    def job(self) -> None:  # noqa: ANN001
        return None

    def stage_of(job_id: str) -> str | None:
        meta = app.AsyncResult(job_id)
        return meta.info.get("stage") if meta.state == "STARTED" else None

    # The timer thread sleeps towards a far entry (a job's hard limit) meanwhile: the
    # deferred stage is still written on time, not when that sleep ends.
    far = process_timer().call_after(60, lambda: None)
    time.sleep(0.2)
    job.push_request(id="slow-job")
    try:
        with job_progress(job, 300) as reports:
            report_stage(job, "loading_model")  # early: deferred
            report_stage(job, "forward")  # early too: it replaces loading_model
            assert stage_of("slow-job") is None  # nothing written yet
            wait_for(lambda: stage_of("slow-job") == "forward", 1.5, "the deferred stage")
            assert time.monotonic() - reports.started >= 0.3
            report_stage(job, "rendering")  # within 300 ms of that write: deferred
            report_stage(job, "uploading")  # it replaces rendering
            assert stage_of("slow-job") == "forward"
            wait_for(lambda: stage_of("slow-job") == "uploading", 1.5, "the next stage")
            assert reports.written == 2  # forward, uploading: never the stages replaced
            time.sleep(0.35)
            report_stage(job, "rendering")  # its time has come: written at once
            assert stage_of("slow-job") == "rendering" and reports.written == 3
    finally:
        job.pop_request()
        far.cancel()

    job.push_request(id="fast-job")
    try:
        with job_progress(job, 300):
            report_stage(job, "forward")
        app.backend.mark_as_failure("fast-job", RuntimeError("its end"))  # the job's end
        time.sleep(0.5)  # past the stage's time: its write was cancelled with the job
        assert app.AsyncResult("fast-job").state == "FAILURE"
    finally:
        job.pop_request()
