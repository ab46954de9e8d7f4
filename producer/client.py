"""Submit (model, image) jobs and read their results: `Client`, `Job`, `Result`.

    client = Client.from_env()
    job = client.submit("s3://models/vgg16.keras", "cat.jpg", layers="conv")
    result = job.wait(timeout=60)          # Result, or raises JobFailed / TimeoutError
    result.grid("block1_conv1").show()

Messages carry URIs only: a local image (path or bytes) is uploaded once to
`inputs/<sha256>.<ext>` in the result store and the job names that object.
With no configuration at all the client runs an in-process worker thread on
the `memory://` broker (the embedded mode), so the same calls work on a laptop.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from producer import contract
from producer.batches import (
    BatchProgress,
    batch_jobs,
    forget_batch,
    read_progress,
    record_jobs,
    record_total,
)
from producer.broker import create_app, send_job
from producer.contract import (
    FAILED,
    MAX_PRIORITY,
    QUEUED,
    QUEUES,
    STARTED,
    SUCCEEDED,
    UNKNOWN,
    ErrorCode,
    JobKind,
    JobOptions,
    JobSpec,
)
from producer.errors import (
    ActvizError,
    BrokerUnavailable,
    Cancelled,
    ConfigurationError,
    InputNotFound,
    Internal,
    InvalidJob,
    JobFailed,
    JobNotFound,
    PayloadTooLarge,
    QueueFull,
    StorageError,
    TimeLimit,
    TransientError,
    WorkerLost,
    error_from_dict,
    transient_errors,
)
from producer.job_registry import forget, register, registered_state
from producer.labels import read_labels
from producer.registry import load_registry, registry_labels, resolve_model
from producer.settings import Settings, redact_url
from producer.signed import report_link, signed_page_link
from producer.storage import ObjectNotFound, Store, is_file_uri, is_s3_uri, local_path, open_store

if TYPE_CHECKING:
    from celery import Celery
    from PIL import Image

ImageSource = str | Path | bytes

# Leading bytes of the image formats Pillow decodes, to name the uploaded object.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "png"),
    (b"\xff\xd8\xff", "jpg"),
    (b"GIF8", "gif"),
    (b"BM", "bmp"),
    (b"II*\x00", "tif"),
    (b"MM\x00*", "tif"),
)

# Celery task states -> actviz job states.
_STATES = {
    "PENDING": QUEUED,
    "RECEIVED": QUEUED,
    "RETRY": QUEUED,
    "STARTED": STARTED,
    "PROGRESS": STARTED,
    "SUCCESS": SUCCEEDED,
    "FAILURE": FAILED,
    "REVOKED": FAILED,
}


def sniff_extension(data: bytes, name: str | None = None) -> str:
    """'png', 'jpg', ... from the leading bytes, else from the file name, else 'bin'."""
    for magic, ext in _MAGIC:
        if data.startswith(magic):
            return ext
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    suffix = Path(name or "").suffix.lstrip(".").lower()
    return suffix or "bin"


@dataclass(frozen=True)
class JobState:
    """Where a job stands: state is queued | started | succeeded | failed.

    `stage` is the step a started job reports ('loading model', 'forward',
    'rendering', 'uploading'); `error` is {code, message} for a failed job.
    """

    job_id: str
    state: str
    stage: str | None = None
    error: dict[str, str] | None = None
    info: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"job_id": self.job_id, "status": self.state}
        if self.stage:
            out["stage"] = self.stage
        if self.error:
            out["error"] = self.error
        return out


class Result:
    """A finished job read back from storage: its manifest and the objects it names."""

    def __init__(self, store: Store, job_id: str, manifest: dict[str, Any]) -> None:
        self.store = store
        self.job_id = job_id
        self.manifest = manifest

    def __repr__(self) -> str:
        return f"Result(job_id={self.job_id!r}, layers={len(self.layers)})"

    @property
    def prefix(self) -> str:
        return contract.job_prefix(self.job_id)

    @property
    def layers(self) -> list[str]:
        """Layer names in model order."""
        return [entry["name"] for entry in self.manifest.get("layers", [])]

    def layer(self, layer: str | int) -> dict[str, Any]:
        """The manifest entry of a layer, by name or by position in `layers`.

        Raises KeyError naming the available layers.
        """
        entries = self.manifest.get("layers", [])
        if isinstance(layer, int):
            return entries[layer]
        for entry in entries:
            if entry["name"] == layer:
                return entry
        raise KeyError(f"layer {layer!r} not in this result; layers: {', '.join(self.layers)}")

    def grid_key(self, layer: str | int) -> str:
        """Key of a layer's grid PNG relative to the job folder ('layers/00-conv1.png')."""
        entry = self.layer(layer)
        grid = entry.get("grid")
        key = grid.get("png") if isinstance(grid, dict) else grid
        if not key:
            raise KeyError(f"layer {entry['name']!r} has no grid")
        return key

    def grid(self, layer: str | int) -> Image.Image:
        """The channel grid of a layer as a PIL image (RGB, (rows*h, cols*w))."""
        import io

        from PIL import Image

        data = self.store.get(self.prefix + self.grid_key(layer))
        image = Image.open(io.BytesIO(data))
        image.load()
        return image

    def stats(self, layer: str | int) -> dict[str, Any]:
        """Per-channel stats: {mean, std, min, max, sparsity: [C floats], dead: [idx]}."""
        return self.layer(layer)["stats"]

    def summary(self, layer: str | int) -> dict[str, Any]:
        """Layer-wide summary: mean, std, min, max, sparsity, dead_count, top_k."""
        return self.layer(layer)["summary"]

    def url(self, layer: str | int | None = None, expires: int = 3600) -> str:
        """A link to a layer grid, or to the HTML report when `layer` is None.

        Presigned (valid `expires` seconds) on S3, the report's link with the
        signatures of the images it shows (producer/signed.py); a local path for
        file:// storage.
        """
        if layer is None:
            # The page links its images: they are signed too, or a private bucket
            # refuses them.
            link = report_link(self.store, self.job_id, self.manifest.get("files"), expires)
            if link is not None:
                return link
            key = contract.manifest_key(self.job_id)
        else:
            key = self.prefix + self.grid_key(layer)
        return self.store.presign(key, expires=expires)

    def keys(self) -> list[str]:
        """Every stored object of the job, relative to the job folder."""
        return [k[len(self.prefix) :] for k in self.store.list(self.prefix)]

    def download(self, directory: str | Path) -> Path:
        """Copy every object of the job (report, grids, manifest) into `directory`."""
        out = Path(directory)
        for name in self.keys():
            self.store.download(self.prefix + name, out / name)
        return out


