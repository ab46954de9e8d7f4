"""The worker's pool: Celery's solo pool, with a cold shutdown that keeps the job.

A solo pool runs the job in the worker's main thread, which is also where
Celery's signal handlers run. On a cold shutdown (SIGQUIT, or a second
SIGTERM/Ctrl+C) Celery cancels running jobs through `terminate_job`, which the
solo pool does not implement: the NotImplementedError it raises surfaced inside
the job and failed it as `internal`. Here the cancel ends the job with
WorkerTerminate instead: nothing is acknowledged, the worker stops, and the
Redis transport puts the unacknowledged message back on its queue.
"""

from __future__ import annotations

from celery.concurrency import solo
from celery.exceptions import WorkerTerminate
from celery.platforms import EX_FAILURE

# Celery resolves ACTVIZ's pool by this name (`worker_pool` in worker/app.py).
POOL = "worker.pool:SoloPool"


class SoloPool(solo.TaskPool):
    """Solo pool whose cancelled job stops the worker without acknowledging the message."""

    def terminate_job(self, pid: int, signal: int | None = None) -> None:
        raise WorkerTerminate(EX_FAILURE)
