"""What every job shares, whatever its kind: admission, limits, errors, the manifest last.

    extract(task, message, runtime)   # Celery's task body: parse, admit, run the kind, store

A job's kind (`JobSpec.kind`) names the module under worker/jobs/ that runs
it (`activations.py`, ...): its `run(task, spec, runtime)` returns an
`Output` (worker/jobs/steps.py), and this module uploads its files and then
its manifest, which is written last.

Failure representation: a permanent error (an `ActvizError`) is written to
`jobs/<id>/error.json` as {job_id, code, message} and then raised, so Celery
records the state FAILURE with the typed exception; the client reads the code
from error.json (the source of truth) or, failing that, from the exception.
Transient errors propagate to Celery's autoretry (see worker/app.py).
"""

from __future__ import annotations

import importlib
import json
import logging
import socket
import threading
import time
from typing import Any

from celery import Task
from celery.exceptions import SoftTimeLimitExceeded

from producer import contract
from producer.contract import JobKind, JobSpec, Progress
from producer.errors import (
    ActvizError,
    HelperUnavailable,
    Internal,
    InvalidJob,
    PayloadTooLarge,
    StorageError,
    TimeLimit,
    WorkerLost,
    transient_errors,
)
from producer.job_registry import mark_ended
from producer.storage import put_many
from worker.engine.manifest import manifest_bytes
from worker.jobs.batches import publish_batch, start_batch_job
from worker.jobs.deliveries import admit_delivery, counter_ttl, redis_client
from worker.jobs.limits import time_limits
from worker.jobs.steps import job_progress, raise_if_cancelled, report_stage
from worker.logs import job_context
from worker.metrics import JOBS, QUEUE_WAIT, STAGE_CPU, STAGE_SECONDS
from worker.runtime import WorkerRuntime, running

log = logging.getLogger(__name__)
HOST = socket.gethostname()  # in every manifest; read once, not per job

# Faults of the world, not of the input: Celery retries these with backoff and jitter.
TRANSIENT_ERRORS = transient_errors()
# Kinds whose images go through `runtime.compute` (a batcher's passes, or alone).
IMAGE_KINDS = (JobKind.ACTIVATIONS, JobKind.GRADCAM)


def parse_spec(message: Any) -> JobSpec:
    """The JobSpec in a message; raises InvalidJob (invalid_job) for anything malformed."""
    if not isinstance(message, dict):
        raise InvalidJob("the job message is not an object")
    size = len(json.dumps(message, default=str))
    if size > contract.MAX_MESSAGE_BYTES:
        raise PayloadTooLarge(
            f"the job message is {size} bytes, above {contract.MAX_MESSAGE_BYTES}; "
            "messages carry URIs, not data"
        )
    try:
        return JobSpec.from_message(message)  # the contract checks every field
    except (TypeError, ValueError) as exc:
        raise InvalidJob(f"malformed job message: {exc}") from None


def extract(task: Task, message: dict[str, Any], runtime: WorkerRuntime) -> dict[str, Any]:
    """Run one job. Returns {job_id, status, manifest, cache, cache_stats, timings_ms}.

    Raises the job's ActvizError after writing error.json; TransientError and
    connection errors propagate for Celery to retry.
    """
    settings = runtime.settings
    try:
        spec = parse_spec(message)
        if task.request.id and task.request.id != spec.job_id:
            # The state a client follows (task id) and the folder written (job id) are one.
            raise InvalidJob("the message's task id and its job id differ")
    except ActvizError as exc:
        JOBS.labels(status="failed", code=exc.code).inc()
        raise
    with job_context(spec.job_id), job_progress(task, settings.progress_after_ms):
        if spec.enqueued_at:
            QUEUE_WAIT.observe(max(0.0, time.time() - spec.enqueued_at))
        try:
            with time_limits(
                spec.job_id,
                settings.soft_time_limit,
                settings.time_limit,
                may_exit=not settings.embedded,
            ):
                # Held (unacked) from here on; the registry checks it until it ends.
                redis = redis_client(task)
                if redis is not None:
                    running.bind(redis, counter_ttl(settings))
                # A finished job is not run again; a job that keeps killing workers stops.
                # Also marks it started in the job registry, in the same round trip.
                result = admit_delivery(task, spec, runtime.store, settings)
                if result is not None:
                    # Complete already (a duplicate, or a census submitted again): its
                    # batch still counts its end once (a second record is a no-op).
                    publish_batch(
                        spec, runtime.store, contract.SUCCEEDED, redis_client(task), settings
                    )
                else:
                    result = run_job(task, spec, runtime)
                end_in_registry(redis, spec.job_id, contract.SUCCEEDED)
        except ActvizError as exc:
            fail_job(spec, exc, runtime, task)
            raise
        except SoftTimeLimitExceeded:
            error: ActvizError = TimeLimit(
                f"the job ran past the soft time limit ({settings.soft_time_limit} s)"
            )
            fail_job(spec, error, runtime, task)
            raise error from None
        except Exception as exc:
            if isinstance(exc, TRANSIENT_ERRORS):
                if task.request.retries < task.max_retries:
                    running.unmark(spec.job_id)  # it leaves this process without ending
                    raise  # Celery retries it (autoretry_for, worker/app.py)
                if isinstance(exc, HelperUnavailable):
                    error = WorkerLost(f"{exc}, through {task.max_retries} retries")
                else:
                    error = StorageError(
                        f"storage or broker unreachable through {task.max_retries} retries: {exc}"
                    )
            else:
                log.exception("job failed unexpectedly")
                error = Internal(f"{type(exc).__name__}: {exc}")
            fail_job(spec, error, runtime, task)
            raise error from None
        JOBS.labels(status="succeeded", code="").inc()
        return result


