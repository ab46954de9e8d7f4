"""The engine's entry point: (model, images, options) -> grids, stats and manifest.

`analyze` preprocesses every image, runs one forward pass per group of
same-shaped images through the cached extractor, then renders and measures
each image layer by layer. A bad image fails only its own slot; bad options
or a bad layer spec fail the whole call.
"""

from __future__ import annotations

import io
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from producer.contract import (
    ACTIVATIONS_FILE,
    INPUT_FILE,
    JobOptions,
    channel_name,
    channels_dir,
    layer_grid_name,
    layer_stem,
    overlay_name,
)
from producer.errors import ActivationsTooLarge, ActvizError, InvalidJob
from producer.settings import Settings
from worker.engine.extract import Extractor
from worker.engine.layers import LayerRef
from worker.engine.loading import LoadedModel
from worker.engine.manifest import build_manifest
from worker.engine.preprocess import PreparedImage, check_scale, preprocess
from worker.engine.render import (
    STRIP_MAX_VALUES,
    check_normalize,
    colormap_lut,
    encode_png,
    render_channel,
    render_grid,
    render_overlay,
    render_strip,
)
from worker.engine.stats import channel_stats, json_stats, layer_summary


@dataclass
class Artifacts:
    """One image's results: the manifest and the files it names.

    `files` keys are relative to the job folder: "input.png",
    "layers/NN-name.png", "overlays/NN-name.png", "channels/NN-name/CCC.png",
    "activations.npz". The caller fills manifest["job_id"] and
    manifest["image"]["uri"], then writes manifest.json last.
    """

    manifest: dict[str, Any]
    files: dict[str, bytes] = field(default_factory=dict)


def check_options(options: JobOptions, channels: int) -> None:
    """Raise InvalidJob for options no image could satisfy."""
    check_scale(options, channels)
    check_normalize(options.normalize, options.percentile)
    colormap_lut(options.colormap)
    if options.top_k < 0:
        raise InvalidJob(f"top_k must be >= 0, got {options.top_k}")


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
    image = preprocess(data, loaded.input_shape, options, settings)
    need = extractor.activation_bytes(image.pixels.shape)
    limit = settings.max_image_activation_mb * 2**20
    if need > limit:
        height, width, _ = image.pixels.shape
        raise ActivationsTooLarge(
            f"at the {height}x{width} input this model is fed, one image makes "
            f"{need / 2**20:.0f} MB of activations in the selected layers, above the "
            f"{settings.max_image_activation_mb} MB limit (ACTVIZ_MAX_IMAGE_ACTIVATION_MB); "
            "select fewer or smaller layers, or raise the limit on a worker with the memory"
        )
    return image


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
    check_options(options, loaded.input_shape[2])
    extractor = loaded.extractor(options.layers)
    results: list[Artifacts | ActvizError | None] = [None] * len(images)
    prepared: dict[int, PreparedImage] = {}
    timings: dict[int, dict[str, float]] = {}
    for i, data in enumerate(images):
        started = time.perf_counter()
        try:
            prepared[i] = prepare_image(data, loaded, extractor, options, settings)
        except ActvizError as exc:
            results[i] = exc
            continue
        timings[i] = {"preprocess": _ms_since(started)}
    groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
    for i, image in prepared.items():
        groups[image.pixels.shape].append(i)
    for members in groups.values():
        batch = np.stack([prepared[i].pixels for i in members])
        started = time.perf_counter()
        outputs = extractor.forward(batch)
        forward_ms = _ms_since(started)
        del batch
        renders = {}
        for i in members:
            timings[i]["forward"] = forward_ms
            renders[i] = ImageRender(prepared[i], options, settings, timings[i])
        # Layer by layer: only one layer of the pass is on the host as float32 at a time.
        for index, ref in enumerate(extractor.refs):
            layer = outputs.host(index)
            for j, i in enumerate(members):
                renders[i].add_layer(index, ref, layer[j])
            del layer
            outputs.release(index)
        for j, i in enumerate(members):
            info = {
                "size": len(members),
                "position": j,
                "activation_bytes": outputs.nbytes,
                "host_peak_bytes": outputs.peak_bytes,
            }
            results[i] = renders[i].finish(loaded, extractor.refs, batch=info)
    return [r for r in results if r is not None]  # every slot is filled above


def warmup(
    loaded: LoadedModel, options: JobOptions | None = None, settings: Settings | None = None
) -> None:
    """Build the extractor for `options.layers` and run it once on a gray image."""
    options = options or JobOptions()
    settings = settings or Settings()
    check_options(options, loaded.input_shape[2])
    extractor = loaded.extractor(options.layers)
    height, width, channels = loaded.input_shape
    side = min(64, settings.max_side)
    shape = (1, height or side, width or side, channels)
    extractor(np.full(shape, 0.5, dtype=np.float32))


