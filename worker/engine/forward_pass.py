"""One forward pass over images of one group, encoded layer by layer: the one pipeline.

`analyze` (images in process) and the micro-batcher (jobs of a worker) both
run their images through `ForwardPass`: preprocessed images of one model,
layer set, shape and render key go through one compiled program (the
forward pass and the on-device reduction, worker/engine/reduce.py), whose
uint8 grids and statistics come to the host; then every (layer, image) is
encoded and its statistics made JSON, image-major, so the pass's images
finish one after another rather than all at its end (their jobs report and
upload while the rest of the pass renders), and a layer's host copy is
dropped as soon as every image has taken it. On a CPU, the program
returns the float32 outputs, and each (layer, image) is reduced on the host
by the task that encodes it (worker/engine/host_reduce.py): its time counts
in the image's `render`, its CPU in `engine`. The encode tasks go through
`submit`: the batcher's and `analyze`'s thread pools, over the cores.

Each image's result arrives on its own Future: its Artifacts, or the first
error of its own rendering, which fails that image only.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from producer.contract import JobOptions
from producer.settings import Settings
from worker.engine.artifacts import ImageRender
from worker.engine.extract import Extractor, ReducedPass
from worker.engine.loading import LoadedModel
from worker.engine.preprocess import PreparedImage
from worker.engine.reduce import RenderKey

Submit = Callable[..., Any]


def run_inline(fn: Callable[..., Any], *args: Any) -> None:
    fn(*args)


def cpu_clock(settings: Settings) -> float:
    """This thread's CPU seconds when settings.stage_cpu, else 0 (no system call)."""
    return time.thread_time() if settings.stage_cpu else 0.0


@dataclass
class PassImage:
    """One image of a pass: its pixels, its job's options, its stage timings and CPU (ms)."""

    image: PreparedImage
    options: JobOptions
    timings: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, float] = field(default_factory=dict)


