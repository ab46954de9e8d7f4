"""The job contract shared by producer and worker.

Everything that crosses the queue or the object store is named here: the task
name, the job spec, the error codes, the storage key layout and the manifest
schema version. Both sides import this module; nothing else defines these.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import uuid
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from producer.colormaps import COLORMAPS

TASK_NAME = "actviz.extract"


class JobKind(StrEnum):
    """What a job computes; each kind is one module under worker/jobs/."""

    ACTIVATIONS = "activations"
    GRADCAM = "gradcam"
    DIFF = "diff"


JOB_KINDS = tuple(kind.value for kind in JobKind)


def check_kind(kind: Any) -> str:
    """`kind` if it names a job kind; raises ValueError otherwise."""
    if kind not in JOB_KINDS:
        raise ValueError(f"kind {kind!r} unknown; use one of {', '.join(JOB_KINDS)}")
    return kind


MANIFEST_VERSION = 1

# A job message carries URIs and options only; anything bigger is refused.
MAX_MESSAGE_BYTES = 64 * 1024
# A whole broker message (Celery's envelope, headers and the encoded job): a worker
# drops anything larger before parsing it.
MAX_ENVELOPE_BYTES = 2**20
MAX_URI_CHARS = 2048
MAX_BATCH_JOBS = 1_000_000
MAX_IMAGE_NAME_CHARS = 255

QUEUE_GPU = "gpu"
QUEUE_CPU = "cpu"
QUEUES = (QUEUE_GPU, QUEUE_CPU)
MAX_PRIORITY = 9


# Job states as `Job.status()` reports them.
class JobStatus(StrEnum):
    """A job's state as `Job.status()` reports it."""

    QUEUED = "queued"
    STARTED = "started"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    # No producer registered the id, no worker stored a state, storage has nothing.
    UNKNOWN = "unknown"


QUEUED, STARTED, SUCCEEDED, FAILED, UNKNOWN = JobStatus
FINAL_STATES = (SUCCEEDED, FAILED)


class Progress(StrEnum):
    """The stages a started job reports (`Job.state().stage`), in order."""

    LOADING_MODEL = "loading model"
    FORWARD = "forward"
    RENDERING = "rendering"
    UPLOADING = "uploading"


# Stages each job times (manifest["timings_ms"], actviz_stage_seconds{stage}).
TIMED_STAGES = ("download_model", "load", "preprocess", "forward", "render", "report", "upload")


class ErrorCode(StrEnum):
    """Every error code a job can fail with. The values are the wire format.

    Each has its class in producer/errors.py.
    """

    INVALID_IMAGE = "invalid_image"
    IMAGE_TOO_LARGE = "image_too_large"
    ACTIVATIONS_TOO_LARGE = "activations_too_large"
    MODEL_NOT_FOUND = "model_not_found"
    INVALID_MODEL = "invalid_model"
    UNSAFE_MODEL = "unsafe_model"
    MODEL_NOT_ALLOWED = "model_not_allowed"
    UNKNOWN_LAYER = "unknown_layer"
    INVALID_JOB = "invalid_job"
    INVALID_CONFIG = "invalid_config"
    INPUT_NOT_FOUND = "input_not_found"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    WORKER_LOST = "worker_lost"
    TIME_LIMIT = "time_limit"
    STORAGE_ERROR = "storage_error"
    CANCELLED = "cancelled"
    NOT_DIFFERENTIABLE = "not_differentiable"
    QUEUE_FULL = "queue_full"
    BROKER_UNAVAILABLE = "broker_unavailable"
    INTERNAL = "internal"


ERROR_CODES = tuple(code.value for code in ErrorCode)

# Preprocessing scale modes and grid normalization modes. 'auto' is 'none' for a model
# that takes pixel values 0..255 (it rescales its own input, or takes uint8), what
# preprocess_input makes of them for Keras's applications that leave it outside the
# model, and the classic '1/255' for any other (worker/engine/input_scale.py). 'caffe'
# is VGG's and ResNet's: BGR order, ImageNet's means subtracted.
SCALES = ("auto", "1/255", "none", "-1..1", "meanstd", "caffe")
NORMALIZATIONS = ("channel", "layer", "meanstd", "percentile")