class ImageRender:
    """One image's Artifacts, built one layer at a time.

    `add_layer` renders a layer's grid (and channel PNGs, overlay) and its
    statistics, keeping only what it produced (PNG bytes, JSON-ready stats,
    a float16 copy when `save_npz`), so a caller can drop the layer's float32
    activations as soon as every image has taken its layer. Layers may be
    added in any order and from several threads; `finish` (once all are in)
    builds the manifest.
    """

    def __init__(
        self,
        image: PreparedImage,
        options: JobOptions,
        settings: Settings,
        timings: dict[str, float],
    ) -> None:
        self.image = image
        self.options = options
        self.settings = settings
        self.timings = timings
        self._files: dict[int, dict[str, bytes]] = {}
        self._entries: dict[int, dict[str, Any]] = {}
        self._npz: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._render_ms = self._stats_ms = 0.0

    def add_layer(self, index: int, ref: LayerRef, act: np.ndarray) -> None:
        """Render and measure layer `index` (`ref`) from its (*output_shape) activations."""
        files: dict[str, bytes] = {}
        started = time.perf_counter()
        stats = channel_stats(act)
        stats_ms = _ms_since(started)
        started = time.perf_counter()
        bounds = (stats["min"], stats["max"])  # the grid's normalization reuses them
        entry = _render_layer(ref, act, self.image, self.options, self.settings, files, bounds)
        render_ms = _ms_since(started)
        started = time.perf_counter()
        entry["stats"] = json_stats(stats)
        entry["summary"] = layer_summary(stats, self.options.top_k)
        stats_ms += _ms_since(started)
        half = act.astype(np.float16) if self.options.save_npz else None
        with self._lock:
            self._entries[index] = entry
            self._files[index] = files
            if half is not None:
                self._npz[index] = half
            self._render_ms += render_ms
            self._stats_ms += stats_ms

    def finish(self, loaded: LoadedModel, refs: list[LayerRef], batch: dict[str, Any]) -> Artifacts:
        """The Artifacts, once `add_layer` has run for every ref."""
        layers = [self._entries[index] for index in range(len(refs))]
        # Files in model order, whatever order the layers were rendered in.
        files = {INPUT_FILE: encode_png(self.image.display)}
        for index in range(len(refs)):
            files.update(self._files[index])
        if self.options.save_npz:
            files[ACTIVATIONS_FILE] = _npz(refs, [self._npz[i] for i in range(len(refs))])
        self.timings.update(render=self._render_ms, stats=self._stats_ms)
        image = self.image
        record = dict(image.record)
        manifest = build_manifest(
            model={
                "uri": loaded.uri,
                "sha256": loaded.sha256,
                "name": loaded.model.name,
                "class_name": type(loaded.model).__name__,
                "input_shape": list(loaded.input_shape),
            },
            image={
                "sha256": image.sha256,
                "original_size": list(image.original_size),
                "format": record.pop("format", None),
                "mode": record.pop("mode", None),
            },
            preprocessing=record,
            options=self.options,
            engine={"backend": keras.backend.backend(), "keras": keras.__version__},
            layers=layers,
            files=list(files),
            timings_ms=self.timings,
            batch=batch,
        )
        return Artifacts(manifest=manifest, files=files)


def _render_layer(
    ref: LayerRef,
    act: np.ndarray,
    image: PreparedImage,
    options: JobOptions,
    settings: Settings,
    files: dict[str, bytes],
    bounds: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    key = layer_grid_name(ref.index, ref.name)
    entry: dict[str, Any] = {
        "name": ref.name,
        "index": ref.index,
        "class_name": ref.class_name,
        "output_shape": list(act.shape),
        "spatial": act.ndim == 3,
        "grid": None,
    }
    if act.ndim == 3:
        png, grid, indices = render_grid(
            act,
            options.normalize,
            options.colormap,
            percentile=options.percentile,
            max_side=settings.max_grid_side,
            bounds=bounds,
        )
        files[key] = png
        entry["grid"] = {"png": key, **grid.to_dict()}
        if options.channel_pngs:
            entry["channels_dir"] = channels_dir(ref.index, ref.name)
            for c in range(indices.shape[-1]):
                files[channel_name(ref.index, ref.name, c)] = render_channel(
                    indices[:, :, c], options.colormap
                )
        if options.overlay:
            overlay = overlay_name(ref.index, ref.name)
            files[overlay] = render_overlay(image.display, act, options.colormap)
            entry["overlay"] = overlay
    elif 0 < act.size <= STRIP_MAX_VALUES:
        png, grid = render_strip(act, options.colormap)
        files[key] = png
        entry["grid"] = {"png": key, **grid.to_dict()}
    return entry


def _npz(refs: list[LayerRef], activations: list[np.ndarray]) -> bytes:
    """float16 activations keyed 'NN-name' (the grid file stem)."""
    arrays = {
        layer_stem(ref.index, ref.name): act.astype(np.float16, copy=False)
        for ref, act in zip(refs, activations, strict=True)
    }
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
