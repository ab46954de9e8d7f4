"""Structured worker logs: one JSON object per line, the job id on every line of a job.

    configure_logging(settings)      # once per process, before the first job
    with job_context(spec.job_id):   # around the work of one job
        log.info("forward pass", extra={"images": 8})

A line logged inside `job_context` carries `job_id`, whichever logger wrote it
(ours, Celery's, boto3's). URL credentials ('redis://:secret@host') are masked
in every message and extra field before anything is written.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from producer.settings import Settings

_job_id: ContextVar[str | None] = ContextVar("actviz_job_id", default=None)

# Attributes every LogRecord has; anything else on a record came from `extra=`.
_RECORD_FIELDS = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message",
    "asctime",
    "job_id",
}
# Greedy to the last '@' before the path: a password may hold '@' and ':'.
_URL_USERINFO = re.compile(r"\b([a-z][a-z0-9+.-]*://)[^/\s]+@", re.IGNORECASE)
# The passwords of this process's own URLs (Settings.secrets), masked wherever they appear.
_secrets: tuple[str, ...] = ()
_PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(job_id)s] %(message)s"


def current_job_id() -> str | None:
    """The job id of the code running now, or None outside a job."""
    return _job_id.get()


@contextmanager
def job_context(job_id: str) -> Iterator[None]:
    """Tag every log line written inside the block with `job_id`."""
    token = _job_id.set(job_id)
    try:
        yield
    finally:
        _job_id.reset(token)


def mask_credentials(text: str) -> str:
    """'connect redis://:pw@h:6379/0' -> 'connect redis://***@h:6379/0'.

    Also replaces every known secret (see `configure_logging`) with '***'.
    """
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    return _URL_USERINFO.sub(lambda m: m.group(1) + "***@", text)


class JobContextFilter(logging.Filter):
    """Adds `record.job_id` (None outside a job) and masks credentials in the message."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = _job_id.get()
        message = record.getMessage()
        masked = mask_credentials(message)
        if masked != message:
            record.msg, record.args = masked, None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts (UTC ISO-8601), level, logger, message, job_id, extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": _utc_iso(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None)
        if job_id:
            entry["job_id"] = job_id
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and not key.startswith("_"):
                entry[key] = _jsonable(value)
        if record.exc_info:
            entry["exc_info"] = mask_credentials(self.formatException(record.exc_info))
        return json.dumps(entry, ensure_ascii=False, default=str)


class PlainFormatter(logging.Formatter):
    """Human-readable lines for a terminal; '-' where there is no job."""

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "job_id", None) is None:
            record.job_id = "-"
        return mask_credentials(super().format(record))


def _utc_iso(created: float) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        + f".{int(created % 1 * 1000):03d}Z"
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, str):
        return mask_credentials(value)
    if isinstance(value, (int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return mask_credentials(str(value))


def configure_logging(settings: Settings, stream: Any = None) -> logging.Handler:
    """Route the root logger to one stderr handler (JSON when settings.log_json).

    Idempotent: calling it again replaces the handler it installed before.
    Returns the handler (tests read what it wrote through `stream`).
    """
    global _secrets
    # Longest first, so a password that contains another is masked whole.
    _secrets = tuple(sorted(settings.secrets(), key=len, reverse=True))
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_actviz", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler._actviz = True  # type: ignore[attr-defined]
    handler.addFilter(JobContextFilter())
    handler.setFormatter(JsonFormatter() if settings.log_json else PlainFormatter(_PLAIN_FORMAT))
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
    return handler
