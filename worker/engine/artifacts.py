"""One image's results, built one layer at a time: grids, statistics, manifest.

    render = ImageRender(prepared, options, settings, timings)
    render.add_layer(index, ref, activations)      # (H, W, C) float32, any order
    artifacts = render.finish(loaded, refs, batch_info)

`ForwardPass` (worker/engine/forward_pass.py) drives it for every image of a pass.
"""

from __future__ import annotations

import io
import threading
import time
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
from producer.settings import Settings
from worker.engine.layers import LayerRef
from worker.engine.loading import LoadedModel
from worker.engine.manifest import build_manifest
from worker.engine.preprocess import PreparedImage
from worker.engine.render import (
    STRIP_MAX_VALUES,
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
