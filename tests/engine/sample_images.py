"""Real image bytes for the engine tests, good and deliberately bad."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

CHANNELS = {"RGB": 3, "RGBA": 4, "CMYK": 4, "L": 1}


def noise(width: int, height: int, mode: str = "RGB", seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, CHANNELS[mode]), dtype=np.uint8)
    return Image.frombytes(mode, (width, height), pixels.tobytes())


def encode(image: Image.Image, fmt: str, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def image_bytes(
    width: int = 40, height: int = 30, fmt: str = "PNG", mode: str = "RGB", seed: int = 0, **save
) -> bytes:
    """A seeded random-noise image encoded in `fmt`."""
    return encode(noise(width, height, mode, seed), fmt, **save)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_from_rows(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand: IHDR + one IDAT of already-filtered rows + IEND."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(rows))
        + _chunk(b"IEND", b"")
    )


def huge_png_header(width: int = 40000, height: int = 40000) -> bytes:
    """A PNG whose header claims width x height; its pixel data is a few bytes.

    Decoding it would need gigabytes; a correct reader refuses it from the header.
    """
    return png_from_rows(width, height, 8, 2, b"\x00" * 16)


def png16(values: np.ndarray) -> bytes:
    """(H, W) uint16 gray or (H, W, 3) uint16 RGB as a 16-bit PNG, big-endian rows."""
    height, width = values.shape[:2]
    color_type = 0 if values.ndim == 2 else 2
    raw = values.astype(">u2").reshape(height, -1).tobytes()
    row_bytes = len(raw) // height
    rows = b"".join(b"\x00" + raw[r * row_bytes : (r + 1) * row_bytes] for r in range(height))
    return png_from_rows(width, height, 16, color_type, rows)
