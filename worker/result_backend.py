"""The worker's result backend: Celery's Redis backend, each state written in one round trip.

Celery's Redis backend writes a task's state (a job's stage, its SUCCESS or
FAILURE) in two round trips: a GET, so that a SUCCESS already stored is never
overwritten (by a duplicate delivery's failure, say), then a MULTI with the
SETEX and the PUBLISH that wakes the job's watchers. Another process's write
can land between the two. Here one Lua script does the three, atomically, in
one round trip: the same key, value, expiry and message, so producers,
`celery result` and Flower read what Celery's own backend would have written.

A job's stage can be written guarded by its cancel mark (`store_unless`): the
script writes nothing when the mark is there, so the stage write and the
cancel check between a job's stages are one round trip, not two.

A worker's app names these classes in `result_backend` (Celery's
`module:Class+url` form, `worker_backend_url`); producers keep Celery's.
"""

from __future__ import annotations

from typing import Any

from celery.backends.redis import RedisBackend, SentinelBackend
from celery.exceptions import BackendStoreError
from kombu.utils.encoding import bytes_to_str

# KEYS[1]: the task's key; ARGV[1]: its encoded state; ARGV[2]: seconds to keep it (0: no
# expiry). A value that is not JSON, or a group's (no status), is replaced like any other.
# KEYS[2], when given: a key whose presence stops the write (a job's cancel mark).
# Returns 1 (written), 0 (a SUCCESS is stored) or -1 (KEYS[2] exists).
_STORE_UNLESS_SUCCEEDED = """
if KEYS[2] and redis.call('EXISTS', KEYS[2]) == 1 then
  return -1
end
local current = redis.call('GET', KEYS[1])
if current then
  local ok, meta = pcall(cjson.decode, current)
  if ok and type(meta) == 'table' and meta['status'] == 'SUCCESS' then
    return 0
  end
end
local seconds = tonumber(ARGV[2])
if seconds > 0 then
  redis.call('SETEX', KEYS[1], seconds, ARGV[1])
else
  redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return 1
"""


class _OneTrip:
    """Celery's `_store_result` and `_set`, the read and the write as one script."""

    _script: Any = None

    def _store_result(
        self,
        task_id: str,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        key, value = self._state(task_id, result, state, traceback, request)
        try:
            self._set_with_state(key, value, state)
        except BackendStoreError as exc:
            raise BackendStoreError(str(exc), state=state, task_id=task_id) from exc
        return result

    def store_unless(
        self, task_id: str, result: Any, state: str, request: Any = None, *, guard: str
    ) -> bool:
        """`store_result(task_id, result, state)`, unless key `guard` exists: then nothing
        is written or announced, and it returns False. The check and the write are one
        script, one round trip (retried on connection errors as Celery's own writes)."""
        key, value = self._state(task_id, self.encode_result(result, state), state, None, request)
        return self.ensure(self._run, (key, value, self.expires, guard)) != -1

    def _state(
        self, task_id: str, result: Any, state: str, traceback: Any, request: Any
    ) -> tuple[str, Any]:
        """The task's key and its encoded state, as Celery's backend writes them."""
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = bytes_to_str(task_id)
        return self.get_key_for_task(task_id), self.encode(meta)

    def _set(self, key: str, value: Any, expires: int | None = None) -> None:
        self._run(key, value, self.expires if expires is None else expires)

    def _run(self, key: str, value: Any, expires: int | None, guard: str | None = None) -> int:
        if self._script is None:
            self._script = self.client.register_script(_STORE_UNLESS_SUCCEEDED)
        keys = [key] if guard is None else [key, guard]
        return int(self._script(keys=keys, args=[value, int(expires or 0)]))


class OneTripRedisBackend(_OneTrip, RedisBackend):
    """redis:// and rediss://."""


class OneTripSentinelBackend(_OneTrip, SentinelBackend):
    """sentinel://, Redis behind Sentinels."""


def worker_backend_url(url: str) -> str:
    """`result_backend` for a worker: these classes in front of a Redis URL, else `url`."""
    if url.startswith(("redis://", "rediss://")):
        return f"{__name__}:OneTripRedisBackend+{url}"
    if url.startswith("sentinel://"):
        return f"{__name__}:OneTripSentinelBackend+{url}"
    return url
