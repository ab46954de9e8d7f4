"""One image's results, built one layer at a time: grids, statistics, manifest.

    render = ImageRender(prepared, options, timings, cpu)
    render.add_layer(index, ref, host_layer)       # a reduced layer (HostLayer), any order
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
from worker.engine.layers import LayerRef
from worker.engine.loading import LoadedModel
from worker.engine.manifest import build_manifest
from worker.engine.preprocess import PreparedImage
from worker.engine.reduce import HostLayer
from worker.engine.render import (
    channel_tile,
    colormap_lut,
    encode_palette_png,
    encode_png,
    render_channel,
    render_overlay,
    render_strip,
)
from worker.engine.stats import json_stats, layer_summary, stats_from_moments


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

    `add_layer` encodes a reduced layer's grid (and channel PNGs, overlay)
    and turns its moments into statistics, keeping only what it produced
    (PNG bytes, JSON-ready stats, the float16 copy when `save_npz`), so a
    caller can drop the pass's copy of a layer as soon as every image has
    taken it. Layers may be added in any order and from several threads;
    `finish` (once all are in) builds the manifest.
    """

    def __init__(
        self,
        image: PreparedImage,
        options: JobOptions,
        timings: dict[str, float],
        cpu: dict[str, float] | None = None,
    ) -> None:
        self.image = image
        self.options = options
        # Where the encode CPU goes when it is measured (settings.stage_cpu), else None.
        self.cpu = cpu
        self.timings = timings
        self._files: dict[int, dict[str, bytes]] = {}
        self._entries: dict[int, dict[str, Any]] = {}
        self._npz: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self._render_ms = self._stats_ms = 0.0
        self._input_png: bytes | None = None

    def add_reduction(self, wall_ms: float, cpu_ms: float) -> None:
        """Count a layer's reduction on the host (a CPU's pass, worker/engine/host_reduce.py):
        its time in `render`, as the pass's other work on this image, and its CPU in `engine`."""
        with self._lock:
            self._render_ms += wall_ms
            if self.cpu is not None:
                self.cpu["engine"] = self.cpu.get("engine", 0.0) + cpu_ms

    def add_input(self) -> None:
        """Encode the input image's PNG now (a task of its own beside the layers', so that
        `finish` does not encode it after the last layer); `finish` encodes it otherwise."""
        cpu_started = _cpu_now(self.cpu)
        png = encode_png(self.image.display)
        with self._lock:
            self._input_png = png
            if self.cpu is not None:
                self.cpu["encode"] = self.cpu.get("encode", 0.0) + _ms_since_cpu(cpu_started)

    def add_layer(self, index: int, ref: LayerRef, layer: HostLayer) -> None:
        """Encode and measure layer `index` (`ref`) from its reduced results for this image."""
        files: dict[str, bytes] = {}
        cpu_started = _cpu_now(self.cpu)
        started = time.perf_counter()
        entry = _render_layer(ref, layer, self.image, self.options, files)
        render_ms = _ms_since(started)
        started = time.perf_counter()
        stats = stats_from_moments(layer.moments, layer.zeros, layer.count)
        entry["stats"] = json_stats(stats)
        if layer.peaks is not None:  # a census job's: exact zero counts, peak positions
            entry["stats"]["zeros"] = np.asarray(layer.zeros).astype(int).tolist()
            entry["stats"]["peak"] = np.asarray(layer.peaks).astype(int).tolist()
        entry["summary"] = layer_summary(stats, self.options.top_k)
        stats_ms = _ms_since(started)
        cpu_ms = (_cpu_now(self.cpu) - cpu_started) * 1000.0
        with self._lock:
            if self.cpu is not None:
                self.cpu["encode"] = self.cpu.get("encode", 0.0) + cpu_ms
            self._entries[index] = entry
            self._files[index] = files
            if layer.half is not None:
                self._npz[index] = layer.half
            self._render_ms += render_ms
            self._stats_ms += stats_ms

    def finish(
        self,
        loaded: LoadedModel,
        refs: list[LayerRef],
        batch: dict[str, Any],
        radii: list[int | None] | None = None,
    ) -> Artifacts:
        """The Artifacts, once `add_layer` has run for every ref. `radii`: each layer's
        measured receptive-field radius (census jobs), written as "receptive_radius"."""
        layers = [self._entries[index] for index in range(len(refs))]
        for layer, radius in zip(layers, radii or [], strict=False):
            layer["receptive_radius"] = radius
        # Files in model order, whatever order the layers were rendered in.
        cpu_started = _cpu_now(self.cpu)
        files = {INPUT_FILE: self._input_png or encode_png(self.image.display)}
        for index in range(len(refs)):
            files.update(self._files[index])
        if self.options.save_npz:
            files[ACTIVATIONS_FILE] = _npz(refs, [self._npz[i] for i in range(len(refs))])
        self.timings.update(render=self._render_ms, stats=self._stats_ms)
        if self.cpu is not None:
            self.cpu["encode"] = self.cpu.get("encode", 0.0) + _ms_since_cpu(cpu_started)
        image, preprocessing = image_record(self.image)
        manifest = build_manifest(
            model=model_record(loaded),
            image=image,
            preprocessing=preprocessing,
            options=self.options,
            engine={"backend": keras.backend.backend(), "keras": keras.__version__},
            layers=layers,
            files=list(files),
            timings_ms=self.timings,
            cpu_ms=self.cpu,
            batch=batch,
        )
        return Artifacts(manifest=manifest, files=files)


