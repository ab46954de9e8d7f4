"""actviz producer: submit (model, image) jobs and read their results.

This package never imports TensorFlow; `pip install actviz` is enough for it.
"""

from producer.contract import ErrorCode, JobOptions, JobSpec
from producer.errors import ActvizError, JobFailed, TransientError
from producer.settings import Settings

__all__ = [
    "ActvizError",
    "ErrorCode",
    "JobFailed",
    "JobOptions",
    "JobSpec",
    "Settings",
    "TransientError",
]
