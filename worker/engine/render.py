"""Palette indices -> colour-mapped PNGs, with numpy and Pillow only.

The device reduces each spatial layer to its grid canvas of palette indices
(worker/engine/reduce.py); here the host encodes it. `normalize_maps` and
`tile_indices` are the numpy reference of that reduction (the tests compare
the two) and serve the small host-side drawings (strips, overlays).

A layer grid tiles every channel of an (H, W, C) map into one palette PNG:
`cols = ceil(sqrt(C))`, `rows = ceil(C / cols)`, channel `c` at row `c // cols`,
column `c % cols`, tiles separated by 1-pixel lines. Values are normalized to
palette indices 0..254 (the colormap sampled at 255 levels); index 255 is the
separator/background colour. The palette is the colormap's 256-entry LUT,
built once per name from matplotlib's colormap registry.
"""

from __future__ import annotations

import functools
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from producer.errors import InvalidJob

try:  # ISA-L's deflate: the same format, about twice zlib-ng's speed on our grids (see _png)
    from isal import igzip_lib as _igzip
    from isal.isal_zlib import crc32 as _crc32
except ImportError:  # pragma: no cover (the worker extra installs it)
    _igzip = None
    _crc32 = zlib.crc32

LEVELS = 255  # colour levels; palette index 255 is the separator
SEPARATOR = 255
SEPARATOR_RGB = (255, 255, 255)
# ISA-L's level 1: grids are regenerated per job, so speed before size. Its level 0 was
# about 10% faster for 35% more bytes; 2 and 3 no smaller, 3 three times slower.
PNG_ISAL_LEVEL = 1
# Where ISA-L is not installed, zlib at level 1 with its run-length strategy: a grid is
# rows of equal or slowly changing indices, which RLE finds at about half the cost of
# level-1 deflate, for about 2% more bytes (13 grids of the deep benchmark CNN: 17 vs
# 32 ms, 1.55 vs 1.52 MB); and the most memory, so that a grid is coded in half as many
# blocks (the classic CNN's 8 grids of an image: 4.51 against 5.26 ms at 8).
PNG_COMPRESS_LEVEL = 1
PNG_STRATEGY = zlib.Z_RLE
PNG_MEM_LEVEL = 9
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STRIP_MAX_VALUES = 4096
STRIP_HEIGHT = 16


@dataclass(frozen=True)
class Grid:
    """Geometry of a rendered grid, enough to map a pixel back to a channel."""

    rows: int
    cols: int
    tile_h: int
    tile_w: int
    channels: int
    downsample: int
    separator: int = 1

    @property
    def height(self) -> int:
        return self.rows * self.tile_h + (self.rows - 1) * self.separator

    @property
    def width(self) -> int:
        return self.cols * self.tile_w + (self.cols - 1) * self.separator

    def to_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows,
            "cols": self.cols,
            "tile_h": self.tile_h,
            "tile_w": self.tile_w,
            "separator": self.separator,
            "channels": self.channels,
            "downsample": self.downsample,
            "height": self.height,
            "width": self.width,
        }


@functools.lru_cache(maxsize=32)
def colormap_lut(name: str) -> np.ndarray:
    """(256, 3) uint8: the colormap at 255 levels, then the separator colour.

    Raises InvalidJob for a name matplotlib does not know.
    """
    import matplotlib  # only the colormap registry; no figures are drawn

    try:
        cmap = matplotlib.colormaps[name]
    except (KeyError, ValueError) as exc:
        raise InvalidJob(f"unknown colormap '{name}'; use a matplotlib colormap name") from exc
    rgba = cmap(np.linspace(0.0, 1.0, LEVELS))
    lut = np.empty((256, 3), dtype=np.uint8)
    lut[:LEVELS] = np.rint(rgba[:, :3] * 255).astype(np.uint8)
    lut[SEPARATOR] = SEPARATOR_RGB
    lut.setflags(write=False)
    return lut


def normalize_maps(maps: np.ndarray, mode: str, percentile: float = 99.0) -> np.ndarray:
    """(H, W, C) float32 -> (H, W, C) uint8 palette indices 0..254.

    channel: per-channel min..max. layer: one min..max for the layer.
    meanstd: per channel (x - mean) / std * 64 + 128 clipped to 0..255, then
    scaled to the 255 levels (Chollet's recipe). percentile: per channel
    clipped to the [100 - p, p] percentiles. A constant channel renders flat
    (index 0; the middle level 128 for meanstd).
    """
    x = maps.reshape(-1, maps.shape[-1])
    if mode == "meanstd":
        mean = x.mean(axis=0)
        std = x.std(axis=0)
        gain = level_gain(64.0 * (LEVELS - 1) / 255.0, std)
        out = (x - mean) * gain
        out += np.float32(128.0 * (LEVELS - 1) / 255.0)
    else:
        if mode in ("channel", "layer"):
            low, high = x.min(axis=0), x.max(axis=0)
            if mode == "layer":
                low, high = low.min(keepdims=True), high.max(keepdims=True)
        elif mode == "percentile":
            low, high = np.percentile(x, [100.0 - percentile, percentile], axis=0)
            low, high = low.astype(np.float32), high.astype(np.float32)
        else:
            raise InvalidJob(f"unknown normalize '{mode}'")
        span = high - low
        gain = level_gain(LEVELS - 1, span)
        out = x - low
        out *= gain
    out += np.float32(0.5)  # round half up when truncating to uint8
    np.clip(out, 0, LEVELS - 1, out=out)
    return out.astype(np.uint8).reshape(maps.shape)


