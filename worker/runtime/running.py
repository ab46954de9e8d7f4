"""Which jobs a worker process is running, so that its death charges those and no others.

A worker process holds more jobs than it runs: with batching, up to twice the
batch size are taken from the queue, and most wait for a forward pass. When
the process dies, every job it held comes back, but only the ones it was
*running* (in a forward pass, rendering, uploading) can have caused the death.
Charging the others too would, under churn (a node drained, a spot instance
taken back), send innocent jobs to the quarantine process one at a time and
fail them `worker_lost` after a few unlucky deliveries.

So a process records the jobs it starts to run in a Redis set of its own,
`actviz:running:<consumer>` (one pipelined write per forward pass), and each
job leaves it when it ends. When a consumer's liveness key expires
(worker/transport.py), `charge` moves that set's members to per-job death
counters, `actviz:suspect:<job_id>`: atomically, so each death is charged
once, by the reconciler (worker/jobs/reconciler.py) or by the worker that
receives one of its jobs first (`charge_dead`). A job with one death runs in
the quarantine process; one whose workers died running it
`ACTVIZ_MAX_DELIVERIES` times fails `worker_lost` (worker/jobs/deliveries.py).

The process binds its Redis client once (`bind`); before that, and in the
embedded mode, marking is a no-op. Bookkeeping never fails a job: a Redis
error is logged and the job goes on.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

RUNNING_PREFIX = "actviz:running:"
SUSPECT_PREFIX = "actviz:suspect:"

_bound: dict[str, Any] = {}
_marked: set[str] = set()  # what this process has in its running set
_lock = threading.Lock()


def running_key(consumer: str) -> str:
    """'actviz:running:<consumer>': the jobs consumer `consumer` (host:pid) is running."""
    return f"{RUNNING_PREFIX}{consumer}"


def suspect_key(job_id: str) -> str:
    """'actviz:suspect:<job_id>': how many worker processes died running the job."""
    return f"{SUSPECT_PREFIX}{job_id}"


def bind(client: Any, ttl_s: int) -> None:
    """Use `client` for this process's marks, each living `ttl_s` (a job's hard time
    limit and more: a live process's set never expires under a running job)."""
    if _bound.get("client") is not client:
        from worker.transport import consumer_name

        _bound.update(client=client, ttl=int(ttl_s), key=running_key(consumer_name()))


def unbind() -> None:
    """Stop marking (a process that leaves the service, or a test)."""
    _bound.clear()
    with _lock:
        _marked.clear()


def mark_running(job_ids: Iterable[str | None]) -> None:
    """These jobs start running in this process (a forward pass, or a job run alone)."""
    ids = [job_id for job_id in job_ids if job_id]
    client = _bound.get("client")
    if client is None or not ids:
        return
    with _lock:
        _marked.update(ids)
    try:
        pipe = client.pipeline(transaction=False)
        pipe.sadd(_bound["key"], *ids)
        pipe.expire(_bound["key"], _bound["ttl"])
        pipe.execute()
    except Exception as exc:  # noqa: BLE001 (bookkeeping must not fail the pass)
        log.warning("could not record the jobs this worker runs: %s", exc)


def unmark(job_id: str | None) -> None:
    """The job stops running here without ending (its model is loaded and it waits for a
    pass, or Celery sends it again as a retry)."""
    client = _bound.get("client")
    if client is None or not job_id:
        return
    with _lock:
        _marked.discard(job_id)
    try:
        client.srem(_bound["key"], job_id)
    except Exception as exc:  # noqa: BLE001 (bookkeeping must not fail the job)
        log.warning("could not record the jobs this worker runs: %s", exc)


@contextmanager
def running_now(job_id: str | None) -> Iterator[None]:
    """The job runs here for the block (a model load); one marked already stays so."""
    with _lock:
        already = job_id in _marked
    if already or not job_id:
        yield
        return
    mark_running([job_id])
    try:
        yield
    finally:
        unmark(job_id)


def leave(pipe: Any, job_id: str) -> None:
    """Queue, on `pipe`, the job's removal from this process's running set."""
    if _bound.get("client") is not None:
        with _lock:
            _marked.discard(job_id)
        pipe.srem(_bound["key"], job_id)


def charge(client: Any, consumers: Iterable[str], ttl_s: int) -> list[str]:
    """Charge a death to every job each dead consumer was running; returns those jobs.

    Each set is read and deleted in one transaction: a death is charged once,
    whoever calls first.
    """
    charged: list[str] = []
    for consumer in consumers:
        pipe = client.pipeline(transaction=True)
        pipe.smembers(running_key(consumer))
        pipe.delete(running_key(consumer))
        members, _ = pipe.execute()
        ids = sorted(m.decode() if isinstance(m, bytes) else m for m in members)
        if not ids:
            continue
        pipe = client.pipeline(transaction=False)
        for job_id in ids:
            pipe.incr(suspect_key(job_id))
            pipe.expire(suspect_key(job_id), ttl_s)
        pipe.execute()
        log.warning(
            "worker process %s died running %d job(s): %s",
            consumer,
            len(ids),
            ", ".join(ids[:10]),
        )
        charged.extend(ids)
    return charged


def charge_dead(client: Any, ttl_s: int) -> list[str]:
    """`charge` every listed consumer whose liveness key expired, leaving it listed (the
    reconciler reports each death once, worker/jobs/reconciler.py)."""
    from worker.transport import expired_consumers

    dead = expired_consumers(client)
    return charge(client, dead, ttl_s) if dead else []


def deaths(client: Any, job_id: str) -> int:
    """How many worker processes died running the job (within the counters' lifetime)."""
    return int(client.get(suspect_key(job_id)) or 0)