_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_KEY_PART = re.compile(r"[^A-Za-z0-9_.-]+")


def new_job_id() -> str:
    return uuid.uuid4().hex


def valid_job_id(job_id: str) -> bool:
    """A job id is one safe path segment: no '/', no '..', no control chars."""
    return isinstance(job_id, str) and bool(_JOB_ID.fullmatch(job_id)) and ".." not in job_id


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


# Names inside a job folder.
MANIFEST_FILE = "manifest.json"  # written last: its presence means the job is complete
ERROR_FILE = "error.json"
REPORT_FILE = "index.html"
DEPTH_CHART_FILE = "depth.svg"
INPUT_FILE = "input.png"  # the image as the model saw it, before scaling
DIFF_FILE = "diff.json"  # a diff job's comparison (also in its manifest)
ACTIVATIONS_FILE = "activations.npz"
GRADCAM_DIR = "gradcam/"


def manifest_key(job_id: str) -> str:
    return job_prefix(job_id) + MANIFEST_FILE


def error_key(job_id: str) -> str:
    return job_prefix(job_id) + ERROR_FILE


def report_key(job_id: str) -> str:
    return job_prefix(job_id) + REPORT_FILE


def layer_stem(position: int, layer_name: str) -> str:
    """'03-conv2d_1': names a layer's files in a job folder (and its arrays in the npz)."""
    return f"{position:02d}-{safe_key_part(layer_name)}"


def layer_grid_name(position: int, layer_name: str) -> str:
    """Grid key relative to the job folder: 'layers/03-conv2d_1.png'."""
    return f"layers/{layer_stem(position, layer_name)}.png"


def overlay_name(position: int, layer_name: str) -> str:
    """'overlays/03-conv2d_1.png': the layer's mean activation over the input."""
    return f"overlays/{layer_stem(position, layer_name)}.png"


CHANNELS_DIR = "channels/"  # per-channel PNGs (channel_pngs): stored, not shown by the report


def channels_dir(position: int, layer_name: str) -> str:
    """'channels/03-conv2d_1/': one PNG per channel, '000.png', '001.png', ..."""
    return f"{CHANNELS_DIR}{layer_stem(position, layer_name)}/"


def channel_name(position: int, layer_name: str, channel: int) -> str:
    return f"{channels_dir(position, layer_name)}{channel:03d}.png"


def gradcam_names(class_index: int) -> dict[str, str]:
    """A Grad-CAM class's files in a job folder: the colour-mapped heatmap, the
    overlay on the input, and the raw float16 values at the layer's resolution."""
    stem = f"{GRADCAM_DIR}class-{class_index:04d}"
    return {"heatmap": f"{stem}.png", "overlay": f"{stem}-overlay.png", "values": f"{stem}.npy"}


def batch_key(batch_id: str, page: int = 1) -> str:
    """The gallery's page `page`: 'batches/<id>/index.html', then 'page-2.html', ..."""
    if not valid_job_id(batch_id):
        raise ValueError(f"invalid batch id {batch_id!r}")
    return f"batches/{batch_id}/" + (REPORT_FILE if page <= 1 else f"page-{page}.html")


def census_key(batch_id: str, what: str = "census.json") -> str:
    """A batch's summaries: 'batches/<id>/census.json' and 'census.html' (a census),
    'diff.json' and 'diff.html' (a diff of several images)."""
    batch_key(batch_id)  # validates the id
    return f"batches/{batch_id}/{what}"


def census_part_key(batch_id: str, part: int) -> str:
    """A partial fold of a census: 'batches/<id>/census/part-0003.json' (see worker/jobs/census.py)."""
    batch_key(batch_id)
    return f"batches/{batch_id}/census/part-{part:04d}.json"


