"""A pass's layer outputs reduced where they were computed: statistics, palette indices, grids.

Per selected layer, with `keras.ops` only (so TensorFlow, JAX and torch alike),
inside the one compiled program that also runs the forward pass
(worker/engine/compiled.py):

- per-channel statistics over every position of an image: mean, std
  (two-pass, float32), min, max and the count of exact zeros;
- for a spatial (H, W, C) layer, the grid: the maps strided by the grid's
  downsample factor, normalized to palette indices 0..254 by the job's mode
  (channel, layer, meanstd, percentile), and tiled into the grid canvas with
  separator index 255, as uint8;
- what a job asks for besides: the channel-mean map for overlays (float32,
  H x W), the float16 activations for the npz; a non-spatial layer of at most
  STRIP_MAX_VALUES values comes as its float32 values (its strip is drawn on
  the host).

So what crosses from the device to the host is uint8 grids and statistics
vectors; no float32 activation map does. On a CPU, where nothing crosses,
worker/engine/host_reduce.py computes the same on the host instead, fused. `worker/engine/render.py` holds the
host-side numpy reference of the same normalization and tiling (the tests
compare both), and the palette PNG encoding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from producer.contract import JobOptions
from producer.settings import Settings
from worker.engine.render import (
    LEVELS,
    SEPARATOR,
    STRIP_MAX_VALUES,
    Grid,
    downsample_factor,
    grid_layout,
)

MEANSTD_GAIN = 64.0 * (LEVELS - 1) / 255.0  # Chollet's x 64 + 128, at 255 levels
MEANSTD_CENTRE = 128.0 * (LEVELS - 1) / 255.0


@dataclass(frozen=True)
class RenderKey:
    """What of a job changes the device program; images of one pass share it."""

    normalize: str
    percentile: float
    max_side: int
    overlay: bool
    npz: bool
    peaks: bool = False  # each channel's argmax position (census jobs)

    @classmethod
    def of(cls, options: JobOptions, settings: Settings) -> RenderKey:
        return cls(
            normalize=options.normalize,
            percentile=float(options.percentile) if options.normalize == "percentile" else 0.0,
            max_side=int(settings.max_grid_side),
            overlay=bool(options.overlay),
            npz=bool(options.save_npz),
            peaks=bool(options.census),
        )


@dataclass(frozen=True)
class LayerPlan:
    """How one layer is reduced: decided from its per-image output shape alone."""

    shape: tuple[int, ...]
    grid: Grid | None  # spatial (H, W, C): the canvas geometry
    strip: bool  # non-spatial, small: its float32 values cross

    @classmethod
    def of(cls, shape: tuple[int, ...], max_side: int) -> LayerPlan:
        shape = tuple(int(d) for d in shape)
        if len(shape) == 3 and math.prod(shape) > 0:
            height, width, channels = shape
            factor = downsample_factor(height, width, channels, max_side)
            rows, cols = grid_layout(channels)
            tile_h, tile_w = -(-height // factor), -(-width // factor)
            return cls(shape, Grid(rows, cols, tile_h, tile_w, channels, factor), False)
        return cls(shape, None, 0 < math.prod(shape) <= STRIP_MAX_VALUES)


def reduce_outputs(outputs: list[Any], key: RenderKey) -> list[dict[str, Any]]:
    """The compiled program's tail: each (N, ...) layer output -> its dict of reduced tensors."""
    return [reduce_layer(x, key) for x in outputs]


def reduce_layer(x: Any, key: RenderKey) -> dict[str, Any]:
    """(N, *shape) backend tensor -> {"moments", "zeros", "canvas"?, "values"?, "mean_map"?,
    "half"?, "peaks"?}.

    moments: (N, 4, C) float32 rows mean, std, min, max; zeros: (N, C) int32;
    canvas: (N, grid.height, grid.width) uint8.
    """
    ops = keras.ops
    x = ops.cast(x, "float32")
    if len(x.shape) == 1:
        x = ops.expand_dims(x, -1)
    n, channels = int(x.shape[0]), int(x.shape[-1])
    plan = LayerPlan.of(tuple(x.shape[1:]), key.max_side)
    flat = ops.reshape(x, (n, -1, channels))
    mean, std = _moments(flat)
    out: dict[str, Any] = {
        "moments": ops.stack([mean, std, ops.min(flat, axis=1), ops.max(flat, axis=1)], axis=1),
        "zeros": ops.sum(ops.cast(ops.equal(flat, 0.0), "int32"), axis=1),
    }
    if plan.grid is not None:
        out["canvas"] = _canvas(x, plan.grid, key, out["moments"])
        if key.overlay:
            out["mean_map"] = ops.mean(x, axis=-1)
    elif plan.strip:
        out["values"] = x
    if key.npz:
        out["half"] = ops.cast(x, "float16")
    if key.peaks:
        out["peaks"] = ops.cast(ops.argmax(flat, axis=1), "int32")
    return out


