"""What a worker process keeps between jobs: settings, result store, warm models.

One `WorkerRuntime` per process, attached to the Celery app as `app.actviz`.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from producer.contract import JobKind, JobOptions
from producer.settings import Settings
from producer.storage import Store, is_s3_uri, open_store, s3_client
from worker.logs import current_job_id
from worker.metrics import STAGE_SECONDS
from worker.runtime import heap, running
from worker.runtime.batcher import Batcher, run_alone, run_cam_alone
from worker.runtime.cache import ModelCache
from worker.runtime.cores import report_helpers
from worker.runtime.fetch import fetch_model
from worker.runtime.pool import batching
from worker.runtime.report_pool import ReportPool

log = logging.getLogger(__name__)


class WorkerRuntime:
    """`quarantine`: where redelivered jobs run (worker/runtime/quarantine.py); the worker's app
    gives one, a quarantine process itself has none."""

    def __init__(self, settings: Settings, quarantine: Any = None) -> None:
        self.settings = settings
        self.quarantine = quarantine
        self.cache = ModelCache(settings.cache_models, settings.cache_bytes)
        self._store: Store | None = None
        self._s3: object | None = None
        self._batcher: Batcher | None = None
        self._reports: ReportPool | None = None
        self._report_helpers = report_helpers(settings)  # the host's cores, read once
        self._uploads: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()
        # One fetch-and-load per model at a time: the pool's threads of a cold
        # start wait for the first one and then hit the cache.
        self._model_locks: dict[str, threading.Lock] = {}

    @property
    def batcher(self) -> Batcher | None:
        """The forward-pass batcher when the worker batches (batch size > 1), else None."""
        if not batching(self.settings):
            return None
        with self._lock:
            if self._batcher is None:
                self._batcher = Batcher(self.settings)
        return self._batcher

    @property
    def upload_threads(self) -> int:
        """Concurrent uploads per job: fewer when many jobs upload at once (batching)."""
        return 2 if batching(self.settings) else 8

    @property
    def uploads(self) -> ThreadPoolExecutor:
        """The process's upload threads, kept for every job (no pool built per job)."""
        with self._lock:
            if self._uploads is None:
                threads = max(8, 2 * max(1, self.settings.batch_size))
                self._uploads = ThreadPoolExecutor(threads, thread_name_prefix="actviz-upload")
        return self._uploads

    @property
    def reports(self) -> ReportPool | None:
        """Helper processes that render job reports when batching on a share of 4 cores or
        more, else None (in the job's thread; worker/runtime/cores.py report_helpers)."""
        if not batching(self.settings) or self._report_helpers == 0:
            return None
        with self._lock:
            if self._reports is None:
                self._reports = ReportPool(self._report_helpers)
        return self._reports

    def expect_image(self) -> None:
        """A job started: its image will reach `analyze` soon (lets a batch wait for it)."""
        if self.batcher is not None:
            self.batcher.expect()

    def drop_image(self) -> None:
        """A job that called `expect_image` failed before `analyze`."""
        if self.batcher is not None:
            self.batcher.cancel()

    def analyze(self, loaded: Any, image: bytes, options: JobOptions) -> Any:
        """One image's Artifacts, from a shared forward pass when batching.

        Raises the image's ActvizError (InvalidImage, ImageTooLarge,
        ActivationsTooLarge, UnknownLayer, InvalidJob).
        """
        batcher = self.batcher
        if batcher is None:
            return run_alone(loaded, image, options, self.settings)
        return batcher.run(loaded, image, options)

    def compute(self, kind: str, loaded: Any, image: bytes, options: JobOptions) -> Any:
        """One image's Artifacts for a job of `kind`: activations (with Grad-CAM too
        when `options.gradcam`), or Grad-CAM alone. Raises the image's ActvizError."""
        if kind == JobKind.GRADCAM:
            return self.gradcam(loaded, image, options)
        outcome = self.analyze(loaded, image, options)
        if not options.gradcam:
            return outcome
        from worker.engine.cam_pass import merge_cam

        self.expect_image()  # the same image again, for its own pass
        return merge_cam(outcome, self.gradcam(loaded, image, options))

    def gradcam(self, loaded: Any, image: bytes, options: JobOptions) -> Any:
        """One image's Grad-CAM Artifacts, from a shared pass when batching.

        Raises the image's ActvizError (InvalidImage, ImageTooLarge,
        ActivationsTooLarge, InvalidJob, NotDifferentiable).
        """
        batcher = self.batcher
        if batcher is None:
            return run_cam_alone(loaded, image, options, self.settings)
        return batcher.run_cam(loaded, image, options)

    @property
    def store(self) -> Store:
        if self._store is None:
            self._store = open_store(self.settings.storage_url)
        return self._store

    @property
    def s3(self) -> object:
        """One boto3 client for every bucket a job names (clients are costly to build)."""
        if self._s3 is None:
            self._s3 = s3_client()
        return self._s3

    def load_model(self, uri: str, *, settle: bool = True) -> tuple[Any, str, dict[str, float]]:
        """(LoadedModel, 'hit' | 'miss', {stage: ms}) for the model at `uri`.

        A miss settles the heap (`settle_heap`) unless `settle` is false (preload,
        which settles once after every model's warm-up).

        The source is asked for its version on every job (one HEAD on S3), so
        a replaced model file is picked up at once. Raises ModelNotAllowed,
        ModelNotFound, InvalidModel, UnsafeModel, StorageUnavailable.
        """
        from worker.engine import open_model

        with self._lock:
            model_lock = self._model_locks.setdefault(uri, threading.Lock())
        with model_lock:
            started = time.perf_counter()
            s3 = self.s3 if is_s3_uri(uri) else None
            model_file = fetch_model(uri, self.settings, s3)
            fetched = time.perf_counter()

            def load() -> Any:
                # A model that crashes its loader kills the process: the job loading it
                # is running here (worker/runtime/running.py), the ones waiting are not.
                with running.running_now(current_job_id()):
                    return open_model(str(model_file.path), uri=uri, trusted=model_file.trusted)

            loaded, event = self.cache.get_or_load(model_file.cache_key, load)
            done = time.perf_counter()
        STAGE_SECONDS.labels(stage="download_model").observe(fetched - started)
        if event == "miss":
            STAGE_SECONDS.labels(stage="load").observe(done - fetched)
            if settle:
                self.settle_heap()
        timings = {"download_model": (fetched - started) * 1000, "load": (done - fetched) * 1000}
        return loaded, event, timings

    def preload(self, uris: list[str] | tuple[str, ...], every_pass_size: bool = False) -> None:
        """Download, load and warm each model before the first job arrives: its pass of one
        image, or with `every_pass_size` (a worker on an accelerator, where each program
        takes seconds to compile) every pass size its batches can take, so the first
        jobs of a ready worker wait for no compile."""
        from worker.engine import pass_sizes, warmup

        if self.reports is not None:
            self.reports.start()
        sizes = pass_sizes(self.settings.batch_size) if every_pass_size else [1]
        for uri in uris:
            loaded, _, timings = self.load_model(uri, settle=False)
            started = time.perf_counter()
            warmup(loaded, JobOptions(), self.settings, sizes)
            log.info(
                "preloaded %s (load %.0f ms, warmup of pass sizes %s %.0f ms)",
                uri,
                timings["load"],
                ",".join(map(str, sizes)),
                (time.perf_counter() - started) * 1000,
            )
        if uris:
            self.settle_heap()  # the warm-up's programs too

    def settle_heap(self) -> None:
        """Freeze the long-lived heap out of full collections (worker/runtime/heap.py); not
        in the embedded mode, which runs in a user's own process."""
        if not self.settings.embedded:
            heap.settle()
