"""Steps every kind of job uses: its output, progress, inputs, and whether it was redelivered."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from celery import Task

from producer.contract import JobSpec, cancel_key
from producer.errors import Cancelled
from producer.storage import is_s3_uri
from worker.jobs.deliveries import redis_client
from worker.runtime import WorkerRuntime


@dataclass
class Output:
    """What a kind's `run` hands back: the manifest and the files it names.

    `files` keys are relative to the job folder; `manifest["timings_ms"]` holds
    the kind's stages; `cache_event` is the model cache's 'hit' or 'miss';
    `summary` is a few words for the log line.
    """

    manifest: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)
    cache_event: str = ""
    summary: str = ""


def report_stage(task: Task, stage: str) -> None:
    """Let `Job.state()` show progress; a no-op when run outside a worker.

    Only once the job has run `settings.progress_after_ms` (see `start_progress`):
    each report is a result-backend read and write, which a job that ends sooner
    would spend on stages nobody has time to see.
    """
    if not task.request.id:
        return
    started, after = getattr(task.request, "actviz_progress", (None, 0.0))
    if stage_due(started, after, time.monotonic()):
        # A job long enough to show its stages is long enough to be cancelled between them.
        raise_if_cancelled(task, f"before its {stage} stage")
        task.update_state(state="STARTED", meta={"stage": stage})


def raise_if_cancelled(task: Task, when: str) -> None:
    """Raise Cancelled (cancelled) when the job was marked cancelled (Job.cancel, actviz cancel).

    One Redis read, or none for the first check after this delivery's admission read
    the mark (worker/jobs/deliveries.py count_delivery); nothing without Redis (the
    embedded mode revokes instead).
    """
    read_at_admission = getattr(task.request, "actviz_cancelled", None)
    if read_at_admission is not None:
        task.request.actviz_cancelled = None  # later checks ask Redis again
        cancelled = read_at_admission
    else:
        client = redis_client(task)
        cancelled = bool(
            client is not None and task.request.id and client.exists(cancel_key(task.request.id))
        )
    if cancelled:
        raise Cancelled(f"the job was cancelled {when}")


def start_progress(task: Task, after_ms: int) -> None:
    """The job starts now: its stages are reported from `after_ms` on."""
    task.request.actviz_progress = (time.monotonic(), max(0, after_ms) / 1000.0)


def stage_due(started: float | None, after_s: float, now: float) -> bool:
    """Whether a stage reached at `now` is reported for a job started at `started`."""
    return started is None or now - started >= after_s


def fetch_image(spec: JobSpec, runtime: WorkerRuntime) -> bytes:
    """The job's image bytes (see worker.runtime.fetch.read_image)."""
    from worker.runtime.fetch import read_image

    s3 = runtime.s3 if is_s3_uri(spec.image) else None
    return read_image(spec.image, runtime.store, runtime.settings, s3)


def redelivered(task: Task) -> bool:
    """Whether a worker process died while running this job before: admit_delivery
    counted it for this delivery (worker/jobs/deliveries.py, worker/runtime/running.py)."""
    return getattr(task.request, "actviz_deaths", 0) > 0