def _moments(flat: Any) -> tuple[Any, Any]:
    """Per-channel mean and (population) std of (N, P, C), two-pass."""
    ops = keras.ops
    mean = ops.mean(flat, axis=1)
    std = ops.sqrt(ops.mean(ops.square(flat - mean[:, None, :]), axis=1))
    return mean, std


def _canvas(x: Any, grid: Grid, key: RenderKey, moments: Any) -> Any:
    """(N, H, W, C) float32 -> (N, grid.height, grid.width) uint8 palette indices."""
    ops = keras.ops
    factor = grid.downsample
    maps = x[:, ::factor, ::factor, :] if factor > 1 else x
    n, height, width, channels = (int(d) for d in maps.shape)
    flat = ops.reshape(maps, (n, -1, channels))
    if key.normalize == "meanstd":
        mean, std = (moments[:, 0], moments[:, 1]) if factor == 1 else _moments(flat)
        gain = MEANSTD_GAIN / ops.where(std > 0, std, 1.0) * ops.cast(std > 0, "float32")
        levels = (maps - mean[:, None, None, :]) * gain[:, None, None, :] + MEANSTD_CENTRE
    else:
        if key.normalize == "percentile":
            qs = [(100.0 - key.percentile) / 100.0, key.percentile / 100.0]
            bounds = ops.quantile(flat, qs, axis=1)  # (2, N, C)
            low, high = bounds[0], bounds[1]
        elif factor == 1:
            low, high = moments[:, 2], moments[:, 3]
        else:
            low, high = ops.min(flat, axis=1), ops.max(flat, axis=1)
        if key.normalize == "layer":
            low = ops.min(low, axis=1, keepdims=True)
            high = ops.max(high, axis=1, keepdims=True)
        span = high - low
        gain = (LEVELS - 1) / ops.where(span > 0, span, 1.0) * ops.cast(span > 0, "float32")
        levels = (maps - low[:, None, None, :]) * gain[:, None, None, :]
    # Indices first, then the tiling moves bytes, not float32 (on 2 CPU cores, 10.4 to
    # 5.5 ms an image for the classic CNN's first 8 layers; the same canvas).
    indices = ops.cast(ops.clip(levels + 0.5, 0.0, float(LEVELS - 1)), "uint8")
    # Tile: pad each map with one separator row and column, fill the last grid row
    # with separator tiles, then (N, h+1, w+1, rows, cols) -> (N, rows, h+1, cols, w+1).
    padded = ops.pad(
        indices,
        [[0, 0], [0, 1], [0, 1], [0, grid.rows * grid.cols - channels]],
        constant_values=SEPARATOR,
    )
    tiles = ops.reshape(padded, (n, height + 1, width + 1, grid.rows, grid.cols))
    canvas = ops.reshape(
        ops.transpose(tiles, (0, 3, 1, 4, 2)),
        (n, grid.rows * (height + 1), grid.cols * (width + 1)),
    )
    return canvas[:, : grid.height, : grid.width]


@dataclass
class HostLayer:
    """One image's share of one reduced layer, on the host (numpy)."""

    plan: LayerPlan
    moments: np.ndarray  # (4, C) mean, std, min, max
    zeros: np.ndarray  # (C,) int
    canvas: np.ndarray | None = None  # (grid.height, grid.width) uint8
    rows: np.ndarray | None = None  # the canvas's PNG rows, filtered (where the host made them)
    values: np.ndarray | None = None  # strip values, float32
    mean_map: np.ndarray | None = None  # (H, W) float32 channel mean, for the overlay
    half: np.ndarray | None = None  # float16 activations, for the npz
    peaks: np.ndarray | None = None  # (C,) flat position of each channel's maximum

    @property
    def count(self) -> int:
        """Positions per channel."""
        return max(1, math.prod(self.plan.shape[:-1])) if self.plan.shape else 1
