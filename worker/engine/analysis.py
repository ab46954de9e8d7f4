"""The engine's entry point: (model, images, options) -> grids, stats and manifest.

`analyze` preprocesses every image, runs one compiled pass (forward and
on-device reduction) per group of same-shaped images through the cached
extractor, then encodes each image's grids layer by layer on a thread pool
over the cores (`ForwardPass`, the pipeline the batcher runs too). A bad
image fails only its own slot; bad options or a bad layer spec fail the
whole call.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from producer.contract import JobOptions
from producer.errors import ActivationsTooLarge, ActvizError, InvalidJob
from producer.settings import Settings
from worker.engine.artifacts import Artifacts
from worker.engine.compiled import padded_size, pads, split_sizes
from worker.engine.extract import Extractor
from worker.engine.forward_pass import ForwardPass, PassImage, cpu_clock
from worker.engine.input_scale import integer_input
from worker.engine.loading import LoadedModel
from worker.engine.preprocess import PreparedImage, check_scale, preprocess, resolve_scale
from worker.engine.reduce import RenderKey
from worker.engine.render import colormap_lut

_encoders: ThreadPoolExecutor | None = None
_encoders_lock = threading.Lock()


def encoder_pool() -> ThreadPoolExecutor:
    """The process's PNG-encoding threads, one per core it may use (Pillow's
    encoder and numpy release the GIL)."""
    global _encoders
    with _encoders_lock:
        if _encoders is None:
            cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
            _encoders = ThreadPoolExecutor(
                cores or os.cpu_count() or 1, thread_name_prefix="actviz-encode"
            )
        return _encoders


def check_options(options: JobOptions, loaded: LoadedModel) -> None:
    """Raise InvalidJob for options no image could satisfy with `loaded`.

    The contract's checks (`JobOptions.validate`, the ones `submit` ran), then
    what needs the model or the worker: mean/std against the model's channels, a
    scale an integer input keeps (`check_integer_input`), and a colormap name
    matplotlib knows.
    """
    check_scale(options, loaded.input_shape[2])
    check_integer_input(options, loaded)
    colormap_lut(options.colormap)


def check_integer_input(options: JobOptions, loaded: LoadedModel) -> None:
    """Raise InvalidJob where the model's input is integer (uint8, int32: it takes pixel
    values 0..255, and rescales them itself) and `options.scale` is not 'none': the pass
    would truncate 1/255's fractions to 0 and 1, and every activation would be wrong."""
    dtype = integer_input(loaded.model)
    if dtype is not None and resolve_scale(options, loaded.auto_scale).scale != "none":
        raise InvalidJob(
            f"the model's input is {dtype}: it takes pixel values 0..255, not scaled ones; "
            f"submit with scale='none' (`--scale none`), not {options.scale!r}"
        )


def prepare_image(
    data: bytes,
    loaded: LoadedModel,
    extractor: Extractor,
    options: JobOptions,
    settings: Settings,
) -> PreparedImage:
    """Preprocess one image for `loaded` and check what its forward pass would hold.

    Raises InvalidImage, ImageTooLarge (see `preprocess`), ActivationsTooLarge
    (activations_too_large) when the image's input and selected layers, at
    the size the model is fed, exceed settings.max_image_activation_mb.
    """
    image = preprocess(data, loaded.input_shape, options, settings, loaded.auto_scale)
    height, width, _ = image.pixels.shape
    check_activation_budget(
        extractor.activation_bytes(image.pixels.shape),
        settings,
        f"at the {height}x{width} input this model is fed, one image makes {{mb}} of "
        "activations in the selected layers",
        "select fewer or smaller layers, or raise the limit on a worker with the memory",
    )
    return image


def check_activation_budget(need: int, settings: Settings, what: str, advice: str) -> None:
    """Raise ActivationsTooLarge (activations_too_large) when one image's `need` bytes
    exceed ACTVIZ_MAX_IMAGE_ACTIVATION_MB. `what` says what holds them, with '{mb}'
    where the size goes; `advice` what to do instead."""
    limit_mb = settings.max_image_activation_mb
    if need > limit_mb * 2**20:
        raise ActivationsTooLarge(
            f"{what.format(mb=f'{need / 2**20:.0f} MB')}, above the {limit_mb} MB limit "
            f"(ACTVIZ_MAX_IMAGE_ACTIVATION_MB); {advice}"
        )


def analyze(
    loaded: LoadedModel,
    images: list[bytes],
    options: JobOptions,
    settings: Settings,
) -> list[Artifacts | ActvizError]:
    """Analyze each image with `loaded`; one result per image, in order.

    Images of one shape share one forward pass. A slot holds an ActvizError
    (InvalidImage, ImageTooLarge, ActivationsTooLarge) when that image is bad.
    Raises InvalidJob (bad options) or UnknownLayer (bad layer spec) for all.
    """
    check_options(options, loaded)
    extractor = loaded.extractor(options.layers)
    results: list[Artifacts | ActvizError | None] = [None] * len(images)
    prepared: dict[int, PreparedImage] = {}
    timings: dict[int, dict[str, float]] = {}
    cpu: dict[int, dict[str, float]] = {}
    for i, data in enumerate(images):
        started, cpu_started = time.perf_counter(), cpu_clock(settings)
        try:
            prepared[i] = prepare_image(data, loaded, extractor, options, settings)
        except ActvizError as exc:
            results[i] = exc
            continue
        timings[i] = {"preprocess": _ms_since(started)}
        cpu[i] = {"preprocess": (cpu_clock(settings) - cpu_started) * 1000.0}
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, image in prepared.items():
        groups[image.pixels.shape].append(i)
    for members in groups.values():
        # The same pipeline as the batcher's, for one caller: its encodes over the cores.
        images = [PassImage(prepared[i], options, timings[i], cpu[i]) for i in members]
        pool = encoder_pool()
        futures = ForwardPass(loaded, extractor, images, settings).run(pool.submit)
        for i, future in zip(members, futures, strict=True):
            results[i] = future.result()
    return [r for r in results if r is not None]  # every slot is filled above


def pass_sizes(images: int, pad: bool | None = None) -> list[int]:
    """The pass sizes `Extractor.reduce` compiles a program for, for passes of 1 to
    `images` images: powers of two, up to the one a pass of `images` is padded to
    on an accelerator, or the largest one in it on a CPU (`pad`: see
    worker/engine/compiled.py `pads`)."""
    top = padded_size(images) if pads(pad) else split_sizes(images)[0]
    return [1 << bit for bit in range(top.bit_length())]


def warmup(
    loaded: LoadedModel,
    options: JobOptions | None = None,
    settings: Settings | None = None,
    sizes: tuple[int, ...] | list[int] = (1,),
) -> None:
    """Build the extractor for `options.layers` and run its compiled pass on gray images,
    once per pass size in `sizes` (each size is a program of its own), each layer
    reduced."""
    options = options or JobOptions()
    settings = settings or Settings()
    # Its gray images are no job's: any scale warms the same programs.
    check_options(dataclasses.replace(options, scale="none"), loaded)
    extractor = loaded.extractor(options.layers)
    height, width, channels = loaded.input_shape
    side = min(64, settings.max_side)
    key = RenderKey.of(options, settings)
    for size in sizes:
        shape = (size, height or side, width or side, channels)
        reduced = extractor.reduce(np.full(shape, 0.5, dtype=np.float32), key)
        for index in range(len(reduced)):  # a CPU's host loops compile on first use
            reduced.layer(index, 0)


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
