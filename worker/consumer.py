"""The consumer's gate: only a well-formed actviz job message reaches the task.

Celery's consumer looks a message's task up by its `task` header and builds
a request from its body. Left alone, a body of the wrong shape (valid JSON
that is not `[args, kwargs, embed]`) raises inside the consumer and stops the
worker with the message still on the queue, so every worker that takes it
dies the same way; and any task Celery registers itself (`celery.chord_unlock`,
`celery.accumulate`, ...) can be called from the queue.

`Consumer` (Celery's `worker_consumer` setting) checks each message first
(`refusal`): our task name, a job id that is one safe path segment, JSON
content, a bounded body of the shape our producer sends, and no canvas
(callbacks, chains, chords), and no ETA beyond the retries' backoff. A message that fails is dead-lettered
(worker/dead_letters.py) and acknowledged; the worker goes on. The job's own
fields are checked later, by the task, against the contract.

Celery's remote control ("pidbox") is a fanout channel on the same broker, so
whoever can queue a job can also broadcast `shutdown`, `cancel_consumer` or
`revoke` to every worker. `Control` answers only the commands that read
(`ANSWERED_COMMANDS`: ping, stats, active, ..., and enable_events); any other is refused with
an error reply, counted and logged. The in-process `memory://` broker, which
only its own process can write, keeps every command (it cancels by `revoke`).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.consumer.control import Control as CeleryControl
from vine import promise

from producer.contract import MAX_ENVELOPE_BYTES, TASK_NAME, valid_job_id
from worker.dead_letters import dead_letter, log, record
from worker.metrics import MESSAGES_REFUSED

JSON = "application/json"
_KNOWN_TYPES = {
    "application/x-python-serialize": "pickle",
    "application/x-yaml": "yaml",
    "application/x-msgpack": "msgpack",
}
# Headers our producer leaves empty; a value in one would chain or group work.
_EMPTY_HEADERS = ("group", "chord")
# A retry of a transient fault comes back with an ETA (backoff of at most 60 s); a worker
# holds ETA messages in memory until they are due, so a far one is refused.
MAX_ETA_S = 900
_EMPTY_EMBED = ("callbacks", "errbacks", "chain", "chord")
# The remote-control commands a worker answers: those that only read its state, and
# cheaply, plus `enable_events`, which Flower sends every worker it sees to get task
# events (off unless asked, ACTVIZ_TASK_EVENTS). Refused among the reading ones: `conf`
# and `report` print settings, `memdump`/`objgraph` cost seconds, `hello` merges revoked ids.
ANSWERED_COMMANDS = frozenset(
    {
        "enable_events",
        "ping",
        "stats",
        "active",
        "active_queues",
        "clock",
        "registered",
        "reserved",
        "revoked",
        "scheduled",
        "query_task",
    }
)


def refusal(headers: Any, content_type: str | None, body: Any) -> tuple[str, str] | None:
    """(metric label, reason) when a message must not reach the task, else None."""
    if not isinstance(headers, dict):
        return "format", "the message has no protocol-2 headers"
    if headers.get("task") != TASK_NAME:
        return "task", f"task {str(headers.get('task'))[:80]!r} is not {TASK_NAME}"
    if not valid_job_id(headers.get("id")):
        return "id", "the task id is not one safe path segment (letters, digits, _ . -)"
    if content_type != JSON:
        name = _KNOWN_TYPES.get(str(content_type), "")
        return "content", (
            f"content type {str(content_type)[:80]!r}{f' ({name})' if name else ''} is "
            f"untrusted content; only {JSON} is accepted"
        )
    for name in _EMPTY_HEADERS:
        if headers.get(name) not in (None, [], {}):
            return "format", f"header {name!r} is not accepted on a job message"
    if not _near(headers.get("eta")):
        return "format", f"an ETA more than {MAX_ETA_S} s ahead is not accepted"
    size = len(body) if isinstance(body, (bytes, str)) else 0
    if size > MAX_ENVELOPE_BYTES:
        return "size", f"the body is {size} bytes, above {MAX_ENVELOPE_BYTES}"
    return _body_refusal(body)


def _near(eta: Any) -> bool:
    """True for no ETA, or an ISO-8601 time at most MAX_ETA_S from now."""
    if eta is None:
        return True
    try:
        when = datetime.fromisoformat(str(eta))
    except ValueError:
        return False
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return (when - datetime.now(UTC)).total_seconds() <= MAX_ETA_S


def _body_refusal(body: Any) -> tuple[str, str] | None:
    try:
        decoded = json.loads(body)
    except (TypeError, ValueError, RecursionError):
        return "format", "the body is not JSON (or nests too deeply)"
    if not (isinstance(decoded, list) and len(decoded) == 3):
        return "format", "the body is not [args, kwargs, embed]"
    args, kwargs, embed = decoded
    if not (isinstance(args, list) and isinstance(kwargs, dict) and isinstance(embed, dict)):
        return "format", "the body is not [args, kwargs, embed]"
    if not ((len(args) == 1 and not kwargs) or (not args and set(kwargs) == {"message"})):
        return "format", "the task takes exactly one argument, the job message"
    for name in _EMPTY_EMBED:
        if embed.get(name) not in (None, [], {}):
            return "format", f"{name!r} is not accepted on a job message"
    return None


class _AnsweringPanel(dict):
    """Celery's remote-control handlers, ANSWERED_COMMANDS only; any other name refuses."""

    def __missing__(self, name: Any) -> Any:
        return lambda state, **_: _refuse_command(name)


