"""kombu's Redis Sentinel transport, made to survive the failover it exists for.

On a failover, a channel whose connection was already released builds a new
connection pool to restore its unacknowledged messages, and kombu's Sentinel
channel reads the released connection's URLs there: AttributeError on None.
In a worker that ends the worker ("Unrecoverable error"); in a producer it
escapes `send_task` as a bug instead of a connection error. The channel here
keeps the connection it was opened with and lends it back for that one call.

`install()` makes this the transport of sentinel:// URLs in the calling process
(kombu's transport aliases); producers and workers both call it for sentinel://
brokers (producer/broker.py, worker/transport.py subclasses the channel).
"""

from __future__ import annotations

from typing import Any

from kombu.transport import redis


class SentinelChannel(redis.SentinelChannel):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._opened_with = self.connection.client

    def _get_pool(self, asynchronous: bool = False) -> Any:
        transport = self.connection
        if transport.client is not None or getattr(self, "_opened_with", None) is None:
            return super()._get_pool(asynchronous)
        transport.client = self._opened_with
        try:
            return super()._get_pool(asynchronous)
        finally:
            transport.client = None


class SentinelTransport(redis.SentinelTransport):
    Channel = SentinelChannel


KOMBU_SENTINEL = "kombu.transport.redis:SentinelTransport"


def install() -> None:
    """Serve sentinel:// URLs with `SentinelTransport` in this process, unless another
    of ours already serves them (the worker's, which subclasses it)."""
    from kombu import transport

    if transport.TRANSPORT_ALIASES.get("sentinel", KOMBU_SENTINEL) == KOMBU_SENTINEL:
        transport.TRANSPORT_ALIASES["sentinel"] = f"{__name__}:SentinelTransport"
        transport._transport_cache.pop("sentinel", None)