def model_record(loaded: LoadedModel) -> dict[str, Any]:
    """The manifest's "model" entry (the lifecycle adds its uri as the job named it)."""
    return {
        "uri": loaded.uri,
        "sha256": loaded.sha256,
        "name": loaded.model.name,
        "class_name": type(loaded.model).__name__,
        "input_shape": list(loaded.input_shape),
        # Its own maps are (C, H, W); every shape here is (H, W, C) (worker/engine/layout.py).
        **({"data_format": "channels_first"} if loaded.channels_first else {}),
    }


def image_record(image: PreparedImage) -> tuple[dict[str, Any], dict[str, Any]]:
    """The manifest's "image" and "preprocessing" entries for a prepared image."""
    record = dict(image.record)
    described = {
        "sha256": image.sha256,
        "original_size": list(image.original_size),
        "format": record.pop("format", None),
        "mode": record.pop("mode", None),
    }
    return described, record


def _render_layer(
    ref: LayerRef,
    layer: HostLayer,
    image: PreparedImage,
    options: JobOptions,
    files: dict[str, bytes],
) -> dict[str, Any]:
    key = layer_grid_name(ref.index, ref.name)
    grid = layer.plan.grid
    entry: dict[str, Any] = {
        "name": ref.name,
        "index": ref.index,
        "class_name": ref.class_name,
        "output_shape": list(layer.plan.shape),
        "spatial": len(layer.plan.shape) == 3,
        "grid": None,
    }
    if grid is not None and layer.canvas is not None:
        files[key] = encode_palette_png(layer.canvas, colormap_lut(options.colormap), layer.rows)
        entry["grid"] = {"png": key, **grid.to_dict()}
        if options.channel_pngs:
            entry["channels_dir"] = channels_dir(ref.index, ref.name)
            for c in range(grid.channels):
                files[channel_name(ref.index, ref.name, c)] = render_channel(
                    channel_tile(layer.canvas, grid, c), options.colormap
                )
        if options.overlay and layer.mean_map is not None:
            overlay = overlay_name(ref.index, ref.name)
            files[overlay] = render_overlay(image.display, layer.mean_map, options.colormap)
            entry["overlay"] = overlay
    elif layer.values is not None:
        png, strip = render_strip(layer.values, options.colormap)
        files[key] = png
        entry["grid"] = {"png": key, **strip.to_dict()}
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


def _cpu_now(cpu: dict[str, float] | None) -> float:
    return time.thread_time() if cpu is not None else 0.0


def _ms_since_cpu(started: float) -> float:
    return (time.thread_time() - started) * 1000.0


def _ms_since(started: float) -> float:
    return (time.perf_counter() - started) * 1000.0
