"""kombu's Redis transport, with a size bound before a message is parsed.

The Redis transport pops a message and parses its JSON envelope at once:
a 60 MB message becomes gigabytes of Python objects before any check of ours
runs. Here every message the transport reads is measured first; one above
`MAX_ENVELOPE_BYTES` is never parsed: it is dead-lettered (its head kept,
see worker/dead_letters.py) and the channel reports "no message".

Used by the worker only (`broker_transport` in worker/app.py, for redis://
and rediss:// brokers); producers publish through the stock transport.
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


class MessageTooLarge(ValueError):
    def __init__(self, size: int, head: str) -> None:
        super().__init__(f"message of {size} characters")
        self.size = size
        self.head = head


_parse = redis.loads
# Set while one of our channels reads a message from a queue: only those reads are bounded.
_reading = threading.local()


def _bounded_loads(text: Any, *args: Any, **kwargs: Any) -> Any:
    if getattr(_reading, "active", False) and len(text) > MAX_ENVELOPE_BYTES:
        raise MessageTooLarge(len(text), str(text[:_HEAD]))
    return _parse(text, *args, **kwargs)


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
        except MessageTooLarge as exc:
            self._refuse(exc, queue)
            raise Empty() from None
        finally:
            _reading.active = False

    def _refuse(self, exc: MessageTooLarge, queue: str) -> None:
        reason = f"the message is {exc.size} characters, above {MAX_ENVELOPE_BYTES}; not parsed"
        dead_letter(self, "size", record(reason, queue=queue, body=exc.head))


class Transport(redis.Transport):
    Channel = Channel
