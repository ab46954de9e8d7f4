"""The reduction of worker/engine/reduce.py, in compiled loops on the host's CPU.

On an accelerator, the pass's layer outputs are reduced where they were
computed, by `keras.ops` in the same compiled program, and only uint8 grids
and statistics cross to the host. On a CPU there is nothing to cross, and
each of those ops is a pass of its own over the float32 maps: the classic
CNN's first 8 layers took 11.2 ms of CPU an image to reduce after a 4.9 ms
forward pass on 2 cores. Here one image's layer is reduced by compiled loops
(numba, worker/engine/host_kernels.py) instead, each over the maps while
they are in the core's cache:

- per channel, in one pass (`moments`): the min, max, sum, count of exact
  zeros and squared deviations from the mean (a census's positions of the
  maxima take a loop of their own);
- the grid: each position's channels normalized, quantized to palette
  indices and written to their tiles (over the strided maps where the grid
  is downsampled).

The default grid's loops (not downsampled, normalized by min and max) and
its PNG rows (filtered `up`, as render.py's `palette_rows`) are one compiled
call (`fused`): one hand-off of the interpreter lock for them where there
were five (two loops, three numpy calls), and no numpy pass of its own for
the row filter.

Its results are those of `reduce_layer` for one image, a dict of numpy
arrays: statistics in float64 before their float32 rows (the tests compare
both paths with the numpy reference), palette indices by the same float32
arithmetic, so equal or, rarely, off by one. The loops release the GIL, so a
worker's render threads reduce layers on every core while others encode.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from worker.engine.reduce import MEANSTD_CENTRE, MEANSTD_GAIN, LayerPlan, RenderKey
from worker.engine.render import LEVELS, SEPARATOR, Grid, level_gain, tile_origins

CEILING = np.float32(LEVELS - 1)  # the highest palette index of a level


def reduce_image(x: np.ndarray, plan: LayerPlan, key: RenderKey) -> dict[str, np.ndarray]:
    """One image's layer output (its own shape, any float dtype) -> the arrays a `HostLayer`
    takes: moments (4, C) float32, zeros (C,) int32, and canvas, values, mean_map, half,
    peaks as `key` and `plan` ask (see worker/engine/reduce.py `reduce_layer`)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim == 0:
        x = x.reshape(1)
    channels = int(x.shape[-1])
    flat = x.reshape(-1, channels)
    kernels = _kernels()
    total = np.zeros(channels)
    low = np.empty(channels, np.float32)
    high = np.empty(channels, np.float32)
    zeros = np.empty(channels, np.int32)
    count = max(1, flat.shape[0])
    spread = np.zeros(channels)
    out: dict[str, np.ndarray] = {"zeros": zeros}
    grid = plan.grid
    if grid is not None and grid.downsample == 1 and key.normalize in ("channel", "layer"):
        # The default: both passes, the grid and its PNG rows in one compiled call, so the
        # render thread gives the interpreter lock up (and waits to take it back) once.
        top, left = tile_origins(grid)
        canvas = np.empty((grid.height, grid.width), np.uint8)
        rows = np.empty((grid.height, grid.width + 1), np.uint8)
        kernels.fused(
            x, key.normalize == "layer", top, left, grid.tile_h, grid.tile_w,
            canvas, rows, total, low, high, zeros, spread, CEILING, SEPARATOR,
        )  # fmt: skip
        mean = total / count
        out["canvas"], out["rows"] = canvas, rows
    else:
        kernels.moments(flat, total, low, high, zeros, spread)
        mean = total / count
        if grid is not None:
            std = np.sqrt(spread / count).astype(np.float32)
            out["canvas"] = _canvas(x, grid, key, low, high, kernels, mean, std)
    moments = np.stack([mean, np.sqrt(spread / count), low, high]).astype(np.float32)
    if flat.shape[0] == 0:  # no position: no statistic, as the device's mean of nothing
        moments[:] = np.nan
    out["moments"] = moments
    if grid is not None:
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


def _canvas(
    x: np.ndarray,
    grid: Grid,
    key: RenderKey,
    low: np.ndarray,
    high: np.ndarray,
    kernels: Any,
    mean: np.ndarray,
    std: np.ndarray,
) -> np.ndarray:
    """(H, W, C) float32 -> (grid.height, grid.width) uint8, as reduce.py's `_canvas`, for
    the grids `fused` does not make (downsampled, or normalized otherwise than by min and
    max). `low`, `high`, `mean` and `std` are the full maps' statistics."""
    factor = grid.downsample
    strided = x[::factor, ::factor] if factor > 1 else x
    channels = grid.channels
    centre = np.float32(0.0)
    if key.normalize == "meanstd":
        if factor > 1:
            sample = strided.reshape(-1, channels)
            mean, std = sample.mean(axis=0, dtype=np.float64), sample.std(axis=0, dtype=np.float64)
        low = np.asarray(mean, np.float32)
        gain = level_gain(MEANSTD_GAIN, np.asarray(std, np.float32))
        centre = np.float32(MEANSTD_CENTRE)
    else:
        if key.normalize == "percentile":
            sample = strided.reshape(-1, channels)
            qs = [(100.0 - key.percentile) / 100.0, key.percentile / 100.0]
            low, high = np.quantile(sample, qs, axis=0).astype(np.float32)
        elif factor > 1:
            low, high = strided.min(axis=(0, 1)), strided.max(axis=(0, 1))
        if key.normalize == "layer":
            low = np.full(channels, low.min(), np.float32)
            high = np.full(channels, high.max(), np.float32)
        gain = level_gain(LEVELS - 1, (high - low).astype(np.float32))
    canvas = np.full((grid.height, grid.width), SEPARATOR, np.uint8)
    top, left = tile_origins(grid)
    kernels.tile(
        x, factor, np.ascontiguousarray(low, np.float32), gain, centre, top, left, grid.tile_h,
        grid.tile_w, canvas, CEILING,
    )  # fmt: skip
    return canvas


def _kernels() -> Any:
    """The compiled loops (worker/engine/host_kernels.py), imported on first use: numba
    is imported only where a pass is reduced on the host."""
    from worker.engine import host_kernels

    return host_kernels
