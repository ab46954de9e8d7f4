"""A batch's progress in Redis: what workers record and what a waiting producer reads.

Workers record each job of a batch once when it starts and once when it ends
(`record_start`, `record_end`); the producer that submitted the batch wrote its
total (`record_total`). A producer waiting on the batch then asks Redis a fixed
number of questions per refresh, whatever the batch's size (`read_progress`):
the counts, and the ids of the jobs that finished since its last look. Its
cost per refresh is O(1) plus O(jobs newly finished), never O(jobs pending),
and storage is read once per finished job, never polled.

Without Redis (the embedded mode) nothing is recorded; callers fall back to
asking each job (and workers to storage markers, worker/jobs/batches.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from producer.contract import batch_progress_keys


@dataclass
class BatchProgress:
    """One look at a batch: counts, and the ids finished since `cursor` (in order)."""

    total: int
    started: int
    succeeded: int
    failed: int
    finished_ids: list[str] = field(default_factory=list)
    cursor: int = 0  # pass back to read_progress to get only newer ids

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed

    @property
    def running(self) -> int:
        return max(0, self.started - self.finished)

    @property
    def queued(self) -> int:
        return max(0, self.total - max(self.started, self.finished))


def record_total(client: Any, batch_id: str, total: int, ttl: int) -> None:
    counts, started, done = batch_progress_keys(batch_id)
    pipe = client.pipeline()
    pipe.hset(counts, "total", total)
    for key in (counts, started, done):
        pipe.expire(key, ttl)
    pipe.execute()


def forget_batch(client: Any, batch_id: str) -> None:
    """Drop a batch's progress (a census submitted again starts its counts anew)."""
    counts, started, done = batch_progress_keys(batch_id)
    client.delete(counts, started, done, f"{counts}:finished", f"{counts}:jobs")


def record_jobs(client: Any, batch_id: str, job_ids: list[str], ttl: int) -> None:
    """The batch's job ids, in submission order (for cancelling a whole batch)."""
    key = f"{batch_progress_keys(batch_id)[0]}:jobs"
    pipe = client.pipeline()
    pipe.rpush(key, *job_ids)
    pipe.expire(key, ttl)
    pipe.execute()


def batch_jobs(client: Any, batch_id: str) -> list[str]:
    """The job ids `record_jobs` kept for the batch (empty for an unknown batch)."""
    return [_text(i) for i in client.lrange(f"{batch_progress_keys(batch_id)[0]}:jobs", 0, -1)]


def record_start(client: Any, batch_id: str, job_id: str, ttl: int) -> None:
    _, started, _ = batch_progress_keys(batch_id)
    pipe = client.pipeline()
    pipe.sadd(started, job_id)
    pipe.expire(started, ttl)
    pipe.execute()


# One step: a worker killed anywhere around it leaves the end either unrecorded (the
# job's next delivery records it) or recorded with all that follows from it. As two
# steps, a worker killed after the first left the job counted as ended but not in the
# count, or the batch's last end recorded with its finalization never marked pending:
# a census whose page was never written.
_END = """
if redis.call('sadd', KEYS[3], ARGV[1]) == 0 then return -1 end
local length = redis.call('rpush', KEYS[2], ARGV[2])
redis.call('hincrby', KEYS[1], ARGV[3], 1)
for i = 1, 3 do redis.call('expire', KEYS[i], ARGV[4]) end
if ARGV[6] ~= '' and length == tonumber(ARGV[5]) then
  redis.call('set', KEYS[4], ARGV[6], 'EX', ARGV[4])
  redis.call('sadd', KEYS[5], ARGV[7])
end
return length
"""


def record_end(
    client: Any,
    batch_id: str,
    index: int,
    job_id: str,
    succeeded: bool,
    ttl: int,
    total: int = 0,
    finalize: str = "",
) -> int:
    """Count job `index` of the batch as finished; returns how many have finished.

    A job is counted once (a set of finished ids guards the count), and each
    count is returned to exactly one caller, so exactly one caller sees the last.
    With `finalize` (a small JSON text, see `pending_finalizations`) the end that
    makes `total` marks the batch's finalization pending in the same atomic step.
    Returns -1 for a job recorded already.
    """
    counts, _, done = batch_progress_keys(batch_id)
    key, _ = _finalize_keys(batch_id)
    keys = (counts, done, f"{counts}:finished", key, PENDING_FINALIZE)
    state = "succeeded" if succeeded else "failed"
    args = (job_id, f"{index}:{job_id}", state, ttl, total, finalize, batch_id)
    return int(client.eval(_END, len(keys), *keys, *args))


def finished_jobs(client: Any, batch_id: str, cursor: int = 0) -> list[tuple[int, str]]:
    """(index, job id) of the jobs finished after position `cursor`, in the order they did."""
    _, _, done = batch_progress_keys(batch_id)
    return [_entry(item) for item in client.lrange(done, cursor, -1)]


def _entry(item: Any) -> tuple[int, str]:
    index, _, job_id = _text(item).partition(":")
    return int(index), job_id


def read_progress(client: Any, batch_id: str, cursor: int = 0) -> BatchProgress | None:
    """The batch's counts and the ids finished after position `cursor`; None if unknown."""
    counts, started, done = batch_progress_keys(batch_id)
    pipe = client.pipeline()
    pipe.hgetall(counts)
    pipe.scard(started)
    pipe.lrange(done, cursor, -1)
    values, started_count, new_ids = pipe.execute()
    if not values:
        return None
    values = {_text(k): int(v) for k, v in values.items()}
    ids = [_entry(item)[1] for item in new_ids]
    return BatchProgress(
        total=values.get("total", 0),
        started=int(started_count),
        succeeded=values.get("succeeded", 0),
        failed=values.get("failed", 0),
        finished_ids=ids,
        cursor=cursor + len(ids),
    )


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# ---- a batch's finalization (gallery, census fold, diff summary) ------------------
#
# The worker that records a batch's last end writes what follows it on a thread of its
# own. If that worker dies first, the batch stays marked pending here, and any worker's
# sweep takes it over once the dead one's lease on it has expired
# (worker/jobs/batches.py). Exactly one worker holds the lease at a time.

PENDING_FINALIZE = "actviz:finalize:pending"


def _finalize_keys(batch_id: str) -> tuple[str, str]:
    base = batch_progress_keys(batch_id)[0]
    return f"{base}:finalize", f"{base}:finalize:lease"


def claim_finalize(client: Any, batch_id: str, owner: str, lease_s: int) -> str | None:
    """Take the lease on the batch's finalization; its `what`, or None (someone holds
    the lease, or nothing is pending)."""
    key, lease = _finalize_keys(batch_id)
    what = client.get(key)
    if what is None:
        client.srem(PENDING_FINALIZE, batch_id)
        return None
    if not client.set(lease, owner, nx=True, ex=lease_s):
        return None
    return _text(what)


_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('expire', KEYS[1], ARGV[2]) else return 0 end"
)


def renew_finalize(client: Any, batch_id: str, owner: str, lease_s: int) -> bool:
    """Extend the lease while `owner` still holds it."""
    _, lease = _finalize_keys(batch_id)
    return bool(client.eval(_RENEW, 1, lease, owner, lease_s))


def finish_finalize(client: Any, batch_id: str) -> None:
    key, lease = _finalize_keys(batch_id)
    pipe = client.pipeline()
    pipe.delete(key, lease)
    pipe.srem(PENDING_FINALIZE, batch_id)
    pipe.execute()


def pending_finalizations(client: Any) -> list[str]:
    return sorted(_text(item) for item in client.smembers(PENDING_FINALIZE))
