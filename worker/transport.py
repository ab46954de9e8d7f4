"""kombu's Redis transport, with a size bound before a message is parsed.

The Redis transport pops a message and parses its JSON envelope at once:
a 60 MB message becomes gigabytes of Python objects before any check of ours
runs, and an envelope nested too deeply raises inside the consumer. Here
every message the transport reads is measured first; one above
`MAX_ENVELOPE_BYTES` is never parsed, and one that does not parse is not
delivered: either is dead-lettered (its head kept, see
worker/dead_letters.py) and the channel reports "no message".

`install()` makes this the transport of redis:// and rediss:// URLs in the
calling process (kombu's transport aliases); the worker calls it when it
builds its app, so log lines still name the broker by its URL. Producers
publish through the stock transport.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from queue import Empty
from typing import Any

from kombu.transport import redis

from producer.contract import MAX_ENVELOPE_BYTES
from worker.dead_letters import dead_letter, record

_HEAD = 1024


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


def _bounded_loads(text: Any, *args: Any, **kwargs: Any) -> Any:
    if not getattr(_reading, "active", False):
        return _parse(text, *args, **kwargs)
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


class Channel(redis.Channel):
    def _brpop_read(self, **options: Any) -> Any:
        return self._bounded(lambda: super(Channel, self)._brpop_read(**options), "")

    def _get(self, queue: str) -> Any:
        return self._bounded(lambda: super(Channel, self)._get(queue), queue)

    def _bounded(self, read: Callable[[], Any], queue: str) -> Any:
        _reading.active = True
        try:
            return read()
        except RefusedMessage as exc:
            dead_letter(self, exc.kind, record(exc.reason, queue=queue, body=exc.head))
            raise Empty() from None
        finally:
            _reading.active = False


class Transport(redis.Transport):
    Channel = Channel


def install() -> None:
    """Serve redis:// and rediss:// URLs with `Transport` in this process."""
    from kombu import transport

    for scheme in ("redis", "rediss"):
        transport.TRANSPORT_ALIASES[scheme] = f"{__name__}:Transport"
        transport._transport_cache.pop(scheme, None)