class ForwardPass:
    """Forward `images` through `extractor`, then encode each (layer, image) via `submit`.

    Every image's options must share one `RenderKey` (the first image's is used).

    `number` (the worker's pass counter) goes into each manifest's `batch`
    when given; `on_finished` runs once every image has its result; `futures`,
    one per image, receive the results when given.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        extractor: Extractor,
        images: list[PassImage],
        settings: Settings,
        number: int | None = None,
        on_finished: Callable[[ForwardPass], None] | None = None,
        futures: list[Future] | None = None,
    ) -> None:
        self.loaded = loaded
        self.extractor = extractor
        self.images = images
        self.settings = settings
        self.number = number
        self.on_finished = on_finished
        # Where each image's result goes: the caller's futures (a job thread waits on
        # its own), or new ones.
        self.futures: list[Future] = futures or [Future() for _ in images]
        self.outputs: ReducedPass | None = None
        self._lock = threading.Lock()

    def run(self, submit: Submit = run_inline) -> list[Future]:
        """The forward pass here; renders through `submit(fn, *args)`, whose last argument is
        always the image's position in the pass. Returns the futures.

        A forward-pass error propagates to the caller (it concerns every image).
        """
        pixels = np.stack([item.image.pixels for item in self.images])
        key = RenderKey.of(self.images[0].options, self.settings)
        measure = self.settings.stage_cpu
        started, cpu_started = time.perf_counter(), cpu_clock(self.settings)
        self.outputs = outputs = self.extractor.reduce(pixels, key)
        self._forward_end = time.perf_counter()
        forward_ms = (self._forward_end - started) * 1000.0
        # The pass's host CPU (dispatch, copy), shared by its images.
        engine_cpu_ms = (cpu_clock(self.settings) - cpu_started) * 1000.0 / len(self.images)
        del pixels
        self.renders = []
        for item in self.images:
            item.timings["forward"] = forward_ms
            if measure:
                item.cpu["engine"] = engine_cpu_ms
            cpu = item.cpu if measure else None
            self.renders.append(ImageRender(item.image, item.options, item.timings, cpu))
        count = len(self.images)
        self._layers_left = [count] * len(outputs)  # images still to take each layer
        self._images_left = [len(outputs) + 1] * count  # tasks still to run per image
        self._errors: list[BaseException | None] = [None] * count
        self._unfinished = count
        if not len(outputs):  # no layer to render: the images are done already
            for position in range(count):
                self._finish(position)
            return self.futures
        # Image-major: every layer of the first image, then of the next, so the pass's
        # images finish one after another (the first after about 1/count of the pass's
        # rendering) instead of all at its end; the pool's threads still share each
        # image's layers. A layer's host copy is dropped when its last image took it.
        # The input's PNG is a task of its own, after the first (largest) layer's, so
        # that another thread encodes it while that one renders, not after the last.
        for position in range(count):
            for index in range(len(outputs)):
                submit(self._layer, index, position)
                if index == 0:
                    submit(self._input, position)
        return self.futures

    def _input(self, position: int) -> None:
        """Encode image `position`'s input PNG; finish the image if it was its last task."""
        self._run(position, None, self.renders[position].add_input)

    def _layer(self, index: int, position: int) -> None:
        """Encode layer `index` of image `position`; finish the image if it was its last task."""
        self._run(position, index, self._render_layer, index, position)

    def _render_layer(self, index: int, position: int) -> None:
        assert self.outputs is not None
        render = self.renders[position]
        started, cpu_started = time.perf_counter(), cpu_clock(self.settings)
        layer = self.outputs.layer(index, position)  # on a CPU, reduced here
        if self.outputs.key is not None:
            render.add_reduction(
                (time.perf_counter() - started) * 1000.0,
                (cpu_clock(self.settings) - cpu_started) * 1000.0,
            )
        render.add_layer(index, self.extractor.refs[index], layer)

    def _run(self, position: int, layer: int | None, work: Callable[..., None], *args: int) -> None:
        """One task of image `position`: `work(*args)` unless the image failed already (its
        first error goes to its job); then drop layer `layer`'s host copy once every image
        has taken it, and finish the image after its last task."""
        assert self.outputs is not None
        try:
            if self._errors[position] is None:
                work(*args)
        except BaseException as exc:  # noqa: BLE001 (the image's own job gets the error)
            self._errors[position] = self._errors[position] or exc
        release = False
        with self._lock:
            if layer is not None:
                self._layers_left[layer] -= 1
                release = self._layers_left[layer] == 0
            self._images_left[position] -= 1
            done = self._images_left[position] == 0
        if release:
            self.outputs.release(layer)
        if done:
            self._finish(position)

    def _finish(self, position: int) -> None:
        assert self.outputs is not None
        future, error = self.futures[position], self._errors[position]
        try:
            if error is not None:
                raise error
            info = {"size": len(self.images), "position": position}
            if self.number is not None:
                info["number"] = self.number
            info["activation_bytes"] = self.outputs.activation_bytes
            info["d2h_bytes"] = self.outputs.d2h_bytes
            # Wall time from the pass's end to this image's last layer: its own layers'
            # work (`render`, `stats`) and their wait behind the pass's other images.
            wall_ms = (time.perf_counter() - self._forward_end) * 1000.0
            self.images[position].timings["render_wall"] = wall_ms
            radii = None
            if self.images[position].options.census:
                radii = self.extractor.receptive_radii(self.images[position].image.pixels.shape)
            artifacts = self.renders[position].finish(self.loaded, self.extractor.refs, info, radii)
            future.set_result(artifacts)
        except BaseException as exc:  # noqa: BLE001
            if not future.done():
                future.set_exception(exc)
        finally:
            with self._lock:
                self._unfinished -= 1
                last = self._unfinished == 0
            if last and self.on_finished is not None:
                self.on_finished(self)