def run_job(task: Task, spec: JobSpec, runtime: WorkerRuntime) -> dict[str, Any]:
    """Run the job's kind, then store what it made: its files first, the manifest last."""
    raise_if_cancelled(task, "before it ran")
    start_batch_job(spec, redis_client(task), runtime.settings)
    if spec.kind not in IMAGE_KINDS:  # those mark the passes they run in
        running.mark_running([spec.job_id])
    output = kind_module(spec.kind).run(task, spec, runtime)
    manifest, store = output.manifest, runtime.store
    fill_manifest(manifest, spec, output.cache_event)
    manifest["files"] = sorted(output.files)  # the report's files too: what a reader may fetch

    report_stage(task, Progress.UPLOADING)
    started = time.perf_counter()
    prefix = contract.job_prefix(spec.job_id)
    objects = [(prefix + name, data) for name, data in output.files.items()]
    measure = runtime.settings.stage_cpu
    metered = CpuMeteredStore(store) if measure else store
    put_many(metered, objects, pool=runtime.uploads)
    upload_s = time.perf_counter() - started
    STAGE_SECONDS.labels(stage="upload").observe(upload_s)
    manifest["timings_ms"]["upload"] = round(upload_s * 1000, 3)
    # Written last: a manifest's presence means every object it names is there.
    metered.put(contract.manifest_key(spec.job_id), manifest_bytes(manifest))
    cpu = manifest.setdefault("cpu_ms", {})
    if measure:
        cpu["upload"] = round(metered.cpu_s * 1000, 3)
        for stage, ms in cpu.items():
            STAGE_CPU.labels(stage=stage).inc(ms / 1000)
    log.info("job done: %s, model cache %s", output.summary, output.cache_event)
    publish_batch(spec, store, contract.SUCCEEDED, redis_client(task), runtime.settings)
    return {
        "job_id": spec.job_id,
        "status": contract.SUCCEEDED,
        "manifest": store.uri(contract.manifest_key(spec.job_id)),
        "files": manifest["files"],  # a waiting producer links the report without a read
        "cache": output.cache_event,
        "cache_stats": runtime.cache.stats(),
        "timings_ms": manifest["timings_ms"],
        "cpu_ms": cpu,
    }


class CpuMeteredStore:
    """A store whose `put` adds the CPU time of the thread running it to `cpu_s`."""

    def __init__(self, store: Any) -> None:
        self.store = store
        self.concurrent_puts = store.concurrent_puts
        self.cpu_s = 0.0
        self._lock = threading.Lock()

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        started = time.thread_time()
        try:
            self.store.put(key, data, content_type)
        finally:
            spent = time.thread_time() - started
            with self._lock:
                self.cpu_s += spent


def kind_module(kind: str) -> Any:
    """The module `worker.jobs.<kind>` that runs jobs of `kind` (its `run` function)."""
    return importlib.import_module(f"{__package__}.{JobKind(kind).value}")


def fill_manifest(manifest: dict[str, Any], spec: JobSpec, cache_event: str) -> None:
    """Add what only the lifecycle knows: kind, job and batch ids, inputs, worker."""
    manifest["kind"] = spec.kind
    manifest["job_id"] = spec.job_id
    manifest.setdefault("image", {})["uri"] = spec.image
    if spec.image_name:
        manifest["image"]["name"] = spec.image_name
    manifest.setdefault("model", {})["uri"] = spec.model
    if spec.batch_id:
        manifest["batch_id"] = spec.batch_id
    manifest["worker"] = {"host": HOST, "model_cache": cache_event}


def fail_job(
    spec: JobSpec, error: ActvizError, runtime: WorkerRuntime, task: Task | None = None
) -> None:
    """Record a permanent failure: metrics, log line, and jobs/<id>/error.json."""
    JOBS.labels(status="failed", code=error.code).inc()
    log.warning("job failed: %s", error)
    body = {"job_id": spec.job_id, **error.to_dict(), "model": spec.model, "image": spec.image}
    if spec.image_name:
        body["image_name"] = spec.image_name
    try:
        runtime.store.put(contract.error_key(spec.job_id), json.dumps(body, indent=2).encode())
    except (StorageError, *TRANSIENT_ERRORS) as exc:  # the failure stays in the result backend
        log.warning("could not write error.json: %s", exc)
    except Exception:
        log.exception("could not write error.json")
    redis = redis_client(task) if task is not None else None
    publish_batch(spec, runtime.store, contract.FAILED, redis, runtime.settings)
    end_in_registry(redis, spec.job_id, contract.FAILED)


def end_in_registry(redis: Any, job_id: str, state: str) -> None:
    """Tell the job registry the job ended; never raises (without it, the reconciler
    finds the end in the result backend)."""
    if redis is None:
        return
    try:
        pipe = redis.pipeline(transaction=False)
        mark_ended(pipe, job_id, state)
        running.leave(pipe, job_id)  # no longer this process's to die with
        pipe.execute()
    except Exception as exc:  # noqa: BLE001 (bookkeeping must not fail an ended job)
        log.warning("could not record the job's end in the registry: %s", exc)
