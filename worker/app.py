"""The Celery app of a worker: the shared producer config plus worker-side options.

    app = create_app(settings)     # registers the task and attaches WorkerRuntime as app.actviz

JSON only, late acks, one message prefetched at a time, and retries with
exponential backoff and jitter for transient faults only.
"""

from __future__ import annotations

import threading
from contextlib import ExitStack
from typing import Any

from celery import Celery, Task
from celery.signals import task_postrun, task_prerun

from producer.broker import create_app as create_producer_app
from producer.contract import TASK_NAME
from producer.errors import ActvizError
from producer.settings import Settings
from worker import transport
from worker.jobs import lifecycle
from worker.logs import job_context
from worker.result_backend import worker_backend_url
from worker.runtime import WorkerRuntime
from worker.runtime.pool import pool_for
from worker.runtime.quarantine import Quarantine


def worker_config(settings: Settings) -> dict:
    """Options only a consuming worker needs."""
    return {
        "task_acks_late": True,
        # Celery's solo pool, or threads when batching (worker/runtime/pool.py); a cold shutdown
        # re-queues the running jobs instead of failing them.
        "worker_pool": pool_for(settings)[0],
        "task_reject_on_worker_lost": True,
        # Reserved messages = this x the pool's threads (2 x batch size when batching).
        "worker_prefetch_multiplier": 1,
        "task_soft_time_limit": settings.soft_time_limit,
        "task_time_limit": settings.time_limit,
        "worker_send_task_events": settings.task_events,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        "worker_redirect_stdouts": False,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # Every message passes the gate before Celery reads it (worker/consumer.py).
        "worker_consumer": "worker.consumer:Consumer",
        # Each state written in one round trip (worker/result_backend.py).
        "result_backend": worker_backend_url(settings.backend_url),
    }


# Keyed by task id and thread: two deliveries of one job id may run at once on two threads.
_job_logs: dict[tuple[str, int], ExitStack] = {}


def _enter_job_log(task_id: str | None = None, **_: Any) -> None:
    # From here to task_postrun, Celery's own lines (started, succeeded, raised,
    # retry) carry the job id too: the task id is the job id.
    if task_id:
        stack = ExitStack()
        stack.enter_context(job_context(task_id))
        _job_logs[(task_id, threading.get_ident())] = stack


def _leave_job_log(task_id: str | None = None, **_: Any) -> None:
    stack = _job_logs.pop((task_id or "", threading.get_ident()), None)
    if stack is not None:
        stack.close()


task_prerun.connect(_enter_job_log, weak=False, dispatch_uid="actviz-job-log-enter")
task_postrun.connect(_leave_job_log, weak=False, dispatch_uid="actviz-job-log-leave")


def create_app(settings: Settings) -> Celery:
    """A worker app: shared config, worker options, the task, and a WorkerRuntime."""
    # Messages are measured before they are parsed (worker/transport.py).
    transport.install()
    app = create_producer_app(settings, name="actviz-worker")
    app.conf.update(worker_config(settings))
    # Its helper process starts with the first redelivered job, not before.
    runtime = WorkerRuntime(settings, quarantine=Quarantine(settings))
    app.actviz = runtime

    def extract(task: Task, message: dict[str, Any]) -> dict[str, Any]:
        return lifecycle.extract(task, message, runtime)

    app.task(
        name=TASK_NAME,
        bind=True,
        autoretry_for=lifecycle.TRANSIENT_ERRORS,
        retry_backoff=True,
        retry_backoff_max=60,
        retry_jitter=True,
        max_retries=settings.max_retries,
        # Expected failures are logged on one line, without a traceback.
        throws=(ActvizError,),
        acks_late=True,
    )(extract)
    return app
