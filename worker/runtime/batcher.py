"""Micro-batching: images of different jobs that share a model and layer set share one forward pass.

With ACTVIZ_BATCH_SIZE > 1 a worker runs its jobs on a pool of threads
(worker/runtime/pool.py). Each job's thread fetches and preprocesses its own image,
then calls `Batcher.run(...)`. The batcher's one forward thread takes the
oldest waiting image and every waiting image of its group (same extractor,
i.e. same model and layer set; same preprocessed shape; same render key:
normalization and what the job asks for besides grids), up to `batch_size`,
waiting at most `batch_wait_ms` for the group to fill, and runs one compiled
pass (forward and on-device reduction, worker/engine/reduce.py). Each
image's grids are PNG-encoded on a pool of threads sized to the cores
(Pillow's encoder and numpy release the GIL), and the job's own thread gets
back its Artifacts and uploads them. On a CPU, whose cores also run the next
pass's forward and the other jobs' threads, a pass renders on one thread
fewer while other jobs are in the batcher (`cores.loaded_render_threads`);
a job alone renders on them all.

So every job keeps its own Celery task: its own result, stages, retries,
delivery count and late acknowledgement after its own manifest is written.

Pipelining: the forward thread starts batch k+1 as soon as batch k's
outputs are handed to the render pool, while batch k renders and uploads.
At most `PIPELINE_DEPTH` batches are alive at once.

Memory: a pass's float32 outputs live on the device only; what reaches the
host is uint8 grid canvases and statistics vectors (plus the float16
activations of jobs that ask for the npz). The pool encodes one task per
layer and image, image-major (an image's layers, then the next image's: the
batch's images finish one after another), and a layer's host copy is dropped
as soon as every image has taken it. Each
manifest's `batch` reports `activation_bytes` (every layer of the pass,
float32, on the device) and `d2h_bytes` (what the pass copied to the host).
A pass's size is bounded in bytes as well as in images: a pass takes at most
`batch_max_mb` worth of float32 outputs (`images_per_pass`, from the output
shapes, known before the pass), never fewer than one image. So a worker holds
at most 2 x max(batch_max_mb, one image's activations) where they are computed.
"""

from __future__ import annotations

import contextvars
import itertools
import logging
import threading
import time
from collections.abc import Hashable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from producer.contract import JobOptions
from producer.errors import ActvizError
from producer.settings import Settings
from worker.logs import current_job_id
from worker.metrics import ACTIVATION_BYTES, BATCH_IMAGES, D2H_BYTES
from worker.runtime import cores, running
from worker.runtime.pixel_budget import PixelBudget

log = logging.getLogger(__name__)

PIPELINE_DEPTH = 2
# How often a job's thread wakes while it waits, so a soft time limit can interrupt it.
WAIT_POLL_S = 0.1


@dataclass
class Pending:
    """One preprocessed image waiting for a forward pass."""

    key: Hashable
    arrived: float
    payload: Any = None
    # The job thread's context (its job id for log lines) follows the image into the render pool.
    context: contextvars.Context = field(default_factory=contextvars.copy_context)
    future: Future = field(default_factory=Future)
    # Its job, charged if the process dies from the pass on (worker/runtime/running.py).
    job_id: str | None = field(default_factory=current_job_id)


def group_key(extractor: object, shape: tuple[int, ...], render: Hashable = None) -> Hashable:
    """Images with equal keys may share a forward pass.

    Same extractor object (one per model and resolved layer set), same
    preprocessed (H, W, C) and same `RenderKey` (one compiled program). A job
    delivered again after its worker died does not come here: it runs in a
    process of its own (worker/runtime/quarantine.py).
    """
    return (id(extractor), tuple(shape), render)


def take_batch(pending: list[Pending], batch_size: int) -> list[Pending]:
    """Remove and return the oldest item and the next items of its group, at most `batch_size`.

    Items of other groups keep their places (first come, first served).
    """
    if not pending:
        return []
    key = pending[0].key
    taken = [p for p in pending if p.key == key][: max(1, batch_size)]
    chosen = {id(p) for p in taken}
    pending[:] = [p for p in pending if id(p) not in chosen]
    return taken


