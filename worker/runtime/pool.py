"""The worker's pool: Celery's solo (or thread) pool, with a cold shutdown that keeps the job.

A solo pool runs the job in the worker's main thread, which is also where
Celery's signal handlers run. On a cold shutdown (SIGQUIT, or a second
SIGTERM/Ctrl+C) Celery cancels running jobs through `terminate_job`, which the
solo pool does not implement: the NotImplementedError it raises surfaced inside
the job and failed it as `internal`. Here the cancel ends the job with
WorkerTerminate instead: nothing is acknowledged, the worker stops, and the
Redis transport puts the unacknowledged message back on its queue.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any

from celery.concurrency import solo, thread
from celery.exceptions import WorkerTerminate
from celery.platforms import EX_FAILURE

from producer.settings import Settings

# Celery resolves ACTVIZ's pool by this name (`worker_pool` in worker/app.py).
POOL = "worker.runtime.pool:SoloPool"
# With micro-batching (ACTVIZ_BATCH_SIZE > 1): jobs run on threads, see worker/runtime/batcher.py.
THREAD_POOL = "worker.runtime.pool:ThreadPool"


class SoloPool(solo.TaskPool):
    """Solo pool whose cancelled job stops the worker without acknowledging the message."""

    def terminate_job(self, pid: int, signal: int | None = None) -> None:
        raise WorkerTerminate(EX_FAILURE)


class ThreadPool(thread.TaskPool):
    """Thread pool with the same cold shutdown: unacknowledged jobs go back to the queue.

    Celery cancels each running job from the main thread, but a job on a pool
    thread cannot be unwound from there: left alone it would run on while the
    interpreter shuts down and fail as `internal`. So the cancel raises
    WorkerTerminate inside every thread running a job, at its next Python
    instruction; Celery's tracer lets it through without storing a failure,
    nothing is acknowledged, and the consumer restores the messages.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._running: set[int] = set()
        self._running_lock = threading.Lock()

    def on_apply(self, target: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        def tracked(*a: Any, **kw: Any) -> Any:
            ident = threading.get_ident()
            with self._running_lock:
                self._running.add(ident)
            try:
                return target(*a, **kw)
            finally:
                with self._running_lock:
                    self._running.discard(ident)

        return super().on_apply(tracked, *args, **kwargs)

    def terminate_job(self, pid: int, signal: int | None = None) -> None:
        with self._running_lock:
            running = list(self._running)
            self._running.clear()  # each thread is told once
        for ident in running:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(
                ctypes.c_ulong(ident), ctypes.py_object(WorkerTerminate)
            )


def batching(settings: Settings) -> bool:
    """Whether a worker with `settings` batches jobs (never in the embedded mode)."""
    return settings.batch_size > 1 and not settings.embedded


def pool_for(settings: Settings) -> tuple[str, int]:
    """(pool, threads) of a worker process.

    Batch size 1: the solo pool, one job at a time. Batch size N: 2N
    threads, so N jobs can fill the next forward pass while the N of the
    previous one render and upload. With prefetch multiplier 1 the worker
    then reserves up to 2N messages, which a queue-length autoscaler does
    not see (infra/README.md).
    """
    if not batching(settings):
        return POOL, 1
    return THREAD_POOL, 2 * settings.batch_size
