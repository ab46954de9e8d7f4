"""Steps every kind of job uses: its output, progress, inputs, and whether it was redelivered."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from celery import Task

from producer.contract import JobSpec, cancel_key
from producer.errors import Cancelled
from producer.storage import is_s3_uri
from worker.jobs.deliveries import redis_client
from worker.jobs.limits import process_timer
from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)


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


class StageReports:
    """When a job's stages reach the result backend (`Job.state().stage`).

    Stages are written at most once per `after_s` (ACTVIZ_PROGRESS_AFTER_MS), the
    first once the job has run that long: each write is a round trip to the result
    backend (with the worker's, the cancel check is in it, `report_stage`), which
    stages nobody has time to see would spend (a job in a loaded worker's passes
    reaches its four stages within a few hundred ms). A stage reached before its
    time is written then, by the process's timer thread, if it is still the job's
    stage: a long stage that began early (the forward pass and encoding, after a
    warm model's load) shows, at most `after_s` late, and a shorter one that a later
    stage replaced meanwhile does not. Writes are serialized, and `close()` at the
    job's end cancels what is pending and waits for a write under way, so no stage
    lands after the job's final state.
    """

    def __init__(self, task: Task, after_s: float) -> None:
        self.task = task
        self.request = task.request  # this job's, read from the timer thread too
        self.started = time.monotonic()
        self.after_s = max(0.0, after_s)
        self.written = 0  # stages written so far
        self._next = self.started + self.after_s  # the earliest time of the next write
        self._lock = threading.Lock()
        self._pending: str | None = None
        self._entry: Any = None
        self._closed = False

    def due(self, now: float) -> bool:
        return now >= self._next

    def write(self, stage: str, guard: str | None = None) -> bool:
        """Write `stage` now (the job's thread); a deferred one is dropped. With `guard`
        (the job's cancel mark), nothing is written while that key exists, in the same
        round trip: returns False then."""
        with self._lock:
            self._pending = None
            self._cancel_entry()
            return self._closed or self._store(stage, guard)

    def defer(self, stage: str) -> None:
        """Write `stage` when the next write is due, unless a later stage or the job's
        end comes first."""
        with self._lock:
            if self._closed:
                return
            self._pending = stage
            if self._entry is None:
                delay = max(0.0, self._next - time.monotonic())
                self._entry = process_timer().call_after(delay, self._write_pending)

    def close(self) -> None:
        with self._lock:
            self._closed, self._pending = True, None
            self._cancel_entry()

    def _cancel_entry(self) -> None:
        if self._entry is not None:
            self._entry.cancel()
            self._entry = None

    def _write_pending(self) -> None:
        with self._lock:
            stage, self._pending, self._entry = self._pending, None, None
            if stage is None or self._closed:
                return
            try:
                self._store(stage)
            except Exception as exc:  # noqa: BLE001 (progress only: the job goes on)
                log.warning("could not report the job's %s stage: %s", stage, exc)

    def _store(self, stage: str, guard: str | None = None) -> bool:
        backend, meta = self.task.backend, {"stage": stage}
        if guard is None:
            backend.store_result(self.request.id, meta, "STARTED", request=self.request)
        elif not backend.store_unless(self.request.id, meta, "STARTED", self.request, guard=guard):
            return False
        self._next = time.monotonic() + self.after_s
        self.written += 1
        return True


def report_stage(task: Task, stage: str) -> None:
    """Let `Job.state()` show progress; a no-op when run outside a worker.

    Stages are written at most once per `settings.progress_after_ms`, the first once
    the job has run that long; one reached sooner waits for its time (see
    StageReports). A job with no record of its start reports every stage.
    """
    if not task.request.id:
        return
    reports = getattr(task.request, "actviz_progress", None)
    if reports is not None and not reports.due(time.monotonic()):
        reports.defer(stage)
        return
    # A job long enough to show its stages is long enough to be cancelled between them.
    when = f"before its {stage} stage"
    guard = _cancel_guard(task) if reports is not None else None
    if guard is None:
        raise_if_cancelled(task, when)
    if reports is None:
        task.update_state(state="STARTED", meta={"stage": stage})
    elif not reports.write(stage, guard):
        raise Cancelled(f"the job was cancelled {when}")


def _cancel_guard(task: Task) -> str | None:
    """The job's cancel mark, where the result backend checks it in the stage's own write
    (worker/result_backend.py `store_unless`: the Redis that holds the marks, see
    `redis_client`); None where `raise_if_cancelled` decides: another backend, or the
    admission's read of the mark not used yet."""
    if getattr(task.request, "actviz_cancelled", None) is not None:
        return None
    return cancel_key(task.request.id) if hasattr(task.backend, "store_unless") else None


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


@contextmanager
def job_progress(task: Task, after_ms: int) -> Iterator[StageReports]:
    """The job runs in the block: its stages are written from `after_ms` on, and none
    after the block."""
    reports = task.request.actviz_progress = StageReports(task, max(0, after_ms) / 1000.0)
    try:
        yield reports
    finally:
        reports.close()


def fetch_image(spec: JobSpec, runtime: WorkerRuntime) -> bytes:
    """The job's image bytes (see worker.runtime.fetch.read_image)."""
    from worker.runtime.fetch import read_image

    s3 = runtime.s3 if is_s3_uri(spec.image) else None
    return read_image(spec.image, runtime.store, runtime.settings, s3)


def redelivered(task: Task) -> bool:
    """Whether a worker process died while running this job before: admit_delivery
    counted it for this delivery (worker/jobs/deliveries.py, worker/runtime/running.py)."""
    return getattr(task.request, "actviz_deaths", 0) > 0