def census_job_id(batch_id: str, index: int) -> str:
    """A census image's job id, fixed by its batch and position: submitting the same
    census again (resuming it) finds its finished jobs and does not run them again."""
    if not valid_job_id(batch_id) or len(batch_id) > 100:
        raise ValueError(f"invalid census batch id {batch_id!r}")
    return f"{batch_id}-{index:07d}"


def job_key(job_id: str) -> str:
    """Redis key a producer sets when it submits a job (its registry entry)."""
    if not valid_job_id(job_id):
        raise ValueError(f"invalid job id {job_id!r}")
    return f"actviz:job:{job_id}"


def cancel_key(job_id: str) -> str:
    """Redis key that marks a job cancelled (producer.client.Job.cancel); workers read it."""
    if not valid_job_id(job_id):
        raise ValueError(f"invalid job id {job_id!r}")
    return f"actviz:cancelled:{job_id}"


def batch_progress_keys(batch_id: str) -> tuple[str, str, str]:
    """Redis keys of a batch's progress, kept by its workers (producer/batches.py):
    a hash {total, succeeded, failed}, the set of started job ids, and the list of
    finished job ids in the order they finished."""
    if not valid_job_id(batch_id):
        raise ValueError(f"invalid batch id {batch_id!r}")
    base = f"actviz:batch:{batch_id}"
    return base, f"{base}:started", f"{base}:done"


def batch_member_key(batch_id: str, index: int, job_id: str) -> str:
    """Marker a finished job of a batch leaves: 'batches/<id>/jobs/0003-<job_id>.json'."""
    if not valid_job_id(batch_id) or not valid_job_id(job_id):
        raise ValueError(f"invalid batch or job id {batch_id!r}/{job_id!r}")
    return f"batches/{batch_id}/jobs/{index:04d}-{job_id}.json"


# ---- job spec -------------------------------------------------------------


# ---- layer-spec grammar ------------------------------------------------------

# Bounds on what a layer spec may hold; a spec names layers, it is not data.
MAX_LAYER_SPEC_CHARS = 4096
MAX_LAYER_TOKENS = 256
MAX_PATTERN_CHARS = 256
# Memory RE2 may use to compile one pattern; a pattern that needs more is refused.
_PATTERN_MEMORY = 1 << 20
PATTERN_PREFIX = "re:"


_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f]")


def has_control_chars(text: str) -> bool:
    """Whether `text` holds an ASCII control character (newline, NUL, DEL, ...)."""
    return _CONTROL_CHAR.search(text) is not None


def layer_tokens(spec: str | list[str] | None) -> list[str]:
    """The tokens of a layer spec: 'a, 3, :8' or ['a', '3'] -> ['a', '3', ':8'].

    Raises ValueError for a spec of the wrong type, over the size bounds, or
    with a pattern token that `compile_layer_pattern` refuses.
    """
    if spec is None:
        return []
    if isinstance(spec, str):
        if len(spec) > MAX_LAYER_SPEC_CHARS:
            raise ValueError(f"layers is {len(spec)} characters, above {MAX_LAYER_SPEC_CHARS}")
        items = spec.split(",")
    elif isinstance(spec, list) and all(isinstance(t, str) for t in spec):
        if sum(len(t) for t in spec) > MAX_LAYER_SPEC_CHARS:
            raise ValueError(f"layers names more than {MAX_LAYER_SPEC_CHARS} characters")
        items = spec
    else:
        raise ValueError("layers must be a comma-separated string or a list of strings")
    tokens = [t.strip() for t in items if t.strip()]
    if len(tokens) > MAX_LAYER_TOKENS:
        raise ValueError(f"layers has {len(tokens)} entries, above {MAX_LAYER_TOKENS}")
    for token in tokens:
        if has_control_chars(token):
            raise ValueError(f"layer token {token!r} contains control characters")
        if token.startswith(PATTERN_PREFIX):
            compile_layer_pattern(token[len(PATTERN_PREFIX) :])
    return tokens


