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


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidImage,
        ImageTooLarge,
        ActivationsTooLarge,
        ModelNotFound,
        InvalidModel,
        UnsafeModel,
        ModelNotAllowed,
        UnknownLayer,
        InvalidJob,
        ConfigurationError,
        InputNotFound,
        PayloadTooLarge,
        WorkerLost,
    )
}


def error_from_dict(data: dict[str, Any]) -> ActvizError:
    """Rebuild a typed error from its wire form {code, message}."""
    code = str(data.get("code", ErrorCode.INTERNAL))
    cls = _BY_CODE.get(code, ActvizError)
    return cls(str(data.get("message", "")), code=code)
