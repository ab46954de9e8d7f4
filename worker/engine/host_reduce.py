"""The reduction of worker/engine/reduce.py, fused into two passes on the host's CPU.

On an accelerator, the pass's layer outputs are reduced where they were
computed, by `keras.ops` in the same compiled program, and only uint8 grids
and statistics cross to the host. On a CPU there is nothing to cross, and
each of those ops is a pass of its own over the float32 maps: the classic
CNN's first 8 layers took 11.2 ms of CPU an image to reduce after a 4.9 ms
forward pass on 2 cores. Here one image's layer is reduced in two passes of
compiled loops (numba) instead:

- the first pass: per channel, the sum, min, max and count of exact zeros
  (and, for a census, the position of the maximum);
- the second: the squared deviations from the mean, and the grid: each
  position's channels normalized, quantized to palette indices and written
  to their tiles.

Its results are those of `reduce_layer` for one image, a dict of numpy
arrays: statistics in float64 before their float32 rows (the tests compare
both paths with the numpy reference), palette indices by the same float32
arithmetic, so equal or, rarely, off by one. The loops release the GIL, so a
worker's render threads reduce layers on every core while others encode.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from worker.engine.reduce import MEANSTD_CENTRE, MEANSTD_GAIN, LayerPlan, RenderKey
from worker.engine.render import LEVELS, SEPARATOR, Grid


def reduce_image(x: np.ndarray, plan: LayerPlan, key: RenderKey) -> dict[str, np.ndarray]:
    """One image's layer output (its own shape, any float dtype) -> the arrays a `HostLayer`
    takes: moments (4, C) float32, zeros (C,) int32, and canvas, values, mean_map, half,
    peaks as `key` and `plan` ask (see worker/engine/reduce.py `reduce_layer`)."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 0:
        x = x.reshape(1)
    channels = int(x.shape[-1])
    flat = np.ascontiguousarray(x).reshape(-1, channels)
    kernels = _kernels()
    moments = np.empty((4, channels), np.float32)
    zeros = np.empty(channels, np.int32)
    kernels.moments(flat, moments, zeros)
    out: dict[str, np.ndarray] = {"moments": moments, "zeros": zeros}
    if plan.grid is not None:
        out["canvas"] = _canvas(np.ascontiguousarray(x), plan.grid, key, moments, kernels)
        if key.overlay:
            out["mean_map"] = x.mean(axis=-1, dtype=np.float32)
    elif plan.strip:
        out["values"] = x
    if key.npz:
        out["half"] = x.astype(np.float16)
    if key.peaks:
        peaks = np.empty(channels, np.int32)
        kernels.peaks(flat, peaks)
        out["peaks"] = peaks
    return out


def _canvas(x: np.ndarray, grid: Grid, key: RenderKey, moments: np.ndarray, kernels: Any) -> Any:
    """(H, W, C) float32 -> (grid.height, grid.width) uint8, as reduce.py's `_canvas`."""
    factor = grid.downsample
    strided = x[::factor, ::factor] if factor > 1 else x
    channels = grid.channels
    centre = np.float32(0.0)
    if key.normalize == "meanstd":
        if factor == 1:
            low, std = moments[0], moments[1]
        else:
            sample = strided.reshape(-1, channels)
            low, std = sample.mean(axis=0, dtype=np.float64), sample.std(axis=0, dtype=np.float64)
        low, std = low.astype(np.float32), std.astype(np.float32)
        gain = _gain(np.float32(MEANSTD_GAIN), std)
        centre = np.float32(MEANSTD_CENTRE)
    else:
        if key.normalize == "percentile":
            sample = strided.reshape(-1, channels)
            qs = [(100.0 - key.percentile) / 100.0, key.percentile / 100.0]
            low, high = np.quantile(sample, qs, axis=0).astype(np.float32)
        elif factor == 1:
            low, high = moments[2], moments[3]
        else:
            low, high = strided.min(axis=(0, 1)), strided.max(axis=(0, 1))
        if key.normalize == "layer":
            low = np.full(channels, low.min(), np.float32)
            high = np.full(channels, high.max(), np.float32)
        gain = _gain(np.float32(LEVELS - 1), (high - low).astype(np.float32))
    canvas = np.full((grid.height, grid.width), SEPARATOR, np.uint8)
    positions = np.arange(channels)
    top = (positions // grid.cols * (grid.tile_h + grid.separator)).astype(np.int64)
    left = (positions % grid.cols * (grid.tile_w + grid.separator)).astype(np.int64)
    kernels.tile(
        x, factor, np.ascontiguousarray(low, np.float32), gain, centre, top, left, grid.tile_h,
        grid.tile_w, canvas,
    )  # fmt: skip
    return canvas


def _gain(scale: np.float32, spread: np.ndarray) -> np.ndarray:
    """scale / spread per channel in float32, 0 where spread is 0 (a flat tile)."""
    safe = np.where(spread > 0, spread, np.float32(1.0)).astype(np.float32)
    return ((scale / safe) * (spread > 0)).astype(np.float32)


@functools.cache
def _kernels() -> Any:
    """The compiled loops, built on first use (numba compiles each once per process)."""
    from types import SimpleNamespace

    from numba import njit

    compile_ = njit(nogil=True, error_model="numpy", cache=False)

    @compile_
    def moments(flat: Any, out: Any, zeros: Any) -> None:  # pragma: no cover (compiled)
        count, channels = flat.shape
        total = np.zeros(channels)
        low = np.full(channels, np.inf, np.float32)
        high = np.full(channels, -np.inf, np.float32)
        nulls = np.zeros(channels, np.int32)
        for p in range(count):
            row = flat[p]
            for c in range(channels):
                v = row[c]
                total[c] += v
                low[c] = min(low[c], v)
                high[c] = max(high[c], v)
                nulls[c] += v == 0.0
        mean = total / count
        spread = np.zeros(channels)
        for p in range(count):
            row = flat[p]
            for c in range(channels):
                d = row[c] - mean[c]
                spread[c] += d * d
        for c in range(channels):
            out[0, c] = mean[c]
            out[1, c] = math.sqrt(spread[c] / count)
            out[2, c] = low[c] if count else np.nan
            out[3, c] = high[c] if count else np.nan
            zeros[c] = nulls[c]

    @compile_
    def peaks(flat: Any, out: Any) -> None:  # pragma: no cover (compiled)
        count, channels = flat.shape
        best = np.full(channels, -np.inf, np.float32)
        for c in range(channels):
            out[c] = 0
        for p in range(count):
            row = flat[p]
            for c in range(channels):
                if row[c] > best[c]:  # the first position of the maximum, as argmax
                    best[c] = row[c]
                    out[c] = p

    @compile_
    def tile(
        x: Any,
        factor: int,
        low: Any,
        gain: Any,
        centre: Any,
        top: Any,
        left: Any,
        tile_h: int,
        tile_w: int,
        canvas: Any,
    ) -> None:  # pragma: no cover (compiled)
        channels = x.shape[2]
        half = np.float32(0.5)
        ceiling = np.float32(LEVELS - 1)
        levels = np.empty(channels, np.uint8)
        for i in range(tile_h):
            source = x[i * factor]
            for j in range(tile_w):
                pixel = source[j * factor]
                for c in range(channels):  # contiguous: vectorized
                    level = (pixel[c] - low[c]) * gain[c] + centre + half
                    levels[c] = np.uint8(min(max(level, np.float32(0.0)), ceiling))
                for c in range(channels):  # one byte to each channel's tile
                    canvas[top[c] + i, left[c] + j] = levels[c]

    return SimpleNamespace(moments=moments, peaks=peaks, tile=tile)
