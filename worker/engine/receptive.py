"""Receptive fields, measured: how far from a unit the input may change before the unit does.

For a census's "dataset examples" each channel's peak is shown as a crop of
the input around it, the size of the unit's receptive field. Rather than
derive it from every layer's kernel, stride, padding and dilation (and every
branch of a functional graph), it is measured once per extractor and input
shape, for every selected layer at once (the largest of three trials): the input is a random image; copies
of it get everything outside a square window around the input's centre
replaced by other random values, one copy per window radius; a layer's radius
is the smallest one whose copy leaves the layer's unit over the centre
unchanged (all its channels). One forward pass over len(RADII) images.

The radius is measured around the input's centre, not the unit's own centre,
so it may exceed the true one by up to half the layer's stride; a crop is
never smaller than the field.
"""

from __future__ import annotations

from typing import Any

import numpy as np

RADII = (0, 1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256)
CHUNK = 8  # images per forward pass while measuring
TRIALS = 3


def measure_radii(extractor: Any, shape: tuple[int, ...]) -> list[int | None]:
    """Per selected layer of `extractor`, its receptive-field radius in input pixels
    for an input of `shape` (H, W, C); None for a layer without an (H, W, C) output.
    A radius of max(H, W) means the whole input (a unit that sees everything).

    The largest of TRIALS measurements with different random images: a unit whose
    ReLUs are all off in one trial looks unchanged by anything outside it."""
    found = [_measure(extractor, shape, seed) for seed in range(TRIALS)]
    return [None if r[0] is None else max(r) for r in zip(*found, strict=True)]


def _measure(extractor: Any, shape: tuple[int, ...], seed: int) -> list[int | None]:
    height, width, channels = (int(s) for s in shape)
    side = max(height, width)
    radii = [r for r in RADII if r < side] + [side]
    rng = np.random.default_rng(seed)
    base = rng.random((height, width, channels), dtype=np.float32)
    other = rng.random((height, width, channels), dtype=np.float32)
    cy, cx = height // 2, width // 2
    copies = []
    for r in radii:
        copy = other.copy()
        window = (slice(max(0, cy - r), cy + r + 1), slice(max(0, cx - r), cx + r + 1))
        copy[window] = base[window]
        copies.append(copy)
    reference = extractor(base[None])
    centres = [_centre(out[0], height, width) for out in reference]
    found: list[int | None] = [None if c is None else side for c in centres]
    settled = [c is None for c in centres]
    for start in range(0, len(copies), CHUNK):
        if all(settled):
            break
        outputs = extractor(np.stack(copies[start : start + CHUNK]))
        for i, (out, centre) in enumerate(zip(outputs, centres, strict=True)):
            if settled[i]:
                continue
            for j in range(out.shape[0]):
                if np.allclose(_centre(out[j], height, width), centre, rtol=1e-5, atol=1e-6):
                    found[i], settled[i] = radii[start + j], True
                    break
    return found


def _centre(output: np.ndarray, height: int, width: int) -> np.ndarray | None:
    """The channel vector of the unit over the input's centre; None if not (h, w, C)."""
    if output.ndim != 3:
        return None
    h, w, _ = output.shape
    return output[min(h - 1, (height // 2) * h // height), min(w - 1, (width // 2) * w // width)]


def crop_box(
    peak: int, layer_shape: list[int], input_size: list[int], radius: int | None
) -> list[int] | None:
    """[top, left, height, width, input height, input width] in input pixels: the
    field around flat position `peak` of an (h, w, C) layer; None when the layer
    is not spatial."""
    if radius is None or len(layer_shape) != 3:
        return None
    h, w = int(layer_shape[0]), int(layer_shape[1])
    height, width = int(input_size[0]), int(input_size[1])
    y, x = divmod(int(peak), w)
    cy = int((y + 0.5) * height / h)
    cx = int((x + 0.5) * width / w)
    top, left = max(0, cy - radius), max(0, cx - radius)
    bottom, right = min(height, cy + radius + 1), min(width, cx + radius + 1)
    return [top, left, bottom - top, right - left, height, width]
