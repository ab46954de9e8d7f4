"""At-least-once delivery, made safe: finished jobs are not run again, poison jobs stop.

Late acknowledgement means a job whose worker dies is handed out again
(after the Redis visibility timeout). Two things keep that from going wrong:

- A job whose manifest already exists is complete (the manifest is written
  last), so a second delivery returns the stored result instead of running:
  a duplicate message or a crash after the manifest costs one HEAD request.
  A first delivery skips that check (the delivery counter says it is one).
- A job that kills its worker every time (out of memory, a crashing kernel,
  the hard time limit) would otherwise loop forever. Each death of a worker
  process is charged to the jobs it was *running* then, not to the ones it
  only held (worker/runtime/running.py); once `settings.max_deliveries`
  deaths are charged to a job, its next delivery fails with `worker_lost`.
  A job run in the quarantine process is not charged its worker's death (the
  helper, not the worker, runs it; a helper's death fails it at once), so a
  delivery count of `BACKSTOP` x max_deliveries also ends a job.
  Each delivery of an attempt also increments
  `actviz:deliveries:<job_id>:<retry>`: a first delivery needs no look for a
  finished result. The retry number is part of that key because Celery's
  retries of transient faults are new messages, not lost workers.

Celery has no delivery limit for Redis, hence this module.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from producer import contract
from producer.contract import JobSpec
from producer.errors import WorkerLost
from producer.job_registry import mark_started
from producer.settings import Settings
from producer.storage import Store
from worker.runtime import running

log = logging.getLogger(__name__)

KEY_PREFIX = "actviz:deliveries:"
# Deliveries of one attempt, in units of max_deliveries, after which a job fails whatever
# it was charged: the stop for a loop no charge sees (a job in the quarantine process
# whose worker, not its helper, is killed each time).
BACKSTOP = 4


def delivery_key(job_id: str, retry: int) -> str:
    """'actviz:deliveries:<job_id>:<retry>'."""
    return f"{KEY_PREFIX}{job_id}:{retry}"


def counter_ttl(settings: Settings) -> int:
    """Seconds a counter lives: long enough to span every redelivery of one attempt."""
    return settings.visibility_timeout * (settings.max_deliveries + 1) + settings.time_limit


def redis_client(task: Task) -> Any:
    """The result backend's Redis client, or None when the backend is not Redis."""
    from celery.backends.redis import RedisBackend

    return task.backend.client if isinstance(task.backend, RedisBackend) else None


def count_delivery(task: Task, job_id: str, settings: Settings) -> int:
    """Record one more delivery of this attempt; returns how many there have been.

    The same round trip marks the job started in the job registry and reads
    its cancel mark, which `raise_if_cancelled` then uses instead of asking
    again (task.request.actviz_cancelled): three things every delivery needs,
    in one transaction. Returns 0 when the backend is not Redis (the embedded
    mode, where a worker that dies takes its queue with it). Redis connection
    errors propagate: they are transient and the task retries.
    """
    client = redis_client(task)
    if client is None:
        return 0
    key = delivery_key(job_id, int(task.request.retries or 0))
    pipe = client.pipeline()
    mark_started(pipe, job_id)
    pipe.incr(key)
    pipe.expire(key, counter_ttl(settings))
    pipe.exists(contract.cancel_key(job_id))
    _, count, _, cancelled = pipe.execute()
    task.request.actviz_cancelled = bool(cancelled)
    return int(count)


def stored_result(spec: JobSpec, store: Store) -> dict[str, Any] | None:
    """The task result of a job whose manifest exists, else None."""
    key = contract.manifest_key(spec.job_id)
    if not store.exists(key):
        return None
    return {
        "job_id": spec.job_id,
        "status": contract.SUCCEEDED,
        "manifest": store.uri(key),
        "duplicate": True,
    }


def admit_delivery(task: Task, spec: JobSpec, store: Store, settings: Settings) -> dict | None:
    """Decide what this delivery of `spec` does before any work starts.

    Returns the stored result when the job already completed (nothing to
    run), None when the job should run. Raises WorkerLost (worker_lost) when
    the job has been delivered more than `settings.max_deliveries` times.
    """
    count = count_delivery(task, spec.job_id, settings)
    # Only a job seen before can be complete already: a later delivery or retry of
    # this attempt, or a resubmission of its id. A first delivery (count 1 of retry 0;
    # 0 without Redis) spends no storage request on it.
    if count != 1 or task.request.retries:
        done = stored_result(spec, store)
        if done is not None:
            log.info("job already complete; returning the stored manifest")
            return done
    task.request.actviz_deaths = 0
    if count > 1:
        log.warning(
            "delivery %d of this job: an earlier one was lost with its worker or is a duplicate",
            count,
        )
        client = redis_client(task)
        # Its last holder may have died since the reconciler's last look: charge it now.
        running.charge_dead(client, counter_ttl(settings))
        died = task.request.actviz_deaths = running.deaths(client, spec.job_id)
        if died >= settings.max_deliveries:
            raise WorkerLost(
                f"{died} worker processes died while running the job "
                f"(limit ACTVIZ_MAX_DELIVERIES={settings.max_deliveries}); it may need more "
                "memory or time than a worker has, or crash the model"
            )
        if count > BACKSTOP * settings.max_deliveries:
            raise WorkerLost(
                f"the job was delivered {count} times and no worker finished it "
                f"(limit {BACKSTOP} x ACTVIZ_MAX_DELIVERIES); its workers keep dying"
            )
    return None
