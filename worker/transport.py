"""kombu's Redis transport, with a size bound before a message is parsed.

The Redis transport pops a message and parses its JSON envelope at once:
a 60 MB message becomes gigabytes of Python objects before any check of ours
runs, and an envelope nested too deeply raises inside the consumer. Here
every message the transport reads is measured first; one above
`MAX_ENVELOPE_BYTES` is never parsed, and one that does not parse is not
delivered: either is dead-lettered (its head kept, see
worker/dead_letters.py) and the channel reports "no message".

It also keeps the messages a live worker holds from being handed out again.
kombu records each delivered, unacknowledged message in the `unacked_index`
sorted set with the time it was delivered, and any consumer re-queues those
older than the visibility timeout. A worker SIGKILLed with jobs in hand never
acknowledges them, so the timeout is how they come back; but it must also be
longer than any job a live worker runs, or that job would run twice. Here a
heartbeat thread re-stamps, every `heartbeat_s` seconds (a transport option
from Settings.heartbeat_s), every message the process's channels hold
(running, reserved or waiting in a batch), so the timeout measures the time
since the holder was last alive, not since the job started: a short timeout
(ACTVIZ_REDELIVER_AFTER, 60 s by default, less one heartbeat and one restore
sweep) brings a dead worker's jobs back within a minute, and a live worker's
long job is never run twice. Each beat also renews the process's liveness
key (`consumer_key`, listed in CONSUMERS_KEY), by which the job registry's
reconciler learns that a consumer died and may have lost a message it had
popped (worker/jobs/reconciler.py). A process hung so hard that this thread cannot run is treated
as dead (the faulthandler backstop ends such a process too, see
worker/jobs/limits.py).

For the kill trials only, ACTVIZ_TEST_POP_DELAY_S widens the window between a
message's pop and its record as unacknowledged (kombu #305) by sleeping there;
the job registry's reconciler (worker/jobs/reconciler.py) is what brings back a
job lost in it. Never set it in production.

`install()` makes this the transport of redis:// and rediss:// URLs in the
calling process (kombu's transport aliases); the worker calls it when it
builds its app, so log lines still name the broker by its URL. Producers
publish through the stock transport.
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Callable
from queue import Empty
from typing import Any

from kombu.transport import redis

from producer import sentinel
from producer.contract import MAX_ENVELOPE_BYTES
from worker.dead_letters import dead_letter, record

_HEAD = 1024
log = logging.getLogger(__name__)


class RefusedMessage(ValueError):
    """A message read from a queue that is not parsed (too large) or does not parse."""

    def __init__(self, reason: str, kind: str, head: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.kind = kind
        self.head = head


_parse = redis.loads
# Set while one of our channels reads a message from a queue: only those reads are bounded.
_reading = threading.local()
# Test-only: seconds to wait between a message's pop and its record (see above).
_POP_DELAY_S = float(os.environ.get("ACTVIZ_TEST_POP_DELAY_S") or 0)


def _bounded_loads(text: Any, *args: Any, **kwargs: Any) -> Any:
    if not getattr(_reading, "active", False):
        return _parse(text, *args, **kwargs)
    if _POP_DELAY_S:
        time.sleep(_POP_DELAY_S)  # popped, not yet recorded: a kill here loses the message
    if len(text) > MAX_ENVELOPE_BYTES:
        reason = f"the message is {len(text)} characters, above {MAX_ENVELOPE_BYTES}; not parsed"
        raise RefusedMessage(reason, "size", str(text[:_HEAD]))
    try:
        return _parse(text, *args, **kwargs)
    except (ValueError, RecursionError) as exc:
        reason = f"the message envelope is not readable JSON: {type(exc).__name__}"
        raise RefusedMessage(reason, "format", str(text[:_HEAD])) from None


# kombu's Redis module parses every message through this one name.
redis.loads = _bounded_loads


class QoS(redis.QoS):
    def touch(self) -> int:
        """Stamp every message this channel holds as delivered now; returns how many.

        ZADD XX only updates members still present: a message acknowledged
        meanwhile (removed from the index) is not put back.
        """
        try:
            # kombu drops acknowledged tags from `_delivered` lazily: they wait in `_dirty`.
            dirty = set(self._dirty or ())
            tags = [tag for tag in list(self._delivered) if tag not in dirty]
        except RuntimeError:  # changed while read by the consumer: the next beat gets it
            return 0
        if not tags:
            return 0
        now = time.time()
        with self.channel.conn_or_acquire() as client:
            client.zadd(self.unacked_index_key, dict.fromkeys(tags, now), xx=True)
        return len(tags)


_channels: weakref.WeakSet = weakref.WeakSet()
_heartbeat: threading.Thread | None = None
_heartbeat_lock = threading.Lock()


CONSUMERS_KEY = "actviz:consumers"
LIVENESS_BEATS = 2.5  # a consumer's liveness key outlives this many missed beats, not three


def consumer_key(consumer: str) -> str:
    """Redis key that says consumer `consumer` (host:pid) is alive."""
    return f"actviz:consumer:{consumer}"


def expired_consumers(client: Any) -> list[str]:
    """Consumers listed in CONSUMERS_KEY whose liveness key expired (dead processes)."""
    members = [m.decode() if isinstance(m, bytes) else m for m in client.smembers(CONSUMERS_KEY)]
    if not members:
        return []
    pipe = client.pipeline(transaction=False)
    for member in members:
        pipe.exists(consumer_key(member))
    return [m for m, alive in zip(members, pipe.execute(), strict=True) if not alive]


def consumer_name() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _open_channels() -> list:
    """The channels of this process still open. A channel closed on a broker loss holds
    messages it can no longer acknowledge (Celery re-runs them after the visibility
    timeout): re-stamping them would keep them from ever being handed out again."""
    channels = list(_channels)
    for channel in channels:
        if getattr(channel, "closed", False):
            _channels.discard(channel)
    return [channel for channel in channels if not getattr(channel, "closed", False)]


def mark_alive(interval: float) -> None:
    """Renew this process's liveness key through the first of its channels that
    answers (a channel closed on a broker loss stays listed until collected)."""
    name = consumer_name()
    failure: Exception | None = None
    for channel in _open_channels():
        try:
            with channel.conn_or_acquire() as client:
                pipe = client.pipeline()
                pipe.set(consumer_key(name), "1", ex=math.ceil(LIVENESS_BEATS * interval))
                pipe.sadd(CONSUMERS_KEY, name)
                pipe.execute()
            return
        except Exception as exc:  # noqa: BLE001 (try the next channel)
            failure = exc
    if failure is not None:
        raise failure


def touch_all() -> int:
    """Stamp the held messages of every open channel of this process; returns how many
    (also the `actviz_jobs_held` gauge, which autoscaling adds to the queue lengths)."""
    from worker.metrics import HELD

    touched = 0
    for channel in _open_channels():
        qos = getattr(channel, "_qos", None)
        if qos is None or not hasattr(qos, "touch"):
            continue
        try:
            touched += qos.touch()
        except Exception as exc:  # noqa: BLE001 (Redis away: the next beat tries again)
            log.warning("could not renew the visibility of held messages: %s", exc)
    HELD.set(touched)
    return touched


def _beat(interval: float) -> None:
    while True:
        try:
            mark_alive(interval)
        except Exception as exc:  # noqa: BLE001 (Redis away: the next beat tries again)
            log.warning("could not renew this worker's liveness: %s", exc)
        time.sleep(interval)
        touch_all()


def _start_heartbeat(interval: float) -> None:
    global _heartbeat
    with _heartbeat_lock:
        if _heartbeat is not None and _heartbeat.is_alive():
            return
        _heartbeat = threading.Thread(
            target=_beat, args=(interval,), name="actviz-visibility", daemon=True
        )
        _heartbeat.start()


class _Ours:
    """What our channels add to kombu's Redis channels (plain and Sentinel): the
    heartbeat and the size bound."""

    QoS = QoS
    actviz_heartbeat: float | None = None  # seconds; None: a quarter of the timeout, 1 to 15

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.QoS is QoS:  # ack emulation on: messages have a visibility timeout
            _channels.add(self)
            interval = self.actviz_heartbeat or max(1.0, min(15.0, self.visibility_timeout / 4))
            _start_heartbeat(float(interval))

    def _create_client(self, asynchronous: bool = False) -> Any:
        """kombu builds a new Redis client for every acknowledgement, event and restore
        sweep (about 0.1-0.2 ms of Python each: redis-py fills its response callbacks
        anew). A client is a handle on the channel's connection pool, safe to share
        between threads, so one is kept per pool."""
        if asynchronous:
            return super()._create_client(asynchronous=True)
        pool = self.pool
        kept = self.__dict__.get("_actviz_client")
        if kept is None or kept.connection_pool is not pool:
            kept = self.__dict__["_actviz_client"] = super()._create_client()
        return kept

    def _brpop_read(self, **options: Any) -> Any:
        return self._bounded(lambda: super(_Ours, self)._brpop_read(**options), "")

    def _get(self, queue: str) -> Any:
        return self._bounded(lambda: super(_Ours, self)._get(queue), queue)

    def _bounded(self, read: Callable[[], Any], queue: str) -> Any:
        _reading.active = True
        try:
            return read()
        except RefusedMessage as exc:
            dead_letter(self, exc.kind, record(exc.reason, queue=queue, body=exc.head))
            raise Empty() from None
        finally:
            _reading.active = False


class Channel(_Ours, redis.Channel):
    from_transport_options = (*redis.Channel.from_transport_options, "actviz_heartbeat")


class SentinelChannel(_Ours, sentinel.SentinelChannel):
    from_transport_options = (*redis.SentinelChannel.from_transport_options, "actviz_heartbeat")


class Transport(redis.Transport):
    Channel = Channel


class SentinelTransport(sentinel.SentinelTransport):
    Channel = SentinelChannel


def install() -> None:
    """Serve redis://, rediss:// and sentinel:// URLs with our transports in this process."""
    from kombu import transport

    for scheme, name in (
        ("redis", "Transport"),
        ("rediss", "Transport"),
        ("sentinel", "SentinelTransport"),
    ):
        transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:{name}"
        transport._transport_cache.pop(scheme, None)
