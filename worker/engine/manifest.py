"""The manifest: everything needed to read, and reproduce, one job's results.

Shapes are (H, W[, C]) lists throughout; sizes in pixels, times in ms.

```
{
  "version": MANIFEST_VERSION, "job_id": null,       # job_id filled by the caller
  "model": {"uri", "sha256", "name", "class_name", "input_shape": [H|null, W|null, C]},
  "image": {"uri": null, "sha256", "original_size": [H, W], "format", "mode"},
  "input": "input.png",                                # the image as the model saw it
  "preprocessing": {"size": [H, W], "channels", "color", "alpha", "exif_orientation",
                    "resample", "resized", "scale", "formula", "mean"?, "std"?, ...},
  "normalization": {"mode", "levels", "percentile"?},
  "colormap": "viridis",
  "engine": {"backend", "keras"},
  "layers": [{"name", "index", "class_name", "output_shape", "spatial",
              "grid": {"png", "rows", "cols", "tile_h", "tile_w", "separator",
                       "channels", "downsample", "height", "width"} | null,
              "overlay"?, "channels_dir"?,
              "stats": {"mean", "std", "min", "max", "sparsity": [per channel], "dead": [c]},
              "summary": {"mean", "std", "min", "max", "sparsity", "dead_count", "top_k"}}],
  "files": [every file key of the job besides manifest.json],
  "timings_ms": {"preprocess", "forward", "render", "stats", "render_wall"?,
                 "gradcam"?, "gradcam_render"?, "gradcam_render_wall"?},
  "cpu_ms": {"preprocess", "engine", "encode"},  # this process's CPU for the image; the
                                                 # worker adds fetch, report, upload
  "batch": {"size", "position"},   # the forward pass this image shared
}
```
`timings_ms.forward` is the whole forward pass of the batch the image was in;
`render` and `stats` sum the image's own layers' work, and `render_wall` (a pass
of activations) is the wall time from the pass's end to the image's last layer,
its wait behind the pass's other images on the render threads included. A
Grad-CAM's `gradcam` is its whole pass, `gradcam_render` the image's own heatmaps
and files, and `gradcam_render_wall` the wall time from its pass's end to them.
Grid tile of channel c: row c // cols, col c % cols, top-left pixel at
(row * (tile_h + separator), col * (tile_w + separator)).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import orjson

from producer.contract import INPUT_FILE, MANIFEST_VERSION, JobOptions


def build_manifest(
    *,
    model: dict[str, Any],
    image: dict[str, Any],
    preprocessing: dict[str, Any],
    options: JobOptions,
    engine: dict[str, Any],
    layers: list[dict[str, Any]],
    files: list[str],
    timings_ms: dict[str, float],
    cpu_ms: dict[str, float] | None = None,
    batch: dict[str, int],
) -> dict[str, Any]:
    """Assemble the manifest dict (JSON-safe: no NaN, no numpy types)."""
    normalization: dict[str, Any] = {"mode": options.normalize, "levels": 255}
    if options.normalize == "percentile":
        normalization["percentile"] = options.percentile
    manifest = {
        "version": MANIFEST_VERSION,
        "job_id": None,
        "model": model,
        "image": {"uri": None, **image},
        "input": INPUT_FILE,
        "preprocessing": preprocessing,
        "normalization": normalization,
        "colormap": options.colormap,
        "layer_spec": options.layers,
        "top_k": options.top_k,
        "engine": engine,
        "layers": layers,
        "files": sorted(files),
        "timings_ms": {k: round(v, 3) for k, v in timings_ms.items()},
        "cpu_ms": {k: round(v, 3) for k, v in (cpu_ms or {}).items()},
        "batch": batch,
    }
    # Each layer's per-channel stats come JSON-safe already (`stats.json_stats`): thousands
    # of floats per image that a second walk would only re-check (about 4 ms per image).
    stats = [layer.pop("stats", None) for layer in layers]
    safe = json_safe(manifest)
    for layer, entry, values in zip(layers, safe["layers"], stats, strict=True):
        if values is not None:
            layer["stats"] = entry["stats"] = values
    return safe


_PLAIN = frozenset({str, int, bool, type(None)})  # JSON as they are


def json_safe(value: Any) -> Any:
    """Recursively: numpy scalars -> Python, NaN/inf -> None, tuples -> lists.

    The exact built-in types, which are most of a manifest, are taken first by their
    type alone; subclasses and numpy's go the general way."""
    kind = type(value)
    if kind in _PLAIN:
        return value
    if kind is float:
        return value if math.isfinite(value) else None
    if kind is dict:
        return {k if type(k) is str else str(k): json_safe(v) for k, v in value.items()}
    if kind is list or kind is tuple:
        return [json_safe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, np.ndarray):
        return json_safe(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        number = float(value)
        return number if math.isfinite(number) else None
    return value


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """Compact UTF-8 JSON of a manifest, always strict: a NaN or infinity that escaped
    `json_safe` is written as null, numpy scalars and arrays as numbers.

    orjson, not the standard library: a manifest holds every channel's statistics
    (3,520 floats for the classic CNN's first 8 layers), which `json.dumps` writes
    in about 2 ms and orjson in 0.1. Raises TypeError for what JSON cannot hold.
    """
    return orjson.dumps(manifest, option=orjson.OPT_SERIALIZE_NUMPY | orjson.OPT_NON_STR_KEYS)