def level_gain(scale: float, spread: np.ndarray) -> np.ndarray:
    """`scale` / `spread` per channel, in `spread`'s dtype; 0 where spread is not positive
    (a flat channel renders as one level)."""
    return np.divide(scale, spread, out=np.zeros_like(spread), where=spread > 0)


def grid_layout(channels: int) -> tuple[int, int]:
    """Near-square (rows, cols) holding every channel."""
    cols = max(1, math.ceil(math.sqrt(channels)))
    rows = max(1, math.ceil(channels / cols))
    return rows, cols


def downsample_factor(height: int, width: int, channels: int, max_side: int) -> int:
    """Smallest integer stride that keeps the grid's long side within max_side."""
    rows, cols = grid_layout(channels)
    for factor in range(1, max(height, width) + 1):
        h, w = -(-height // factor), -(-width // factor)
        if max(rows * h + rows - 1, cols * w + cols - 1) <= max_side:
            return factor
    return max(height, width)


def tile_indices(indices: np.ndarray) -> tuple[np.ndarray, Grid]:
    """(H, W, C) uint8 -> one (grid.height, grid.width) uint8 canvas, separators = 255."""
    height, width, channels = indices.shape
    rows, cols = grid_layout(channels)
    grid = Grid(rows, cols, height, width, channels, 1)
    canvas = np.full((rows, height + 1, cols, width + 1), SEPARATOR, dtype=np.uint8)
    tiles = np.moveaxis(indices, -1, 0)  # (C, H, W) view
    full_rows, rest = divmod(channels, cols)
    if full_rows:
        block = tiles[: full_rows * cols].reshape(full_rows, cols, height, width)
        canvas[:full_rows, :height, :, :width] = block.transpose(0, 2, 1, 3)
    if rest:
        canvas[full_rows, :height, :rest, :width] = tiles[full_rows * cols :].transpose(1, 0, 2)
    flat = canvas.reshape(rows * (height + 1), cols * (width + 1))
    return flat[: grid.height, : grid.width], grid


def render_strip(values: np.ndarray, colormap: str) -> tuple[bytes, Grid]:
    """A non-spatial output (any shape, <= 4096 values) as one row of cells.

    Values are min..max normalized over the whole layer; each value is one
    cell `tile_w` pixels wide and STRIP_HEIGHT tall, without separators.
    """
    flat = values.reshape(-1, 1).astype(np.float32, copy=False)
    indices = normalize_maps(flat[None], "layer")[0, :, 0]
    cell = max(1, min(16, 1024 // max(1, indices.size)))
    row = np.repeat(indices, cell)
    canvas = np.broadcast_to(row, (STRIP_HEIGHT, row.size))
    grid = Grid(1, int(indices.size), STRIP_HEIGHT, cell, int(indices.size), 1, separator=0)
    return encode_palette_png(np.ascontiguousarray(canvas), colormap_lut(colormap)), grid


def render_channel(indices: np.ndarray, colormap: str) -> bytes:
    """(H, W) uint8 palette indices of one channel -> PNG bytes."""
    return encode_palette_png(np.ascontiguousarray(indices), colormap_lut(colormap))


@functools.lru_cache(maxsize=256)
def tile_origins(grid: Grid) -> tuple[np.ndarray, np.ndarray]:
    """(top, left) int64 arrays: where each channel's tile starts in the canvas (read-only)."""
    channels = np.arange(grid.channels, dtype=np.int64)
    top = channels // grid.cols * (grid.tile_h + grid.separator)
    left = channels % grid.cols * (grid.tile_w + grid.separator)
    top.setflags(write=False)
    left.setflags(write=False)
    return top, left


def channel_tile(canvas: np.ndarray, grid: Grid, channel: int) -> np.ndarray:
    """Channel `channel`'s (tile_h, tile_w) tile of a grid canvas (a view)."""
    tops, lefts = tile_origins(grid)
    top, left = int(tops[channel]), int(lefts[channel])
    return canvas[top : top + grid.tile_h, left : left + grid.tile_w]


def render_overlay(
    image: np.ndarray, mean_map: np.ndarray, colormap: str, alpha: float = 0.5
) -> bytes:
    """A layer's (h, w) channel-mean map, min..max normalized, upsampled bilinearly
    onto the (H, W, 1|3) uint8 `image` and blended with weight `alpha`."""
    mean = np.asarray(mean_map, dtype=np.float32)
    indices = normalize_maps(mean[:, :, None], "layer")[:, :, 0]
    heat = Image.fromarray(colormap_lut(colormap)[indices])
    heat = heat.resize((image.shape[1], image.shape[0]), Image.Resampling.BILINEAR)
    base = image if image.shape[2] == 3 else np.repeat(image, 3, axis=2)
    blended = base * (1.0 - alpha) + np.asarray(heat, dtype=np.float32) * alpha
    return encode_png(np.clip(np.rint(blended), 0, 255).astype(np.uint8))


def encode_palette_png(
    indices: np.ndarray, lut: np.ndarray, rows: np.ndarray | None = None
) -> bytes:
    """(H, W) uint8 indices + (256, 3) LUT -> palette PNG bytes (colour type 3).

    `rows`: the indices' `palette_rows`, where the caller has them already.

    Every row with filter type 2 (up: the byte above subtracted, modulo 256).
    A tile's flat areas become runs of zeros, and where a map changes slowly
    down its rows, small numbers. With ISA-L's deflate, the grids of 5 images
    (the classic CNN's `:8`, the trained demo model's every layer) came out at
    548 and 630 KB an image filtered up, 585 and 676 filtered sub, 673 and 751
    unfiltered, each in 3.0-3.9 ms. Filters work on bytes, so every PNG reader
    applies them to palette indices too.
    """
    height, width = indices.shape
    if rows is None:
        rows = palette_rows(indices)
    return _png(width, height, 3, rows, lut.tobytes())


def palette_rows(raw: np.ndarray) -> np.ndarray:
    """(H, N) uint8 -> (H, N + 1) PNG rows, each its filter byte (2, up) and its bytes
    less the bytes above them, modulo 256. worker/engine/host_reduce.py makes a grid's
    rows in the loop that tiles it."""
    height, width = raw.shape
    rows = np.empty((height, width + 1), dtype=np.uint8)
    rows[:, 0] = 2  # filter type up
    rows[:1, 1:] = raw[:1]  # the first row has zeros above it
    np.subtract(raw[1:], raw[:-1], out=rows[1:, 1:])  # uint8: modulo 256
    return rows


def encode_png(pixels: np.ndarray) -> bytes:
    """(H, W) or (H, W, 1|3) uint8 -> PNG bytes (gray or RGB).

    Every row with filter type 2 (up), as the grids. On photos at model input
    size that is about as small as Pillow's per-row choice of filters at
    level 1 (37.7 against 41.7 KB for the benchmark's 150x150 input, 93.7
    against 92.8 KB for the demo photo at 224x224) in a third to a fifth of
    its time.
    """
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.dtype != np.uint8 or (pixels.ndim != 2 and pixels.shape[2:] != (3,)):
        raise ValueError(
            f"encode_png takes (H, W) or (H, W, 1|3) uint8, not {pixels.dtype} {pixels.shape}"
        )
    height, width = pixels.shape[:2]
    rows = palette_rows(pixels.reshape(height, -1))
    return _png(width, height, 2 if pixels.ndim == 3 else 0, rows)


def _png(width: int, height: int, colour_type: int, rows: np.ndarray, plte: bytes = b"") -> bytes:
    """The plainest valid 8-bit PNG: IHDR, PLTE (palette images), one IDAT, IEND.

    `rows` holds each row's filter byte and filtered bytes. Written here rather
    than by Pillow so that the deflate is ISA-L's (python-isal) where it is
    installed; Pillow's encoder is tied to the zlib it was built with. On the
    grids of 5 images (2 cores, the classic CNN's `:8` and the trained demo
    model's every layer) ISA-L's level 1 took 3.2 and 3.8 ms an image against
    zlib-ng's 6.1 and 7.3 (level 1, Z_RLE), and filtered up its files are
    smaller than zlib-ng's were filtered sub (548 against 566 KB, 630 against
    644). Any PNG reader decodes it; the tests read them back with Pillow.
    """
    data = _deflate(rows.data)
    header = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    chunks = [PNG_SIGNATURE, _chunk(b"IHDR", header)]
    if plte:
        chunks.append(_chunk(b"PLTE", plte))
    chunks += [_chunk(b"IDAT", data), _chunk(b"IEND", b"")]
    return b"".join(chunks)


def _deflate(data: memoryview) -> bytes:
    """`data` as a zlib stream (PNG's IDAT): ISA-L's where it is installed, else zlib's.
    Both release the GIL, so the render threads deflate on every core."""
    if _igzip is not None:
        return _igzip.compress(data, PNG_ISAL_LEVEL, _igzip.COMP_ZLIB)
    deflate = zlib.compressobj(PNG_COMPRESS_LEVEL, zlib.DEFLATED, 15, PNG_MEM_LEVEL, PNG_STRATEGY)
    return deflate.compress(data) + deflate.flush()


def _chunk(kind: bytes, body: bytes) -> bytes:
    crc = _crc32(body, _crc32(kind)) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)