class Job:
    """A submitted job; it fetches its own state and result."""

    def __init__(self, client: Client, job_id: str, batch_id: str | None = None) -> None:
        self.client = client
        self.id = job_id
        self.batch_id = batch_id

    def __repr__(self) -> str:
        return f"Job({self.id!r})"

    def state(self, check_storage: bool = True) -> JobState:
        """The job's state from the result backend, falling back to storage.

        With Redis, a job a worker has admitted but that reports no stage yet is
        started by its job registry entry: Celery writes no STARTED of its own
        (producer/broker.py).

        Storage decides when the backend has forgotten the job (expired or
        flushed): a manifest means succeeded, an error.json means failed.
        In embedded mode, a client that has not started its in-process worker
        (`actviz status` in a new process) reads storage only: the in-memory
        backend of another process is gone, and starting a worker (and its
        TensorFlow) to learn nothing would cost seconds.
        """
        if self.client.settings.embedded and self.client._app is None:
            stored = self.client.stored_state(self.id)
            return stored if stored is not None else JobState(self.id, QUEUED)
        result = self.client.app.AsyncResult(self.id)
        celery_state = result.state
        state = _STATES.get(celery_state, QUEUED)
        info = result.info
        if state == FAILED:
            return JobState(self.id, FAILED, error=self._failure(celery_state, info))
        if state == SUCCEEDED:
            return JobState(self.id, SUCCEEDED, info=info if isinstance(info, dict) else None)
        if state == QUEUED:
            redis = self.client.redis()
            registered = registered_state(redis, self.id) if redis is not None else None
            if celery_state == "PENDING" and registered == STARTED:
                # Running: with Redis, Celery records no start; the registry does
                # (producer/broker.py, task_track_started).
                return JobState(self.id, STARTED)
            if check_storage:
                stored = self.client.stored_state(self.id)
                if stored is not None:
                    return stored
                if redis is not None and registered is None:
                    return JobState(self.id, UNKNOWN)  # no producer submitted this id
        stage = info.get("stage") if isinstance(info, dict) else None
        if celery_state == "RETRY":
            stage = "retrying"
        return JobState(self.id, state, stage=stage)

    def status(self) -> str:
        """queued | started | succeeded | failed | unknown (an id nobody submitted)."""
        return self.state().state

    def _failure(self, celery_state: str, info: Any) -> dict[str, str]:
        try:
            stored = self.client.stored_error(self.id)
        except TransientError:
            stored = None  # storage is down; the backend still knows why the job failed
        if stored is not None:
            return stored
        if celery_state == "REVOKED":
            return Cancelled("the job was cancelled").to_dict()
        return error_of(info)

    def wait(self, timeout: float | None = None, poll: float = 0.1) -> Result:
        """Block until the job ends; return its Result.

        Raises JobFailed (.code, .message) when it failed, TimeoutError after `timeout` s.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        delay, rounds = poll, 0
        while True:
            # Storage is the source of truth but costs a request: ask it now and then.
            state = self.state(check_storage=rounds % 10 == 9)
            if state.state == SUCCEEDED:
                return self.client.result(self.id)
            if state.state == FAILED:
                error = state.error or {}
                raise JobFailed(
                    self.id, error.get("code", ErrorCode.INTERNAL), error.get("message", "")
                )
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {self.id} still {state.state} after {timeout} s")
            time.sleep(delay)
            delay = min(delay * 1.5, 1.0)
            rounds += 1

    def cancel(self) -> JobState:
        """Cancel the job; returns its state as it stands.

        With Redis the job is marked cancelled there, so it works whether or
        not any worker is up: a worker that receives it later acknowledges it
        without running it and fails it `cancelled` (error.json); a running job
        stops at its next stage. A job that has already ended is left as it is
        (its state says how it ended), and so is an id nobody submitted (unknown). Without Redis (embedded) the in-process
        worker is told to revoke it.
        """
        state = self.state()
        if state.state in (SUCCEEDED, FAILED, UNKNOWN):
            return state  # ended, or an id nobody submitted: nothing to cancel
        redis = self.client.redis()
        if redis is None:
            self.client.app.control.revoke(self.id)
            return state
        redis.set(contract.cancel_key(self.id), b"1", ex=self.client.settings.result_expires)
        return state


def error_of(info: Any) -> dict[str, str]:
    """{code, message} from what Celery stored for a failed task.

    The worker raises only ActvizErrors; Celery's own limits and a lost
    process are mapped by class; anything else is `internal`, named.
    """
    from billiard.exceptions import WorkerLostError
    from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

    if isinstance(info, ActvizError):
        return info.to_dict()
    if isinstance(info, SoftTimeLimitExceeded | TimeLimitExceeded):
        return TimeLimit("the job ran past its time limit").to_dict()
    if isinstance(info, WorkerLostError):
        return WorkerLost(str(info)).to_dict()
    if isinstance(info, TransientError):
        return StorageError(str(info)).to_dict()
    return Internal(f"{type(info).__name__}: {info}").to_dict()


class Client:
    """The producer's entry point: submit jobs, follow them, read results."""

    def __init__(
        self,
        broker_url: str | None = None,
        storage_url: str | None = None,
        *,
        settings: Settings | None = None,
    ) -> None:
        base = settings or Settings()
        self.settings = base.with_overrides(broker_url=broker_url, storage_url=storage_url)
        self._app: Celery | None = None
        self._store: Store | None = None
        self._uploaded: dict[str, None] = {}  # input keys this client stored (insertion order)

    @classmethod
    def from_env(cls, **overrides: Any) -> Client:
        """A client configured from ACTVIZ_* variables; keyword overrides win."""
        return cls(settings=Settings.from_env(**overrides))

    @property
    def app(self) -> Celery:
        """The Celery app; in embedded mode, the one the in-process worker consumes."""
        if self._app is None:
            if self.settings.embedded:
                self._app = start_embedded(self.settings)
            else:
                self._app = create_app(self.settings)
        return self._app

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.settings.storage_url, self.settings.s3_public_endpoint)
        return self._store

    def describe(self) -> str:
        """'broker redis://***@h:6379/0, storage s3://bucket/p' (credentials masked)."""
        mode = " (embedded worker)" if self.settings.embedded else ""
        return (
            f"broker {redact_url(self.settings.broker_url)}{mode}, "
            f"storage {redact_url(self.settings.storage_url)}"
        )

    # ---- submitting ------------------------------------------------------

    def submit(
        self,
        model: str | Path,
        image: ImageSource,
        layers: str | list[str] | None = None,
        *,
        queue: str | None = None,
        priority: int | None = None,
        job_id: str | None = None,
        batch_id: str | None = None,
        batch_index: int = 0,
        batch_total: int = 0,
        kind: str = JobKind.ACTIVATIONS.value,
        against: str | Path | None = None,
        **options: Any,
    ) -> Job:
        """Enqueue one job and return at once.

        model: s3:// URI, file:// URI or path the worker can see, registry name,
        or 'builtin:demo'. image: local path, bytes, or s3:// URI.
        options: JobOptions fields (scale, normalize, colormap, top_k, ...).
        kind: what the job computes (`producer.contract.JOB_KINDS`), 'activations' by default.
        against: kind 'diff' only, the model compared with `model` (as `model`: URI,
        path or registry name).
        Raises InvalidJob (invalid_job), PayloadTooLarge (payload_too_large),
        InputNotFound (input_not_found), ModelNotFound (model_not_found).
        """
        try:
            contract.check_kind(kind)
        except ValueError as exc:
            raise InvalidJob(str(exc)) from None
        job_options = build_options(layers, self.with_labels(model, kind, options))
        queue = queue or self.settings.queue
        check_routing(queue, priority)
        job_id = job_id or contract.new_job_id()
        if not contract.valid_job_id(job_id):
            raise InvalidJob(f"job id {job_id!r} is not one safe path segment")
        if batch_id is not None and not contract.valid_job_id(batch_id):
            raise InvalidJob(f"batch id {batch_id!r} is not one safe path segment")
        model_uri = self.resolve_model(model)
        against_uri = self.resolve_model(against) if against is not None else None
        try:
            spec = JobSpec(
                job_id=job_id,
                kind=kind,
                model=model_uri,
                image=self.upload_image(image),
                image_name=image_name_of(image),
                options=job_options,
                enqueued_at=time.time(),
                batch_id=batch_id,
                batch_index=batch_index,
                batch_total=batch_total,
                against=against_uri,
            )
        except ValueError as exc:
            raise InvalidJob(str(exc)) from None
        message = spec.to_message()
        size = len(json.dumps(message, default=str))
        if size > contract.MAX_MESSAGE_BYTES:  # the worker would refuse it: refuse it here
            labels = job_options.labels or []
            hint = f" ({len(labels)} class names take most of it)" if len(labels) > 100 else ""
            raise PayloadTooLarge(
                f"the job message is {size} bytes{hint}, above {contract.MAX_MESSAGE_BYTES}; "
                "messages carry URIs and options, not data"
            )
        redis = self.redis()

        def enqueue() -> None:
            with queue_full_refused(redis, job_id):
                if redis is not None:
                    # Registered before it is sent: a fast job is never "unknown", and a
                    # job lost after this (its producer or its popping worker died) is
                    # sent again.
                    register(
                        redis,
                        job_id,
                        message,
                        queue,
                        priority,
                        self.settings.result_expires,
                        self.settings.reconcile_after or None,
                    )
                send_job(self.app, message, job_id, queue=queue, priority=priority)

        self.through_broker_outages(enqueue)
        return Job(self, job_id, batch_id)

    def through_broker_outages(self, step: Callable[[], Any]) -> Any:
        """Run `step`, again while the broker is unreachable (a restart, a Sentinel
        failover), for up to ACTVIZ_SUBMIT_RETRY_S; then BrokerUnavailable. The step
        is idempotent: the job id is fixed, and a message sent twice runs once."""
        from redis.exceptions import ReadOnlyError

        deadline = time.monotonic() + self.settings.submit_retry_s
        delay = 0.25
        while True:
            try:
                return step()
            except (*transient_errors(), ReadOnlyError) as exc:
                if time.monotonic() + delay > deadline:
                    raise BrokerUnavailable(
                        f"the broker {redact_url(self.settings.broker_url)} did not take the "
                        f"job for {self.settings.submit_retry_s} s "
                        f"({type(exc).__name__}: {redact_url(str(exc))}); nothing was queued "
                        "(ACTVIZ_SUBMIT_RETRY_S sets how long to keep trying)"
                    ) from None
                time.sleep(delay)
                delay = min(2 * delay, 2.0)

    def submit_many(
        self,
        model: str | Path,
        images: list[ImageSource],
        layers: str | list[str] | None = None,
        **options: Any,
    ) -> list[Job]:
        """Enqueue one job per image, all tagged with one batch id.

        The worker that finishes the last job writes the batch gallery
        (`batches/<batch_id>/index.html`, see `batch_url`).
        """
        batch_id = options.pop("batch_id", None) or contract.new_job_id()
        job_ids = options.pop("job_ids", None)
        # Read once for the batch: each job carries the list.
        options = self.with_labels(model, options.get("kind", JobKind.ACTIVATIONS.value), options)
        redis = self.redis()
        ttl = self.settings.result_expires
        if redis is not None and images:
            # Progress readable at once, in O(1) per look (producer/batches.py).
            with queue_full_refused(redis, None):
                record_total(redis, batch_id, len(images), ttl)
        jobs = [
            self.submit(
                model,
                image,
                layers,
                batch_id=batch_id,
                batch_index=index,
                batch_total=len(images),
                job_id=job_ids[index] if job_ids else None,
                **options,
            )
            for index, image in enumerate(images)
        ]
        if redis is not None and jobs:
            record_jobs(redis, batch_id, [job.id for job in jobs], ttl)
        return jobs

    def cancel_batch(self, batch_id: str) -> list[JobState]:
        """Cancel every job of a batch (see Job.cancel); their states as they stand.

        Needs Redis, where `submit_many` recorded the batch's job ids; an
        unknown batch gives an empty list.
        """
        redis = self.redis()
        if redis is None:
            raise ConfigurationError("cancelling a batch needs Redis (ACTVIZ_BROKER_URL)")
        return [self.job(job_id).cancel() for job_id in batch_jobs(redis, batch_id)]

    def redis(self) -> Any:
        """The result backend's Redis client, or None (the embedded mode has none)."""
        from celery.backends.redis import RedisBackend

        backend = self.app.backend
        return backend.client if isinstance(backend, RedisBackend) else None

    def batch_progress(self, batch_id: str, cursor: int = 0) -> BatchProgress | None:
        """A batch's counts and the jobs finished after `cursor`, in O(1) requests.

        None without Redis, or for a batch nobody recorded (then ask each job).
        """
        redis = self.redis()
        return read_progress(redis, batch_id, cursor) if redis is not None else None

    def census(
        self,
        model: str | Path,
        images: list[ImageSource],
        layers: str | list[str] | None = None,
        *,
        top_k: int = 9,
        batch_id: str | None = None,
        **options: Any,
    ) -> list[Job]:
        """A census of `model` over `images`: one activations job per image (batched by
        the workers as any job), whose per-channel statistics the worker that ends the
        batch folds into `batches/<id>/census.json` and `census.html` (`census_url`):
        per layer and channel, count, mean, std, min, max, sparsity, the share of
        images where it is dead, and its `top_k` images with the crop around its peak.

        Job ids follow from the batch id and the image's position, so calling again
        with the same `batch_id` (and images) resumes a census: finished jobs are not
        run again, and the fold reuses the parts it had written.
        """
        resuming = batch_id is not None
        batch_id = batch_id or contract.new_job_id()
        try:
            job_ids = [contract.census_job_id(batch_id, i) for i in range(len(images))]
        except ValueError as exc:
            raise InvalidJob(str(exc)) from None
        redis = self.redis()
        if resuming and redis is not None:
            # Progress counts restart: every job, finished or not, records its end again.
            forget_batch(redis, batch_id)
        return self.submit_many(
            model,
            images,
            layers,
            batch_id=batch_id,
            job_ids=job_ids,
            census=True,
            top_k=top_k,
            **options,
        )

    def diff(
        self,
        model: str | Path,
        against: str | Path,
        images: list[ImageSource],
        layers: str | list[str] | None = None,
        *,
        match: str = "name",
        threshold: float = 0.01,
        **options: Any,
    ) -> list[Job]:
        """Compare two checkpoints layer by layer on `images`: one diff job per image.

        Layers pair by name (`match="name"`) or position (`"index"`); each job writes
        its grids of A, B and |A - B|, `diff.json` and its report; the batch gets
        `batches/<id>/diff.json` and `diff.html` over every image (`diff_url`). The
        first layer whose relative L2 distance reaches `threshold` is the first
        divergent one.
        """
        return self.submit_many(
            model,
            images,
            layers,
            kind=JobKind.DIFF.value,
            against=against,
            match=match,
            threshold=threshold,
            **options,
        )

    def diff_url(self, batch_id: str, expires: int = 3600) -> str | None:
        """Link to a diff batch's diff.html once it is written, else None."""
        return signed_page_link(self.store, contract.census_key(batch_id, "diff.html"), expires)

    def census_url(self, batch_id: str, expires: int = 3600) -> str | None:
        """Link to a census's page once it is written, else None."""
        return signed_page_link(self.store, contract.census_key(batch_id, "census.html"), expires)

    def batch_url(self, batch_id: str, expires: int = 3600, page: int = 1) -> str | None:
        """Link to a page of a batch's gallery once every job of it has ended, else None.

        From a private bucket the link signs the page's images (and its links to the
        jobs' reports and the other pages) in its fragment, as `Result.url()` does.
        """
        return signed_page_link(self.store, contract.batch_key(batch_id, page), expires)

    def with_labels(self, model: str | Path, kind: str, options: dict[str, Any]) -> dict[str, Any]:
        """`options` with Grad-CAM's class names as a list: read from a labels file
        when `labels` is a path, or taken from the model registry when the job
        has none. Raises InvalidJob for a labels file that cannot be read."""
        if kind != JobKind.GRADCAM and not options.get("gradcam"):
            return options
        labels = options.get("labels")
        if labels is None and isinstance(model, str):
            labels = registry_labels(self.settings.model_registry, model)
        elif isinstance(labels, (str, Path)):
            labels = read_labels(labels)
        return {**options, "labels": labels} if labels is not None else options

    def resolve_model(self, model: str | Path) -> str:
        """The model URI a job carries; registry names are looked up here."""
        return resolve_model(model, load_registry(self.settings.model_registry))

    def upload_image(self, image: ImageSource) -> str:
        """The image URI a job carries; local bytes are uploaded once, by content hash.

        An image this client stored already costs nothing; a small one is written
        at once (its key is its content, and asking first would cost as much as
        writing); a larger one is written only if storage lacks it.
        Raises PayloadTooLarge above settings.max_image_bytes, InputNotFound for
        a missing file.
        """
        if isinstance(image, str) and is_s3_uri(image):
            return image
        name = None
        if isinstance(image, bytes):
            data = image
        else:
            path = local_path(str(image)) if is_file_uri(str(image)) else Path(image)
            name = path.name
            data = read_local_image(path, self.settings.max_image_bytes)
        check_size(len(data), self.settings.max_image_bytes)
        key = contract.input_key(hashlib.sha256(data).hexdigest(), sniff_extension(data, name))
        if key not in self._uploaded:
            if len(data) <= ASK_FIRST_ABOVE_BYTES or not self.store.exists(key):
                self.store.put(key, data)
            self._uploaded[key] = None
            if len(self._uploaded) > REMEMBER_UPLOADS:
                del self._uploaded[next(iter(self._uploaded))]
        return self.store.uri(key)

    # ---- reading back ----------------------------------------------------

    def job(self, job_id: str) -> Job:
        """A handle on an existing job id."""
        if not contract.valid_job_id(job_id):
            raise InvalidJob(f"job id {job_id!r} is not one safe path segment")
        return Job(self, job_id)

    def result(self, job_id: str) -> Result:
        """A finished job from storage alone (no broker needed).

        Raises JobFailed when the job stored an error, JobNotFound when storage
        holds neither a manifest nor an error for it (unknown or unfinished).
        """
        job = self.job(job_id)
        try:
            manifest = json.loads(self.store.get(contract.manifest_key(job.id)))
        except ObjectNotFound:
            error = self.stored_error(job.id)
            if error is not None:
                raise JobFailed(job.id, error["code"], error["message"]) from None
            raise JobNotFound(f"no result for job {job.id} in {self.store.url}") from None
        return Result(self.store, job.id, manifest)

    def stored_error(self, job_id: str) -> dict[str, str] | None:
        """{code, message} from the job's error.json, or None."""
        try:
            data = json.loads(self.store.get(contract.error_key(job_id)))
        except ObjectNotFound:
            return None
        return error_from_dict(data).to_dict()

    def stored_state(self, job_id: str) -> JobState | None:
        """succeeded/failed as storage sees it, or None when storage knows nothing yet."""
        if self.store.exists(contract.manifest_key(job_id)):
            return JobState(job_id, SUCCEEDED)
        error = self.stored_error(job_id)
        if error is not None:
            return JobState(job_id, FAILED, error=error)
        return None


