"""The job registry in Redis: every job a producer submits, checked until it ends.

kombu's Redis transport pops a message (BRPOP) and records it as unacknowledged
in a second step: a worker killed between the two loses the job, and no
visibility timeout brings it back (kombu #305). So before a producer sends a
job, it writes the job's registry entry and schedules a check of it, in one
MULTI:

    actviz:job:<id>      hash {submitted_at, digest, state, queue, priority, message}
                         (expires with the results, ACTVIZ_RESULT_EXPIRES)
    actviz:reconcile     sorted set: job id -> when to check it next

A worker that starts a job marks it `started` (`mark_started`); the worker that
ends it marks it `succeeded` or `failed` and drops its message and its check
(`mark_ended`). A job that has not ended when its check comes is looked for in
the queues and in the unacknowledged messages workers hold
(worker/jobs/reconciler.py): one found there is checked again later; one found
nowhere twice in a row, RECONFIRM_S apart, was lost, and is sent again under
the same id from the message kept here. A producer that died
between this entry and its send is covered the same way: its job is sent.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from producer.contract import job_key

RECONCILE_KEY = "actviz:reconcile"
QUEUED, STARTED = "queued", "started"


def register(
    client: Any,
    job_id: str,
    message: dict[str, Any],
    queue: str,
    priority: int | None,
    ttl: int,
    check_after: float | None,
) -> None:
    """Write the job's entry and its first check (none when `check_after` is None),
    atomically (MULTI/EXEC)."""
    text = json.dumps(message, separators=(",", ":"), sort_keys=True, default=str)
    now = time.time()
    pipe = client.pipeline(transaction=True)
    pipe.hset(
        job_key(job_id),
        mapping={
            "submitted_at": f"{now:.3f}",
            "digest": hashlib.sha256(text.encode()).hexdigest(),
            "state": QUEUED,
            "queue": queue,
            "priority": "" if priority is None else str(priority),
            "message": text,
        },
    )
    pipe.expire(job_key(job_id), ttl)
    if check_after is not None:
        pipe.zadd(RECONCILE_KEY, {job_id: now + check_after})
    pipe.execute()


def forget(client: Any, job_id: str) -> None:
    """Take back a job's entry and check (its send was refused)."""
    pipe = client.pipeline(transaction=True)
    pipe.delete(job_key(job_id))
    pipe.zrem(RECONCILE_KEY, job_id)
    pipe.execute()


_START = (
    "if redis.call('exists', KEYS[1]) == 1 then "
    "redis.call('hset', KEYS[1], 'state', ARGV[1]) end; return 0"
)
_END = (
    "if redis.call('exists', KEYS[1]) == 1 then "
    "redis.call('hset', KEYS[1], 'state', ARGV[2]); "
    "redis.call('hdel', KEYS[1], 'message', 'absent_since') end; "
    "return redis.call('zrem', KEYS[2], ARGV[1])"
)


def mark_started(client: Any, job_id: str) -> None:
    """A worker runs the job. Its checks go on until it ends: a job held by a live
    worker is found among the unacknowledged messages, and one whose unacknowledged
    record was lost (a failover replicates asynchronously) is found nowhere and sent
    again. One command (a delivery's admission pipelines it); an expired entry stays
    gone."""
    client.eval(_START, 1, job_key(job_id), STARTED)


def registered_state(client: Any, job_id: str) -> str | None:
    """The job's state in the registry (queued, started, succeeded, failed), or None
    for an id nobody submitted or whose entry has expired."""
    value = client.hget(job_key(job_id), "state")
    return None if value is None else _text(value)


def mark_ended(client: Any, job_id: str, state: str) -> None:
    """The job ended (`succeeded` or `failed`): its kept message and its checks go."""
    client.eval(_END, 2, job_key(job_id), RECONCILE_KEY, job_id, state)


def due(client: Any, now: float, limit: int = 1000) -> list[str]:
    """Job ids whose check is due at `now`, oldest first."""
    return [_text(item) for item in client.zrangebyscore(RECONCILE_KEY, "-inf", now, 0, limit)]


CHECK_FIELDS = ("state", "absent_since", "waited", "queue", "priority")


def entries(
    client: Any, job_ids: list[str], fields: tuple[str, ...] = CHECK_FIELDS
) -> list[dict[str, str]]:
    """`fields` of the registry entries of `job_ids` ({} for one that expired)."""
    pipe = client.pipeline(transaction=False)
    for job_id in job_ids:
        pipe.hmget(job_key(job_id), fields)
    return [
        {name: _text(value) for name, value in zip(fields, found, strict=True) if value is not None}
        for found in pipe.execute()
    ]


def message(client: Any, job_id: str) -> dict[str, Any] | None:
    """The message the registry kept for a job not yet started, or None."""
    text = client.hget(job_key(job_id), "message")
    return None if text is None else json.loads(text)


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
