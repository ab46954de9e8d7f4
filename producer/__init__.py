"""actviz producer: submit (model, image) jobs and read their results.

This package never imports TensorFlow; `pip install actviz` is enough for it.
"""

from producer.client import Client, Job, JobState, Result
from producer.contract import ErrorCode, JobOptions, JobSpec
from producer.errors import (
    ActvizError,
    InputNotFound,
    InvalidJob,
    JobFailed,
    JobNotFound,
    ModelNotAllowed,
    ModelNotFound,
    PayloadTooLarge,
    StorageUnavailable,
    TransientError,
)
from producer.settings import Settings

__all__ = [
    "ActvizError",
    "Client",
    "ErrorCode",
    "InputNotFound",
    "InvalidJob",
    "Job",
    "JobFailed",
    "JobNotFound",
    "JobOptions",
    "JobSpec",
    "JobState",
    "ModelNotAllowed",
    "ModelNotFound",
    "PayloadTooLarge",
    "Result",
    "Settings",
    "StorageUnavailable",
    "TransientError",
]