EMBEDDED_GROUP = "actviz.embedded"
# Images up to this size are written without asking storage first: a HEAD costs a round
# trip, as a small PUT does. Larger ones are looked for first, and skipped when stored.
ASK_FIRST_ABOVE_BYTES = 64 * 1024
REMEMBER_UPLOADS = 4096  # input keys a client remembers having stored


def start_embedded(settings: Settings) -> Celery:
    """Start the in-process worker the worker package provides (`actviz.embedded`).

    Raises ConfigurationError (invalid_config) when that package or one of its
    dependencies is not installed.
    """
    from importlib import metadata

    entries = list(metadata.entry_points(group=EMBEDDED_GROUP))
    try:
        if not entries:
            raise ModuleNotFoundError("worker", name="worker")
        return entries[0].load()(settings)
    except ModuleNotFoundError as exc:
        raise ConfigurationError(
            f"the embedded mode runs jobs in this process and needs the worker package "
            f"({exc.name} is missing): pip install 'actviz[worker]', or point "
            "ACTVIZ_BROKER_URL at a Redis that workers consume"
        ) from None


def image_name_of(image: ImageSource) -> str | None:
    """The name a user knows an image by: a file's name, an S3 key's last part; None for bytes."""
    if isinstance(image, bytes):
        return None
    text = str(image)
    name = text.rstrip("/").rsplit("/", 1)[-1] if "://" in text else Path(text).name
    return name[: contract.MAX_IMAGE_NAME_CHARS] or None


