"""Messages a worker refuses to run: kept for an operator, counted, logged once.

A message that is not a well-formed actviz job (see worker/consumer.py), or
that is too large to parse (see worker/transport.py), is acknowledged so that
it never comes back, and a record of it is pushed on the Redis list
`actviz:dead-letters` (newest first, the last `KEPT` kept). A record holds
why it was refused, when, from which queue, its headers and its body (cut
to `BODY_KEPT` characters), so a job refused by mistake can be resubmitted.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from worker.metrics import MESSAGES_REFUSED

log = logging.getLogger(__name__)

KEY = "actviz:dead-letters"
KEPT = 1000
BODY_KEPT = 64 * 1024


def record(reason: str, *, queue: str = "", headers: Any = None, body: Any = None) -> dict:
    """The JSON-ready dead-letter record of one refused message."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", errors="replace")
    text = "" if body is None else str(body)
    return {
        "reason": reason,
        "at": time.time(),
        "queue": queue,
        "headers": _safe(headers),
        "body": text[:BODY_KEPT],
        "body_chars": len(text),
    }


def dead_letter(channel: Any, kind: str, entry: dict) -> None:
    """Count, log and keep one refused message.

    `channel`: the kombu channel it came from; kept only on a Redis broker.
    `kind` is the metric label (a few fixed words); the log line shows the
    reason and the message id with repr(), so no message can forge log lines.
    """
    MESSAGES_REFUSED.labels(reason=kind).inc()
    headers = entry.get("headers") or {}
    log.warning(
        "refused a message from queue %r (task %r, id %r): %s",
        entry.get("queue", ""),
        headers.get("task"),
        headers.get("id"),
        entry["reason"],
    )
    acquire = getattr(channel, "conn_or_acquire", None)  # kombu's Redis channel only
    if acquire is None:
        return
    try:
        with acquire() as client, client.pipeline() as pipe:
            pipe.lpush(KEY, json.dumps(entry, default=str))
            pipe.ltrim(KEY, 0, KEPT - 1)
            pipe.execute()
    except Exception as exc:  # noqa: BLE001 (the refusal itself must not fail)
        log.error("could not keep the refused message on %s: %s", KEY, exc)


def _safe(headers: Any) -> dict[str, Any]:
    if not isinstance(headers, dict):
        return {}
    return {
        str(k)[:64]: (v if isinstance(v, (int, float, bool)) or v is None else str(v)[:512])
        for k, v in list(headers.items())[:64]
    }
