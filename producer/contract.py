"""The job contract shared by producer and worker.

Everything that crosses the queue or the object store is named here: the task
name, the job spec, the error codes, the storage key layout and the manifest
schema version. Both sides import this module; nothing else defines these.
"""

from __future__ import annotations

import dataclasses
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

TASK_NAME = "actviz.extract"
MANIFEST_VERSION = 1

# A job message carries URIs and options only; anything bigger is refused.
MAX_MESSAGE_BYTES = 64 * 1024

QUEUE_GPU = "gpu"
QUEUE_CPU = "cpu"
QUEUES = (QUEUE_GPU, QUEUE_CPU)
MAX_PRIORITY = 9

# Job states as `Job.status()` reports them.
QUEUED = "queued"
STARTED = "started"
SUCCEEDED = "succeeded"
FAILED = "failed"
FINAL_STATES = (SUCCEEDED, FAILED)

# Stages a started job reports, in order.
STAGES = ("download_model", "load", "preprocess", "forward", "render", "upload")


class ErrorCode:
    """Every error code a job can fail with. The values are the wire format."""

    INVALID_IMAGE = "invalid_image"
    IMAGE_TOO_LARGE = "image_too_large"
    MODEL_NOT_FOUND = "model_not_found"
    INVALID_MODEL = "invalid_model"
    UNSAFE_MODEL = "unsafe_model"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    UNKNOWN_LAYER = "unknown_layer"
    INVALID_JOB = "invalid_job"
    INPUT_NOT_FOUND = "input_not_found"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    WORKER_LOST = "worker_lost"
    TIME_LIMIT = "time_limit"
    STORAGE_ERROR = "storage_error"
    CANCELLED = "cancelled"
    INTERNAL = "internal"


ERROR_CODES = tuple(v for k, v in vars(ErrorCode).items() if k.isupper())

# Preprocessing scale modes and grid normalization modes.
SCALES = ("1/255", "none", "-1..1", "meanstd")
NORMALIZATIONS = ("channel", "layer", "meanstd", "percentile")

_JOB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
_KEY_PART = re.compile(r"[^A-Za-z0-9_.-]+")


def new_job_id() -> str:
    return uuid.uuid4().hex


def valid_job_id(job_id: str) -> bool:
    """A job id is one safe path segment: no '/', no '..', no control chars."""
    return bool(_JOB_ID.match(job_id)) and ".." not in job_id


def safe_key_part(name: str) -> str:
    """Turn a layer name such as 'vgg/block1_conv1' into one safe key segment."""
    cleaned = _KEY_PART.sub("_", name).strip("._")
    return cleaned or "layer"


# ---- storage key layout (relative to the store's prefix) -------------------


def input_key(sha256: str, ext: str) -> str:
    return f"inputs/{sha256}.{ext.lstrip('.').lower()}"


def job_prefix(job_id: str) -> str:
    if not valid_job_id(job_id):
        raise ValueError(f"invalid job id {job_id!r}")
    return f"jobs/{job_id}/"


def manifest_key(job_id: str) -> str:
    return job_prefix(job_id) + "manifest.json"


def error_key(job_id: str) -> str:
    return job_prefix(job_id) + "error.json"


def report_key(job_id: str) -> str:
    return job_prefix(job_id) + "index.html"


def layer_grid_name(position: int, layer_name: str) -> str:
    """Grid key relative to the job folder: 'layers/03-conv2d_1.png'."""
    return f"layers/{position:02d}-{safe_key_part(layer_name)}.png"


def batch_key(batch_id: str) -> str:
    if not valid_job_id(batch_id):
        raise ValueError(f"invalid batch id {batch_id!r}")
    return f"batches/{batch_id}/index.html"


def batch_member_key(batch_id: str, index: int, job_id: str) -> str:
    """Marker a finished job of a batch leaves: 'batches/<id>/jobs/0003-<job_id>.json'."""
    if not valid_job_id(batch_id) or not valid_job_id(job_id):
        raise ValueError(f"invalid batch or job id {batch_id!r}/{job_id!r}")
    return f"batches/{batch_id}/jobs/{index:04d}-{job_id}.json"


# ---- job spec -------------------------------------------------------------


@dataclass(frozen=True)
class JobOptions:
    """Per-job knobs. Defaults reproduce the classic recipe: x/255, viridis."""

    layers: str | list[str] | None = None
    scale: str = "1/255"
    mean: list[float] | None = None
    std: list[float] | None = None
    normalize: str = "channel"
    percentile: float = 99.0
    colormap: str = "viridis"
    top_k: int = 8
    channel_pngs: bool = False
    save_npz: bool = False
    overlay: bool = False

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobOptions:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown job options: {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass(frozen=True)
class JobSpec:
    """What the producer puts on the queue: URIs and options, never pixels."""

    job_id: str
    model: str
    image: str
    options: JobOptions = field(default_factory=JobOptions)
    enqueued_at: float = 0.0
    batch_id: str | None = None
    # Position in the batch and its size; the job that completes the batch renders its gallery.
    batch_index: int = 0
    batch_total: int = 0

    def to_message(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["options"] = self.options.to_dict()
        data["version"] = MANIFEST_VERSION
        return data

    @classmethod
    def from_message(cls, data: dict[str, Any]) -> JobSpec:
        data = dict(data)
        data.pop("version", None)
        options = JobOptions.from_dict(data.pop("options", None) or {})
        return cls(options=options, **data)
