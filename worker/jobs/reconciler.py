"""The reconciler: a registered job that no queue and no worker holds is sent again.

Every job a producer submits has a registry entry and a scheduled check
(producer/job_registry.py). Each worker's sweeper thread runs `reconcile`; a
Redis lock lets one worker at a time do a pass. A pass takes the checks that
are due, and for each job that has not ended (`queued` or `started`):

- found in a queue list, or among the unacknowledged messages workers hold:
  nothing is wrong; checked again after twice the last wait (at most
  MAX_CHECK_EVERY_S);
- found nowhere: marked absent and checked again RECONFIRM_S later; found
  nowhere then too, and not ended in the result backend either, it was lost
  (its worker died between popping it and recording it, its producer between
  registering and sending it, or a failover lost its unacknowledged record),
  and is sent again under its id, from the message the registry kept.

The two looks apart make a message in flight at the moment of one look (a
pop about to be recorded, a visibility restore between its two steps) count
as present: those steps take microseconds, the looks are seconds apart.
The queues are read only when a check is due, a few hundred messages at a
time; a long queue is read about once per MAX_CHECK_EVERY_S.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from producer.broker import send_job
from producer.contract import MAX_PRIORITY, QUEUES, job_key
from producer.job_registry import QUEUED, RECONCILE_KEY, STARTED, due, entries, message

log = logging.getLogger(__name__)

LOCK_KEY = "actviz:reconcile:lock"
LOCK_S = 15  # a pass takes well under a second; a dead holder blocks passes this long
RECONFIRM_S = 5.0  # a job found nowhere is looked for once more this much later
MAX_CHECK_EVERY_S = 300.0
SCAN_CHUNK = 500
# kombu's Redis transport: one list per priority step ('gpu', 'gpu\x06\x161', ...), and
# the hash of the messages workers hold (its default names; broker.py keeps them).
PRIORITY_SEP = "\x06\x16"
UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"


@dataclass
class Pass:
    """What one reconciliation pass did."""

    checked: int = 0
    present: int = 0
    absent: int = 0
    resent: list[str] = field(default_factory=list)
    dropped: int = 0  # ended or expired meanwhile: nothing to check


def queue_lists(queues: tuple[str, ...] = QUEUES) -> list[str]:
    """The Redis lists kombu keeps for `queues`, one per priority step."""
    return [
        f"{queue}{PRIORITY_SEP}{step}" if step else queue
        for queue in queues
        for step in range(MAX_PRIORITY + 1)
    ]


def held_or_queued(client: Any, wanted: set[str]) -> set[str]:
    """Which of the `wanted` job ids a queue list or a worker's unacked message holds.

    An unacked message counts only with its entry in the index kombu restores from
    (`unacked_index`): a record without it (a failover replicated one and not the
    other) would never be handed out again, so its job counts as held by no one.
    """
    found: set[str] = set()

    def look(raw: Any, tag: Any = None) -> None:
        try:
            message = json.loads(raw)
            if isinstance(message, list):  # unacked: [message, exchange, routing key]
                message = message[0]
            task_id = (message.get("headers") or {}).get("id")
        except (ValueError, TypeError, AttributeError, IndexError):
            return
        if task_id in wanted and (tag is None or client.zscore(UNACKED_INDEX_KEY, tag) is not None):
            found.add(task_id)

    for name in queue_lists():
        start = 0
        while True:
            chunk = client.lrange(name, start, start + SCAN_CHUNK - 1)
            for raw in chunk:
                look(raw)
            if len(chunk) < SCAN_CHUNK:
                break
            start += SCAN_CHUNK
    for tag, raw in client.hscan_iter(UNACKED_KEY, count=SCAN_CHUNK):
        look(raw, tag)
    return found


def dead_consumers(client: Any) -> list[str]:
    """Consumers (worker processes that pop messages) whose liveness key expired;
    they are forgotten here, so each death is reported once."""
    from worker.transport import CONSUMERS_KEY, expired_consumers

    dead = expired_consumers(client)
    if dead:
        client.srem(CONSUMERS_KEY, *dead)
    return dead


def reconcile(
    app: Any,
    client: Any,
    now: float | None = None,
    after: float = 60.0,
    charge_ttl: int = 3600,
) -> Pass | None:
    """One pass over the due checks, or over every registered job when a consumer died
    since the last pass (it may have popped one); a dead consumer's running jobs are
    charged its death, counters living `charge_ttl` s (worker/runtime/running.py). None
    when another worker holds the lock."""
    token = uuid.uuid4().hex
    if not client.set(LOCK_KEY, token, nx=True, ex=LOCK_S):
        return None
    try:
        now = time.time() if now is None else now
        dead = dead_consumers(client)
        if dead:
            # The jobs they were running (not those they only held) may have killed them.
            from worker.runtime import running

            running.charge(client, dead, charge_ttl)
            log.warning(
                "worker process(es) gone: %s; looking for every job not ended",
                ", ".join(dead[:5]),
            )
            ids = [
                m.decode() if isinstance(m, bytes) else m
                for m in client.zrange(RECONCILE_KEY, 0, -1)
            ]
        else:
            ids = due(client, now)
        return _reconcile(app, client, ids, now, after)
    finally:
        if client.get(LOCK_KEY) == token.encode():
            client.delete(LOCK_KEY)


def _reconcile(app: Any, client: Any, ids: list[str], now: float, after: float) -> Pass:
    outcome = Pass()
    if not ids:
        return outcome
    found = entries(client, ids)
    queued = {
        job_id: entry
        for job_id, entry in zip(ids, found, strict=True)
        if entry.get("state") in (QUEUED, STARTED)
    }
    gone = [job_id for job_id in ids if job_id not in queued]
    if gone:
        client.zrem(RECONCILE_KEY, *gone)
        outcome.dropped = len(gone)
    present = held_or_queued(client, set(queued)) if queued else set()
    pipe = client.pipeline(transaction=False)
    for job_id, entry in queued.items():
        outcome.checked += 1
        key = job_key(job_id)
        waited = float(entry.get("waited") or after)
        if job_id in present:
            outcome.present += 1
            wait = min(2 * waited, MAX_CHECK_EVERY_S)
            pipe.hset(key, "waited", f"{wait:.0f}")
            pipe.hdel(key, "absent_since")
            pipe.zadd(RECONCILE_KEY, {job_id: now + wait})
        elif not entry.get("absent_since"):
            outcome.absent += 1
            pipe.hset(key, "absent_since", f"{now:.3f}")
            pipe.zadd(RECONCILE_KEY, {job_id: now + min(RECONFIRM_S, after)})
        elif _ended(app, job_id):  # its end was recorded in the backend, not here
            outcome.dropped += 1
            pipe.zrem(RECONCILE_KEY, job_id)
        elif _resend(app, client, job_id, entry):
            outcome.resent.append(job_id)
            pipe.hincrby(key, "resent", 1)
            pipe.hdel(key, "absent_since")
            pipe.zadd(RECONCILE_KEY, {job_id: now + after})
    pipe.execute()
    if outcome.resent:
        from worker.metrics import RECONCILED

        RECONCILED.inc(len(outcome.resent))
        log.warning(
            "sent %d lost job(s) again (in no queue and held by no worker): %s",
            len(outcome.resent),
            ", ".join(outcome.resent[:10]),
        )
    return outcome


def _ended(app: Any, job_id: str) -> bool:
    from celery import states

    return app.AsyncResult(job_id).state in states.READY_STATES


def _resend(app: Any, client: Any, job_id: str, entry: dict[str, str]) -> bool:
    """Send the kept message again under its id; False when it is gone (started since)."""
    kept = message(client, job_id)
    if kept is None:
        return False
    send_job(
        app,
        kept,
        job_id,
        queue=entry.get("queue") or None,
        priority=int(entry["priority"]) if entry.get("priority") else None,
    )
    return True


def check_every(after: float) -> float:
    """Seconds between two passes: RECONFIRM_S, or a quarter of a shorter `after`."""
    return max(1.0, min(RECONFIRM_S, after / 4.0))


def start_reconciler(
    app: Any, client: Any, after: float, charge_ttl: int = 3600
) -> threading.Thread:
    """A daemon thread that runs `reconcile` every `check_every(after)` seconds."""

    def loop() -> None:
        while True:
            try:
                reconcile(app, client, after=after, charge_ttl=charge_ttl)
            except Exception as exc:  # noqa: BLE001 (Redis away: the next pass tries again)
                log.warning("reconciliation pass failed: %s", exc)
            time.sleep(check_every(after))

    thread = threading.Thread(target=loop, name="actviz-reconcile", daemon=True)
    thread.start()
    return thread
