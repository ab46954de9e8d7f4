"""Every exception actviz raises, in one place.

`ActvizError` and its subclasses are *permanent*: the input is bad and a retry
cannot help, so a job that raises one fails at once with `.code`.
`TransientError` is the other family: the world blipped (storage, broker), and
the task retries with backoff.
"""

from __future__ import annotations

from typing import Any

from producer.contract import ErrorCode


class ActvizError(Exception):
    """A permanent, user-caused failure with a stable error code."""

    code: str = ErrorCode.INTERNAL

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class InvalidImage(ActvizError):
    code = ErrorCode.INVALID_IMAGE


class ImageTooLarge(ActvizError):
    code = ErrorCode.IMAGE_TOO_LARGE


class ActivationsTooLarge(ActvizError):
    """One image's activations (at the model's input size) exceed the worker's bound."""

    code = ErrorCode.ACTIVATIONS_TOO_LARGE


class ModelNotFound(ActvizError):
    code = ErrorCode.MODEL_NOT_FOUND


class InvalidModel(ActvizError):
    code = ErrorCode.INVALID_MODEL


class UnsafeModel(ActvizError):
    code = ErrorCode.UNSAFE_MODEL


class ModelNotAllowed(ActvizError):
    code = ErrorCode.MODEL_NOT_ALLOWED


class UnknownLayer(ActvizError):
    code = ErrorCode.UNKNOWN_LAYER


class InvalidJob(ActvizError):
    code = ErrorCode.INVALID_JOB


class ConfigurationError(ActvizError):
    """The settings cannot work as given (a missing package, a bad URL); nothing was queued."""

    code = ErrorCode.INVALID_CONFIG


class InputNotFound(ActvizError):
    code = ErrorCode.INPUT_NOT_FOUND


class PayloadTooLarge(ActvizError):
    code = ErrorCode.PAYLOAD_TOO_LARGE


class WorkerLost(ActvizError):
    """The job's worker stopped on every delivery (out of memory, crash, hard time limit)."""

    code = ErrorCode.WORKER_LOST


class TimeLimit(ActvizError):
    """The job ran past the soft time limit."""

    code = ErrorCode.TIME_LIMIT


class StorageError(ActvizError):
    """Storage stayed unreachable through every retry."""

    code = ErrorCode.STORAGE_ERROR


class Cancelled(ActvizError):
    """The job was revoked before it finished."""

    code = ErrorCode.CANCELLED


class NotDifferentiable(ActvizError):
    """Grad-CAM needs the gradient of a class score, and the model's head gives none
    (an integer output, an argmax, a cast): the message names what stops it."""

    code = ErrorCode.NOT_DIFFERENTIABLE


class QueueFull(ActvizError):
    """The broker refused the job: Redis is at its `maxmemory` and evicts nothing. The
    job was not queued (and not registered); submit it again once there is room."""

    code = ErrorCode.QUEUE_FULL


class BrokerUnavailable(ActvizError):
    """The broker did not answer a submit for ACTVIZ_SUBMIT_RETRY_S; nothing was queued."""

    code = ErrorCode.BROKER_UNAVAILABLE


class Internal(ActvizError):
    """A fault of actviz itself; the message names the exception."""

    code = ErrorCode.INTERNAL


class JobFailed(ActvizError):
    """Raised by `Job.wait()` when the job ended `failed`."""

    def __init__(self, job_id: str, code: str, message: str) -> None:
        super().__init__(message, code=code)
        self.job_id = job_id


class JobNotFound(LookupError):
    """Storage holds neither a manifest nor an error.json for the job (yet)."""


class TransientError(Exception):
    """A fault outside the input (storage or broker unreachable, throttled).

    The task retries these with exponential backoff and jitter.
    """


class StorageUnavailable(TransientError):
    pass


class HelperUnavailable(TransientError):
    """A worker's helper process (the quarantine process) did not start in time.

    The job is retried like any fault of the world; through every retry it fails
    with worker_lost, since no process could be found to run it.
    """


# Storage's own outcomes, which callers map to job errors (input_not_found, ...).
class ObjectNotFound(LookupError):
    """The key (or URI) does not exist in storage."""


class ObjectTooLarge(ValueError):
    """An object is larger than the caller's limit; `size` is its size in bytes (or more)."""

    def __init__(self, uri: str, size: int) -> None:
        super().__init__(f"{uri} is {size} bytes")
        self.uri, self.size = uri, size


def _error_classes() -> dict[str, type[ActvizError]]:
    found: dict[str, type[ActvizError]] = {}
    pending = [ActvizError]
    while pending:
        cls = pending.pop()
        pending.extend(cls.__subclasses__())
        if cls not in (ActvizError, JobFailed):
            found[cls.code] = cls
    return found


_BY_CODE = _error_classes()


def error_class(code: str) -> type[ActvizError]:
    """The class of an error code (ActvizError itself for a code this version lacks)."""
    return _BY_CODE.get(code, ActvizError)


def error_from_dict(data: dict[str, Any]) -> ActvizError:
    """Rebuild a typed error from its wire form {code, message}."""
    code = str(data.get("code", ErrorCode.INTERNAL))
    return error_class(code)(str(data.get("message", "")), code=code)


def transient_errors() -> tuple[type[BaseException], ...]:
    """The faults of the world, not of the input, that a job retries with backoff.

    The one classification: storage wraps its own (5xx, throttling, connection
    faults) as StorageUnavailable; the broker's and Redis's connection errors
    arrive as their own classes.
    """
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError
    from redis.exceptions import TimeoutError as RedisTimeoutError

    return (TransientError, RedisConnectionError, RedisTimeoutError, OperationalError)