@contextlib.contextmanager
def queue_full_refused(redis: Any, job_id: str | None) -> Iterator[None]:
    """Redis at `maxmemory` (noeviction) refuses writes: raise QueueFull (queue_full) and
    take back the job's registry entry, so nothing of the job stays half-enqueued."""
    from redis.exceptions import OutOfMemoryError

    try:
        yield
    except Exception as exc:
        # redis-py raises OutOfMemoryError; kombu's publish may wrap it in its own errors.
        if not isinstance(exc, OutOfMemoryError) and "maxmemory" not in str(exc):
            raise
        if redis is not None and job_id is not None:
            with contextlib.suppress(Exception):  # DEL is allowed at maxmemory: it frees
                forget(redis, job_id)
        raise QueueFull(
            "the broker refused the job: Redis is at its maxmemory and evicts nothing "
            f"({exc}); nothing was queued. Wait for queued jobs to drain, raise maxmemory, "
            "or shorten how long results stay in Redis (ACTVIZ_RESULT_EXPIRES)"
        ) from None


def build_options(layers: str | list[str] | None, options: dict[str, Any]) -> JobOptions:
    """JobOptions from keyword arguments; raises InvalidJob for unknown or bad values."""
    if layers is not None:
        options = {**options, "layers": layers}
    try:
        return JobOptions.from_dict(options)
    except (TypeError, ValueError) as exc:
        raise InvalidJob(str(exc)) from None


def check_routing(queue: str, priority: int | None) -> None:
    if queue not in QUEUES:
        raise InvalidJob(f"queue {queue!r} unknown; use one of {', '.join(QUEUES)}")
    if priority is not None and not 0 <= priority <= MAX_PRIORITY:
        raise InvalidJob(f"priority {priority} out of range 0..{MAX_PRIORITY}")


def check_size(nbytes: int, limit: int) -> None:
    if nbytes > limit:
        raise PayloadTooLarge(
            f"image is {nbytes} bytes, above the {limit}-byte limit (ACTVIZ_MAX_IMAGE_BYTES); "
            "upload it to s3:// and pass the URI"
        )


def read_local_image(path: Path, limit: int) -> bytes:
    """The file's bytes, checking the size before reading it."""
    try:
        check_size(path.stat().st_size, limit)
        return path.read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        raise InputNotFound(f"image file {path} does not exist") from None
