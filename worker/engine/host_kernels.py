"""The host reduction's compiled loops (numba), cached on disk.

worker/engine/host_reduce.py calls these; they are a module of their own so
that numba is imported only where a pass is reduced on the host (a CPU
worker), and so that their machine code is cached. Compiled in the process,
they made a process's first pass of the classic CNN take 3.5 s on 2 cores,
against 0.7 s loaded from the cache (TensorFlow's own tracing included); a
CPU worker's start, each `actviz demo` run and every worker a test starts
paid that (docs/benchmarks.md).

The cache is numba's own (`cache=True`): `NUMBA_CACHE_DIR` where it is set,
else `__pycache__` beside this file where that is writable, else the user's
cache folder (`~/.cache/numba`). Its index is keyed by this file's
modification time and size, the numba version, the argument types and the
CPU's model and features, so a changed file or another machine compiles
afresh. The loops read no constant of another module (each comes as an
argument), which this file's key would not see change. Where no folder is
writable, they compile in memory in each process, as before.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numba import njit

BLOCK = 32  # positions of a tile row quantized before their bytes go to the channels' tiles


def _compiled(fn: Any) -> Any:
    """`fn` compiled without the GIL, its machine code cached on disk where it can be."""
    try:
        return njit(nogil=True, error_model="numpy", cache=True)(fn)
    except RuntimeError:  # numba found no writable cache folder
        return njit(nogil=True, error_model="numpy")(fn)


@_compiled
def moments(
    flat: Any, total: Any, low: Any, high: Any, zeros: Any, spread: Any
) -> None:  # pragma: no cover
    """Per channel of (positions, channels) `flat`, in one pass: the sum, min, max, count
    of exact zeros and the squared deviations from the mean (`spread`), all in float64
    but min and max.

    The deviations come from sums of each value less the channel's first value (so the
    sums stay small where the values sit far from 0), as sum((x - s)^2) - sum(x - s)^2 /
    n: one pass where the mean's took two. The minima and maxima go to arrays of this
    loop's own, which the compiler may keep in vector registers; written into the
    caller's arrays at each position, the compares became masked stores (`vmaskmovps`)
    and the pass 2-3 times slower. A channel whose sums are not finite (a NaN or an
    infinity in it) is taken again alone, as numpy would: NaN wherever it holds a NaN."""
    count, channels = flat.shape
    shift = np.zeros(channels)
    lo = np.full(channels, np.inf, np.float32)
    hi = np.full(channels, -np.inf, np.float32)
    counted = np.zeros(channels, np.int64)
    first = np.zeros(channels)
    second = np.zeros(channels)
    if count:
        for c in range(channels):
            shift[c] = flat[0, c]
    for p in range(count):
        row = flat[p]
        for c in range(channels):  # contiguous: vectorized
            v = row[c]
            lo[c] = v if v < lo[c] else lo[c]
            hi[c] = v if v > hi[c] else hi[c]
            d = np.float64(v) - shift[c]
            first[c] += d
            second[c] += d * d
            counted[c] += v == 0.0
    for c in range(channels):
        low[c], high[c], zeros[c] = lo[c], hi[c], counted[c]
        if np.isfinite(first[c]) and np.isfinite(second[c]):
            total[c] = first[c] + shift[c] * count
            spread[c] = max(0.0, second[c] - first[c] * first[c] / max(1, count))
        else:
            _one_channel(flat, c, total, low, high, spread)


@_compiled
def _one_channel(
    flat: Any, c: int, total: Any, low: Any, high: Any, spread: Any
) -> None:  # pragma: no cover
    """Channel `c` of `flat` in two passes, as numpy: a NaN makes its min, max and sums
    NaN, an infinity its sum infinite and its deviations NaN."""
    count = flat.shape[0]
    added, lo, hi = 0.0, np.float32(np.inf), np.float32(-np.inf)
    for p in range(count):
        v = flat[p, c]
        added += v
        if np.isnan(v) or np.isnan(lo):
            lo = hi = np.float32(np.nan)
        else:
            lo, hi = min(lo, v), max(hi, v)
    mean = added / max(1, count)
    squares = 0.0
    for p in range(count):
        d = flat[p, c] - mean
        squares += d * d
    total[c], low[c], high[c], spread[c] = added, lo, hi, squares


@_compiled
def peaks(flat: Any, out: Any) -> None:  # pragma: no cover
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


@_compiled
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
    ceiling: Any,
) -> None:  # pragma: no cover
    """Normalize, quantize to levels 0..`ceiling` and write each channel of `x` (every
    `factor`-th position) to its tile of `canvas`."""
    channels = x.shape[2]
    half = np.float32(0.5)
    block = np.empty((BLOCK, channels), np.uint8)
    for i in range(tile_h):
        source = x[i * factor]
        for start in range(0, tile_w, BLOCK):
            width = min(BLOCK, tile_w - start)
            for j in range(width):
                pixel = source[(start + j) * factor]
                levels = block[j]
                for c in range(channels):  # contiguous: vectorized
                    level = (pixel[c] - low[c]) * gain[c] + centre + half
                    levels[c] = np.uint8(min(max(level, np.float32(0.0)), ceiling))
            for c in range(channels):  # a run of bytes in each channel's tile row
                row = canvas[top[c] + i]
                at = left[c] + start
                for j in range(width):
                    row[at + j] = block[j, c]


@_compiled
def fused(
    x: Any,
    layer_wide: bool,
    top: Any,
    left: Any,
    tile_h: int,
    tile_w: int,
    canvas: Any,
    rows: Any,
    total: Any,
    low: Any,
    high: Any,
    zeros: Any,
    spread: Any,
    ceiling: Any,
    separator: int,
) -> None:  # pragma: no cover
    """`moments`, then `tile` normalized by min and max (per channel, or over the layer
    with `layer_wide`), then the canvas's PNG rows filtered `up` (render.py
    `palette_rows`): what reduce_image and _canvas do for the default grid, in one call."""
    channels = x.shape[2]
    flat = x.reshape(-1, channels)
    moments(flat, total, low, high, zeros, spread)
    lo, hi = low, high
    if layer_wide:  # as _canvas: every channel between the layer's min and max
        lo = np.full(channels, low.min(), np.float32)
        hi = np.full(channels, high.max(), np.float32)
    gain = np.zeros(channels, np.float32)
    for c in range(channels):  # render.py `level_gain`, in float32
        width = hi[c] - lo[c]
        if width > 0:
            gain[c] = ceiling / width
    canvas[:] = separator
    tile(x, 1, lo, gain, np.float32(0.0), top, left, tile_h, tile_w, canvas, ceiling)
    for i in range(canvas.shape[0]):
        row, out = canvas[i], rows[i]
        out[0] = 2
        if i == 0:  # the first row has zeros above it
            for j in range(row.shape[0]):
                out[j + 1] = row[j]
        else:
            above = canvas[i - 1]
            for j in range(row.shape[0]):  # contiguous: vectorized
                out[j + 1] = (np.int32(row[j]) - np.int32(above[j])) & 0xFF