def _refuse_command(name: Any) -> dict[str, str]:
    _count_refusal(f"command {str(name)[:80]!r} refused: only commands that read are answered")
    return {"error": f"remote control command {str(name)[:80]!r} is refused by actviz"}


def _count_refusal(what: str) -> None:
    MESSAGES_REFUSED.labels(reason="control").inc()
    log.warning("remote control %s", what)


def control_refusal(body: Any) -> str | None:
    """Why a remote-control message is not of the shape Celery's clients send, else None.

    Celery's pidbox resets its consumer on a message it cannot dispatch (a body that is
    not an object), and a reset consumer heard no later command here.
    """
    if not isinstance(body, dict):
        return "the body is not an object"
    if not isinstance(body.get("method"), str):
        return "the command name is not a string"
    if not isinstance(body.get("arguments") or {}, dict):
        return "the arguments are not an object"
    destination = body.get("destination")
    if destination is not None and not (
        isinstance(destination, list) and all(isinstance(d, str) for d in destination)
    ):
        return "the destination is not a list of names"
    if body.get("matcher") not in (None, "glob"):  # 'pcre' compiles the sender's regex
        return "only glob patterns select workers"
    reply_to = body.get("reply_to")
    if reply_to is not None and not (
        isinstance(reply_to, dict)
        and all(isinstance(reply_to.get(k), str) for k in ("exchange", "routing_key"))
    ):
        return "reply_to is not an exchange and routing key"
    return None


def answering_panel(handlers: dict[str, Any]) -> dict[str, Any]:
    """`handlers` (name -> function) with only ANSWERED_COMMANDS; the rest refuse."""
    return _AnsweringPanel({k: v for k, v in handlers.items() if k in ANSWERED_COMMANDS})


class Control(CeleryControl):
    """Celery's remote-control step, answering only ANSWERED_COMMANDS off `memory://`."""

    def __init__(self, c: Any, **kwargs: Any) -> None:
        super().__init__(c, **kwargs)
        if not str(c.app.conf.broker_url or "").startswith("memory://"):
            box = self.box
            box.node.handlers = answering_panel(box.node.handlers)
            dispatch = box.on_message

            def on_message(body: Any, message: Any) -> None:
                refused = control_refusal(body)
                if refused is None:
                    return dispatch(body, message)
                _count_refusal(f"message refused: {refused}")
                return None

            box.on_message = on_message  # what Pidbox.start subscribes


class Consumer(CeleryConsumer):
    """Celery's consumer with `refusal` in front of every task message."""

    class Blueprint(CeleryConsumer.Blueprint):
        default_steps = [
            "worker.consumer:Control" if step.endswith(":Control") else step
            for step in CeleryConsumer.Blueprint.default_steps
        ]

    def create_task_handler(self, promise: Any = promise) -> Any:
        handle = super().create_task_handler(promise)

        def on_task_received(message: Any) -> Any:
            refused = refusal(message.headers, message.content_type, message.body)
            if refused is not None:
                return self._refuse(message, *refused)
            try:
                return handle(message)
            except Exception as exc:  # noqa: BLE001 (a message must never stop the consumer)
                if getattr(message, "acknowledged", False):
                    raise
                return self._refuse(message, "format", f"unreadable: {type(exc).__name__}: {exc}")

        return on_task_received

    def _refuse(self, message: Any, kind: str, reason: str) -> None:
        queue = (message.delivery_info or {}).get("routing_key", "")
        entry = record(reason, queue=str(queue), headers=message.headers, body=message.body)
        dead_letter(getattr(message, "channel", None), kind, entry)
        message.ack_log_error(log, self.connection_errors)