def compile_layer_pattern(pattern: str) -> Any:
    """Compile a 're:' token's pattern with RE2, whose matching time is linear.

    Python's own `re` backtracks: a 14-character pattern can hold a worker's
    interpreter for minutes. RE2 has no backreferences or lookaround, and
    refuses patterns that would need more than a small, fixed memory.
    Raises ValueError for a pattern RE2 refuses or one over the size bound.
    """
    import re2  # google-re2; imported here so that the contract loads without it for ids

    if len(pattern) > MAX_PATTERN_CHARS:
        raise ValueError(f"layer pattern is {len(pattern)} characters, above {MAX_PATTERN_CHARS}")
    options = re2.Options()
    options.log_errors = False
    options.max_mem = _PATTERN_MEMORY
    try:
        return re2.compile(pattern, options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else "invalid"
        if isinstance(reason, bytes):
            reason = reason.decode(errors="replace")
        raise ValueError(
            f"layer pattern 're:{pattern}' is not a valid RE2 regex ({reason}); "
            "backreferences and lookaround are not supported"
        ) from None


# ---- job spec -------------------------------------------------------------

_COLORMAP = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_TOP_K = 1024
# Grad-CAM: how a class score's gradient weighs the layer's channels.
CAM_METHODS = ("gradcam", "gradcam++")
# A per-pixel (segmentation) output's region Grad-CAM sums a class's scores over: every
# pixel, or the pixels the model assigns to that class (its argmax).
CAM_REGIONS = ("image", "predicted")
MAX_CAM_CLASSES = 16  # classes explained per image
MAX_PREDICTIONS = 100  # top predictions listed per image
MAX_LABELS = 100_000
MAX_LABEL_CHARS = 256
MAX_CLASS_INDEX = 10_000_000
# Diff: how two models' layers are paired.
MATCHES = ("name", "index")


@dataclass(frozen=True)
class JobOptions:
    """Per-job knobs. Defaults reproduce the classic recipe: x/255 (unless the model
    scales its own input: scale 'auto'), viridis.

    `from_dict` (what both sides build options with: the producer in
    `submit`, the worker on receipt) checks types, names and ranges with
    `validate`, so a bad option is refused before anything is queued, and by
    the worker with the same message. What needs the model (mean/std length
    against its channels, colormap names from matplotlib, layer names) is
    checked by the worker's engine, which also guards direct construction.
    """

    layers: str | list[str] | None = None
    scale: str = "auto"
    mean: list[float] | None = None
    std: list[float] | None = None
    normalize: str = "channel"
    percentile: float = 99.0
    colormap: str = "viridis"
    top_k: int = 8
    channel_pngs: bool = False
    save_npz: bool = False
    overlay: bool = False
    # Grad-CAM (kind 'gradcam', or an activations job with gradcam=True): the classes
    # to explain (indices) or the `top` predicted ones (1 by default), the layer
    # (default: the last one with an (H, W, C) output on the way to the output),
    # the method, class names, and how many top predictions to list; for a per-pixel
    # (segmentation) output, the region each class's scores are summed over.
    gradcam: bool = False
    classes: list[int] | None = None
    top: int | None = None
    layer: str | None = None
    method: str = "gradcam"
    region: str = "image"
    labels: list[str] | None = None
    predictions: int = 5
    # A job of a census (producer.client.Client.census): its manifest also gives each
    # channel's peak position and each layer's measured receptive field, which the
    # batch's census folds (worker/engine/census.py).
    census: bool = False
    # Diff (kind 'diff'): how the two models' layers pair up, and the relative L2
    # distance from which a layer counts as divergent.
    match: str = "name"
    threshold: float = 0.01

    @property
    def wants_gradcam(self) -> bool:
        """Whether any Grad-CAM option is set (they need kind 'gradcam' or gradcam=True)."""
        return (
            self.classes is not None
            or self.top is not None
            or self.layer is not None
            or self.region != "image"
        )

    def validate(self) -> JobOptions:
        """Returns self; raises ValueError for an option of the wrong type, name or range."""
        layer_tokens(self.layers)
        if self.scale not in SCALES:
            raise ValueError(f"scale {self.scale!r} unknown; use one of {', '.join(SCALES)}")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if values is not None and not (
                isinstance(values, list) and 1 <= len(values) <= 4 and all(map(_is_number, values))
            ):
                raise ValueError(f"{name} must be a list of 1 to 4 numbers, got {values!r}")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise ValueError("std values must be positive")
        if self.normalize not in NORMALIZATIONS:
            raise ValueError(
                f"normalize {self.normalize!r} unknown; use one of {', '.join(NORMALIZATIONS)}"
            )
        if not _is_number(self.percentile):
            raise ValueError(f"percentile must be a number, got {self.percentile!r}")
        if self.normalize == "percentile" and not 50.0 < self.percentile <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile}")
        if not isinstance(self.colormap, str) or not _COLORMAP.fullmatch(self.colormap):
            raise ValueError(f"colormap {self.colormap!r} is not a colormap name")
        if self.colormap not in COLORMAPS:
            close = difflib.get_close_matches(self.colormap, sorted(COLORMAPS), n=4, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ValueError(
                f"colormap {self.colormap!r} is not a matplotlib colormap{hint} "
                "(e.g. viridis, magma, inferno, plasma, gray; '_r' reverses one)"
            )
        if not _is_int(self.top_k) or not 0 <= self.top_k <= MAX_TOP_K:
            raise ValueError(f"top_k must be an integer in 0..{MAX_TOP_K}, got {self.top_k!r}")
        for name in ("channel_pngs", "save_npz", "overlay", "gradcam", "census"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        self._validate_gradcam()
        if self.match not in MATCHES:
            raise ValueError(f"match {self.match!r} unknown; use one of {', '.join(MATCHES)}")
        if not _is_number(self.threshold) or not 0.0 < self.threshold < 1e6:
            raise ValueError(f"threshold must be a positive number, got {self.threshold!r}")
        return self

    def _validate_gradcam(self) -> None:
        classes, top = self.classes, self.top
        if classes is not None:
            if (
                not isinstance(classes, list)
                or not 1 <= len(classes) <= MAX_CAM_CLASSES
                or not all(_is_int(c) and 0 <= c < MAX_CLASS_INDEX for c in classes)
            ):
                raise ValueError(
                    f"classes must be a list of 1 to {MAX_CAM_CLASSES} class indices "
                    f"(integers >= 0), got {classes!r}"
                )
            if len(set(classes)) != len(classes):
                raise ValueError(f"classes names a class twice: {classes!r}")
        if top is not None:
            if not _is_int(top) or not 1 <= top <= MAX_CAM_CLASSES:
                raise ValueError(f"top must be an integer in 1..{MAX_CAM_CLASSES}, got {top!r}")
            if classes is not None:
                raise ValueError("give classes or top, not both")
        if self.layer is not None and (
            not isinstance(self.layer, str)
            or not self.layer.strip()
            or len(self.layer) > MAX_PATTERN_CHARS
            or has_control_chars(self.layer)
            or "," in self.layer
        ):
            raise ValueError(
                f"layer must name one layer (a name such as 'block5_conv3' or 'outer/inner', "
                f"or an index), got {self.layer!r}"
            )
        if self.method not in CAM_METHODS:
            raise ValueError(f"method {self.method!r} unknown; use one of {', '.join(CAM_METHODS)}")
        if self.region not in CAM_REGIONS:
            raise ValueError(f"region {self.region!r} unknown; use one of {', '.join(CAM_REGIONS)}")
        labels = self.labels
        if labels is not None and (
            not isinstance(labels, list)
            or len(labels) > MAX_LABELS
            or not all(
                isinstance(x, str) and len(x) <= MAX_LABEL_CHARS and not has_control_chars(x)
                for x in labels
            )
        ):
            raise ValueError(
                f"labels must be a list of at most {MAX_LABELS} class names of at most "
                f"{MAX_LABEL_CHARS} characters each, without control characters"
            )
        if not _is_int(self.predictions) or not 1 <= self.predictions <= MAX_PREDICTIONS:
            raise ValueError(
                f"predictions must be an integer in 1..{MAX_PREDICTIONS}, got {self.predictions!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> JobOptions:
        """Raises ValueError for unknown or invalid options (see the class doc)."""
        if not isinstance(data, dict):
            raise ValueError("job options must be an object")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown job options: {', '.join(sorted(map(str, unknown)))}")
        return cls(**data).validate()


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


@dataclass(frozen=True)
class JobSpec:
    """What the producer puts on the queue: URIs and options, never pixels."""

    job_id: str
    model: str
    image: str
    options: JobOptions = field(default_factory=JobOptions)
    # Messages without one (older producers) are activations jobs.
    kind: str = JobKind.ACTIVATIONS.value
    enqueued_at: float = 0.0
    batch_id: str | None = None
    # Position in the batch and its size; the job that completes the batch renders its gallery.
    batch_index: int = 0
    batch_total: int = 0
    # The image's name as the user knows it (a file name), for reports and galleries.
    image_name: str | None = None
    # Kind 'diff': the second model, compared with `model` layer by layer.
    against: str | None = None

    def __post_init__(self) -> None:
        if not valid_job_id(self.job_id):
            raise ValueError(f"job id {self.job_id!r} is not one safe path segment")
        if self.batch_id is not None and not valid_job_id(self.batch_id):
            raise ValueError(f"batch id {self.batch_id!r} is not one safe path segment")
        for name in ("model", "image"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or len(value) > MAX_URI_CHARS:
                raise ValueError(
                    f"{name} must be a URI string of at most {MAX_URI_CHARS} characters"
                )
            if has_control_chars(value):
                raise ValueError(f"{name} URI contains control characters")
        check_kind(self.kind)
        if self.kind == JobKind.DIFF:
            if (
                not isinstance(self.against, str)
                or not self.against
                or len(self.against) > MAX_URI_CHARS
                or has_control_chars(self.against)
            ):
                raise ValueError(
                    "a diff job needs `against`, the URI of the model to compare with, "
                    f"of at most {MAX_URI_CHARS} characters"
                )
        elif self.against is not None:
            raise ValueError("`against` names a diff's second model: use kind 'diff'")
        if self.image_name is not None and (
            not isinstance(self.image_name, str)
            or len(self.image_name) > MAX_IMAGE_NAME_CHARS
            or has_control_chars(self.image_name)
        ):
            raise ValueError(
                f"image_name must be a string of at most {MAX_IMAGE_NAME_CHARS} characters "
                "without control characters"
            )
        if not isinstance(self.options, JobOptions):
            raise ValueError("options must be JobOptions")
        self.options.validate()
        if (
            self.kind == JobKind.ACTIVATIONS
            and self.options.wants_gradcam
            and not self.options.gradcam
        ):
            raise ValueError(
                "classes, top and layer choose what Grad-CAM explains: use kind 'gradcam', "
                "or gradcam=True for an activations job with Grad-CAM"
            )
        if not _is_number(self.enqueued_at):
            raise ValueError(f"enqueued_at must be a number, got {self.enqueued_at!r}")
        if not (_is_int(self.batch_index) and _is_int(self.batch_total)):
            raise ValueError("batch_index and batch_total must be integers")
        if not 0 <= self.batch_index <= max(self.batch_total, 0) <= MAX_BATCH_JOBS:
            raise ValueError(
                f"batch_index {self.batch_index} is outside a batch of {self.batch_total} jobs"
            )

    def to_message(self) -> dict[str, Any]:
        # Every field but `options` is a scalar: no deep copy but the options' own.
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["options"] = self.options.to_dict()
        data["version"] = MANIFEST_VERSION
        return data

    @classmethod
    def from_message(cls, data: dict[str, Any]) -> JobSpec:
        """Raises ValueError (or TypeError) for a message that is not a valid job."""
        if not isinstance(data, dict):
            raise ValueError("the job message is not an object")
        data = dict(data)
        data.pop("version", None)
        options = JobOptions.from_dict(data.pop("options", None) or {})
        return cls(options=options, **data)