def images_per_pass(batch_size: int, max_bytes: int, image_bytes: int) -> int:
    """How many images of a group one forward pass takes.

    `image_bytes`: the float32 outputs one image of the group makes (all
    selected layers). Never fewer than 1.
    """
    return max(1, min(batch_size, max_bytes // max(1, image_bytes)))


def batch_ready(
    pending: list[Pending], batch_size: int, wait_s: float, now: float, incoming: int
) -> bool:
    """Whether the oldest item's group should run now.

    Yes when the group is full, when the oldest item has waited `wait_s`,
    or when no other job is on its way (`incoming` jobs are being fetched
    and preprocessed by their threads): waiting could only add latency.
    """
    if not pending:
        return False
    key = pending[0].key
    members = sum(1 for p in pending if p.key == key)
    return members >= batch_size or now - pending[0].arrived >= wait_s or incoming == 0


@dataclass
class _Work:
    """What a job hands to the batcher: its model, layers, image and options."""

    loaded: Any
    extractor: Any
    image: Any  # worker.engine.PreparedImage
    options: JobOptions
    timings: dict[str, float]
    cpu: dict[str, float]


@dataclass
class _CamWork:
    """What a Grad-CAM job hands to the batcher (see `Batcher.run_cam`)."""

    loaded: Any
    cam: Any  # worker.engine.gradcam.CamModel
    key: Any  # its CamKey
    row: list[int]
    image: Any
    options: JobOptions
    timings: dict[str, float]
    cpu: dict[str, float]


class Batcher:
    """One forward thread per worker process plus a render pool; see the module doc."""

    def __init__(self, settings: Settings, render_threads: int | None = None) -> None:
        self.settings = settings
        self.batch_size = max(1, settings.batch_size)
        self.wait_s = max(0, settings.batch_wait_ms) / 1000.0
        self.max_bytes = max(1, settings.batch_max_mb) * 2**20
        self.decode_budget = PixelBudget(settings.decode_budget_mp * 1_000_000)
        self._pending: list[Pending] = []
        self._incoming = 0
        self._jobs = 0  # from `expect` to the job's result: preprocessing, waiting, rendering
        self._cond = threading.Condition()
        self._slots = threading.BoundedSemaphore(PIPELINE_DEPTH)
        from worker.engine.compiled import reduces_on_host

        threads = render_threads or cores.render_threads(settings)  # its share of the cores
        self._render = ThreadPoolExecutor(threads, thread_name_prefix="actviz-render")
        # The pool of a pass rendered while other jobs are in the batcher: on a CPU, one
        # thread fewer (the cores run the next pass's forward and those jobs' threads).
        loaded = cores.loaded_render_threads(threads, reduces_on_host())
        self._render_loaded = self._render
        if loaded < threads:
            self._render_loaded = ThreadPoolExecutor(loaded, thread_name_prefix="actviz-render")
        self._batches = itertools.count(1)
        self._thread = threading.Thread(target=self._loop, name="actviz-forward", daemon=True)
        self._thread.start()

    def expect(self) -> None:
        """A job has started and will call `run` (or `cancel`) soon."""
        with self._cond:
            self._incoming += 1
            self._jobs += 1

    def cancel(self) -> None:
        """A job that called `expect` will not call `run` (it failed before its forward pass)."""
        with self._cond:
            self._incoming = max(0, self._incoming - 1)
            self._jobs = max(0, self._jobs - 1)
            self._cond.notify_all()

    def _wait(self, future: Future) -> Any:
        """The job's result, from its own thread; then the job has left the batcher."""
        try:
            return wait_result(future)
        finally:
            with self._cond:
                self._jobs = max(0, self._jobs - 1)

    def _submitter(self, batch: list[Pending]) -> Any:
        """`submit(fn, *args)` for `batch`'s render tasks, whose last argument is the image's
        position: each runs in a copy of its job's context (its job id for log lines; a
        context is entered by one thread at a time), on every render thread when the
        batch's jobs are alone in the batcher, on `_render_loaded` while others
        preprocess, wait or render."""
        with self._cond:
            alone = self._jobs <= len(batch)
        pool = self._render if alone else self._render_loaded
        contexts = [item.context for item in batch]

        def submit(fn: Any, *args: int) -> None:
            pool.submit(contexts[args[-1]].copy().run, fn, *args)

        return submit

    def run(
        self,
        loaded: Any,
        image_bytes: bytes,
        options: JobOptions,
    ) -> Any:
        """Preprocess one image here, forward it in a shared batch, render it; -> Artifacts.

        Call `expect()` first. Raises what `analyze` raises for one image:
        InvalidJob, UnknownLayer, InvalidImage, ImageTooLarge, ActivationsTooLarge; an unexpected
        forward-pass error is raised in every job of that batch.
        """
        from worker.engine import check_options, prepare_image
        from worker.engine.forward_pass import cpu_clock
        from worker.engine.preprocess import decoded_pixels
        from worker.engine.reduce import RenderKey

        try:
            started, cpu_started = time.perf_counter(), cpu_clock(self.settings)
            check_options(options, loaded)
            extractor = loaded.extractor(options.layers)
            pixels = decoded_pixels(image_bytes, loaded.input_shape, self.settings)
            with self.decode_budget.reserve(pixels):
                image = prepare_image(image_bytes, loaded, extractor, options, self.settings)
            timings = {"preprocess": (time.perf_counter() - started) * 1000.0}
            cpu = {"preprocess": (cpu_clock(self.settings) - cpu_started) * 1000.0}
        except BaseException:
            self.cancel()
            raise
        work = _Work(loaded, extractor, image, options, timings, cpu)
        render = RenderKey.of(options, self.settings)
        item = Pending(group_key(extractor, image.pixels.shape, render), time.monotonic(), work)
        with self._cond:
            self._incoming = max(0, self._incoming - 1)
            self._pending.append(item)
            self._cond.notify_all()
        return self._wait(item.future)

    def run_cam(self, loaded: Any, image_bytes: bytes, options: JobOptions) -> Any:
        """Grad-CAM for one image in a shared pass (same model, layer, input shape and
        CamKey); -> Artifacts. Call `expect()` first. Raises what `analyze_cam` raises."""
        from worker.engine import check_options
        from worker.engine.cam_pass import cam_of, prepare_cam_image
        from worker.engine.forward_pass import cpu_clock
        from worker.engine.preprocess import decoded_pixels

        try:
            started, cpu_started = time.perf_counter(), cpu_clock(self.settings)
            check_options(options, loaded)
            cam, key, row = cam_of(loaded, options)
            pixels = decoded_pixels(image_bytes, loaded.input_shape, self.settings)
            with self.decode_budget.reserve(pixels):
                image = prepare_cam_image(image_bytes, loaded, cam, key, options, self.settings)
            timings = {"preprocess": (time.perf_counter() - started) * 1000.0}
            cpu = {"preprocess": (cpu_clock(self.settings) - cpu_started) * 1000.0}
        except BaseException:
            self.cancel()
            raise
        work = _CamWork(loaded, cam, key, row, image, options, timings, cpu)
        item = Pending(("gradcam", id(cam), image.pixels.shape, key), time.monotonic(), work)
        with self._cond:
            self._incoming = max(0, self._incoming - 1)
            self._pending.append(item)
            self._cond.notify_all()
        return self._wait(item.future)

    def _loop(self) -> None:
        while True:
            # A free pipeline slot first: images that arrive while earlier batches
            # still render join the next batch instead of waiting behind a small one.
            self._slots.acquire()
            with self._cond:
                while not batch_ready(
                    self._pending,
                    self._size_for(self._pending),
                    self.wait_s,
                    time.monotonic(),
                    self._incoming,
                ):
                    timeout = None
                    if self._pending:
                        timeout = max(
                            0.0, self._pending[0].arrived + self.wait_s - time.monotonic()
                        )
                    self._cond.wait(timeout)
                batch = take_batch(self._pending, self._size_for(self._pending))
            try:
                self._forward(batch)
            except BaseException as exc:  # noqa: BLE001 (every job of the batch gets the error)
                self._slots.release()
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)

    def _size_for(self, pending: list[Pending]) -> int:
        """Images per pass for the oldest waiting image's group."""
        if not pending:
            return self.batch_size
        work = pending[0].payload
        if isinstance(work, _CamWork):
            per_image = work.cam.image_bytes(work.image.pixels.shape, work.key.count)
        else:
            per_image = work.extractor.output_bytes(work.image.pixels.shape)
        return images_per_pass(self.batch_size, self.max_bytes, per_image)

    def _forward(self, batch: list[Pending]) -> None:
        from worker.engine import ForwardPass, PassImage

        running.mark_running(item.job_id for item in batch)
        if isinstance(batch[0].payload, _CamWork):
            self._cam_pass(batch)
            return
        first: _Work = batch[0].payload
        now = time.monotonic()
        images = []
        for item in batch:
            work: _Work = item.payload
            work.timings["batch_wait"] = (now - item.arrived) * 1000.0
            images.append(PassImage(work.image, work.options, work.timings, work.cpu))
        forward = ForwardPass(
            first.loaded,
            first.extractor,
            images,
            self.settings,
            number=next(self._batches),
            on_finished=self._pass_finished,
            futures=[item.future for item in batch],
        )
        forward.run(self._submitter(batch))
        outputs = forward.outputs
        BATCH_IMAGES.observe(len(batch))
        ACTIVATION_BYTES.observe(outputs.activation_bytes)
        D2H_BYTES.observe(outputs.d2h_bytes)

    def _cam_pass(self, batch: list[Pending]) -> None:
        from worker.engine import PassImage
        from worker.engine.cam_pass import CamPass

        first: _CamWork = batch[0].payload
        now = time.monotonic()
        images, rows = [], []
        for item in batch:
            work: _CamWork = item.payload
            work.timings["batch_wait"] = (now - item.arrived) * 1000.0
            images.append(PassImage(work.image, work.options, work.timings, work.cpu))
            rows.append(work.row)
        cam_pass = CamPass(
            first.loaded,
            first.cam,
            first.key,
            images,
            rows,
            self.settings,
            number=next(self._batches),
            on_finished=self._pass_finished,
            futures=[item.future for item in batch],
        )
        cam_pass.run(self._submitter(batch))
        BATCH_IMAGES.observe(len(batch))

    def _pass_finished(self, forward: Any) -> None:
        """Every image of a pass has its result: free its pipeline slot."""
        self._slots.release()


def wait_result(future: Future) -> Any:
    """`future.result()`, waking every WAIT_POLL_S so an async exception can land."""
    while True:
        try:
            return future.result(timeout=WAIT_POLL_S)
        except TimeoutError:
            continue


def run_cam_alone(loaded: Any, image_bytes: bytes, options: JobOptions, settings: Settings) -> Any:
    """Batch size 1: Grad-CAM for one image in the job's thread; -> Artifacts."""
    from worker.engine.cam_pass import analyze_cam

    BATCH_IMAGES.observe(1)
    (outcome,) = analyze_cam(loaded, [image_bytes], options, settings)
    if isinstance(outcome, ActvizError):
        raise outcome
    return outcome


def run_alone(loaded: Any, image_bytes: bytes, options: JobOptions, settings: Settings) -> Any:
    """Batch size 1: `analyze` on one image in the job's thread; -> Artifacts.

    Raises the image's ActvizError, as `Batcher.run` does.
    """
    from worker.engine import analyze

    BATCH_IMAGES.observe(1)
    (outcome,) = analyze(loaded, [image_bytes], options, settings)
    if isinstance(outcome, ActvizError):
        raise outcome
    return outcome
