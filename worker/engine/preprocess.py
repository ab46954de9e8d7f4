"""Image bytes -> the float32 array the model is fed, and a record of how.

Decoding is Pillow's, restricted to JPEG/PNG/WebP/BMP/TIFF/GIF. The header's
pixel count is checked before any pixel is decoded. Then: first frame, EXIF
orientation applied, 16-bit and float images reduced to 8 bits, alpha dropped,
converted to the model's channel count (ITU-R 601-2 luma for gray), resized
bilinearly to the model's input size and scaled. Everything that changes the
pixels is written to the returned `record`, which goes into the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL
from PIL import (
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageOps,
    JpegImagePlugin,
    MpoImagePlugin,  # multi-picture JPEGs from cameras open as JPEG
    PngImagePlugin,
    TiffImagePlugin,
    UnidentifiedImageError,
    WebPImagePlugin,
)

from producer.contract import JobOptions
from producer.errors import ImageTooLarge, InvalidImage, InvalidJob
from producer.settings import Settings

# The decoders we accept, registered by importing their plugins (formats= needs them).
_PLUGINS = (
    BmpImagePlugin,
    GifImagePlugin,
    JpegImagePlugin,
    MpoImagePlugin,
    PngImagePlugin,
    TiffImagePlugin,
    WebPImagePlugin,
)
FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF")
RESAMPLE = "bilinear"
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N", "I")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class AutoScale:
    """What the scale 'auto' is for one model: a scale of the contract's (with its mean
    and std for 'meanstd'), and why."""

    scale: str = "1/255"
    why: str = "nothing in front of the model's first weights scales its input"
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    @property
    def found(self) -> bool:
        """Whether something of the model's chose it (else it is the classic x / 255)."""
        return self != CLASSIC


CLASSIC = AutoScale()

CAFFE_MEAN = (103.939, 116.779, 123.68)  # ImageNet's, in BGR order
FORMULAS = {
    "1/255": "x / 255",
    "none": "x",
    "-1..1": "x / 127.5 - 1",
    "meanstd": "(x / 255 - mean) / std",
    "caffe": "x[..., ::-1] - [103.939, 116.779, 123.68] (BGR, ImageNet's means)",
}
# Errors Pillow raises for bytes that are not a well-formed image.
_DECODE_ERRORS = (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, IndexError)


@dataclass
class PreparedImage:
    """One image ready for the forward pass.

    `pixels`: (H, W, C) float32, scaled, what the model is fed.
    `display`: (H, W, C) uint8, the same image before scaling (input.png).
    `original_size`: (H, W) of the decoded image after EXIF orientation.
    """

    pixels: np.ndarray
    display: np.ndarray
    sha256: str
    original_size: tuple[int, int]
    record: dict[str, Any]


def preprocess(
    data: bytes,
    input_shape: tuple[int | None, int | None, int],
    options: JobOptions,
    settings: Settings,
    auto: AutoScale = CLASSIC,
) -> PreparedImage:
    """Decode, convert, resize and scale one image for a model with `input_shape` (H, W, C).

    `auto` is what the scale 'auto' is for the model (its `LoadedModel.auto_scale`).
    Raises InvalidImage (not a decodable image), ImageTooLarge (header says
    more than settings.max_pixels), InvalidJob (bad scale options).
    """
    channels = input_shape[2]
    check_scale(options, channels)
    scale_record = _scale_record(options, auto)
    resolved = resolve_scale(options, auto)
    if resolved is not options:  # what 'auto' chose fits the model's channels too
        check_scale(resolved, channels)
    options = resolved
    image, record = decode_image(
        data,
        settings.max_pixels,
        fit=lambda size: target_size(size, input_shape, settings.max_side),
    )
    original = tuple(record.pop("original_size"))
    image = _to_channels(image, channels, record)
    height, width = target_size(original, input_shape, settings.max_side)
    if height * width > settings.max_pixels:  # a fixed model input can be huge too
        raise ImageTooLarge(
            f"the model's input is {height}x{width} = {height * width} pixels, above "
            f"the {settings.max_pixels}-pixel limit (ACTVIZ_MAX_PIXELS)"
        )
    if (height, width) != (image.height, image.width):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    display = np.asarray(image, dtype=np.uint8)
    if display.ndim == 2:
        display = display[:, :, None]
    record.update(
        size=[height, width],
        channels=channels,
        resample=RESAMPLE,
        resized=(height, width) != original,
        layout="HWC",
        dtype="float32",
    )
    record.update(scale_record)
    return PreparedImage(
        pixels=scale_pixels(display, options),
        display=display,
        sha256=hashlib.sha256(data).hexdigest(),
        original_size=original,
        record=record,
    )


def decode_image(
    data: bytes,
    max_pixels: int,
    fit: Callable[[tuple[int, int]], tuple[int, int]] | None = None,
) -> tuple[Image.Image, dict[str, Any]]:
    """Decode the first frame with EXIF orientation applied.

    The pixel count from the header is checked before decoding. `fit`, given
    the image's (H, W) as displayed, returns the size it will be resized to: a
    JPEG much larger than that is decoded at 1/2, 1/4 or 1/8 scale (the
    decoder's DCT scaling, `Image.draft`), never below that size, so a 24 MP
    photo for a 150x150 model decodes about 1/64 of its pixels. The record
    says so (`draft_scale`) and holds the full `original_size` (H, W).
    Raises InvalidImage or ImageTooLarge.
    """
    if not data:
        raise InvalidImage("image is empty (0 bytes)")
    try:
        with warnings.catch_warnings():
            # Our own limit below is the one that applies; Pillow's bomb error still does.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image refused before decoding: {exc}") from exc
    except UnidentifiedImageError as exc:
        raise InvalidImage(
            f"not a readable image: its first bytes are {data[:16]!r}, which no accepted "
            "format starts with (JPEG, PNG, WebP, BMP, TIFF or GIF expected)"
        ) from exc
    except _DECODE_ERRORS as exc:
        raise InvalidImage(
            f"not a readable image (JPEG, PNG, WebP, BMP, TIFF or GIF expected): {exc}"
        ) from exc
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"image is {width}x{height} = {width * height / 1e6:.1f} megapixels; "
            f"the limit is {max_pixels / 1e6:g} megapixels"
        )
    if width == 0 or height == 0:
        raise InvalidImage(f"image has no pixels ({width}x{height})")
    record: dict[str, Any] = {
        "format": image.format,
        "mode": image.mode,
        "decoder": f"Pillow {PIL.__version__}",
    }
    if fit is not None and image.format in ("JPEG", "MPO"):
        _draft(image, fit, record)
    try:
        image.load()
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image refused while decoding: {exc}") from exc
    except _DECODE_ERRORS as exc:
        raise InvalidImage(f"image data is truncated or corrupt: {exc}") from exc
    oriented = _orient(image, record)
    turned = record.get("exif_orientation") in (5, 6, 7, 8)
    record["original_size"] = [width, height] if turned else [height, width]
    return oriented, record


def decoded_pixels(
    data: bytes, input_shape: tuple[int | None, int | None, int], settings: Settings
) -> int:
    """How many pixels `preprocess` will decode for `data`: from the header alone.

    A JPEG's are after its reduced-size decoding (`_draft`). 0 for data whose
    header cannot be read (preprocess then says why).
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        if image.format in ("JPEG", "MPO"):
            _draft(image, lambda size: target_size(size, input_shape, settings.max_side), {})
        width, height = image.size
    except (Image.DecompressionBombError, *_DECODE_ERRORS):
        return 0
    return width * height


def _draft(
    image: Image.Image, fit: Callable[[tuple[int, int]], tuple[int, int]], record: dict[str, Any]
) -> None:
    """Ask the JPEG decoder for the smallest DCT scale that still covers `fit`'s size."""
    width, height = image.size
    try:
        turned = int(image.getexif().get(0x0112, 1)) in (5, 6, 7, 8)
    except _DECODE_ERRORS + (KeyError, TypeError):
        turned = False
    shown = (width, height) if turned else (height, width)  # (H, W) as displayed
    out_h, out_w = fit(shown)
    want = (out_h, out_w) if turned else (out_w, out_h)  # (W, H) as stored
    if want[0] * 2 > width or want[1] * 2 > height:
        return  # not even half the size: decode whole
    image.draft(image.mode, want)
    scale = width // max(1, image.size[0])
    if scale > 1:
        record["draft_scale"] = f"1/{scale}"


def _orient(image: Image.Image, record: dict[str, Any]) -> Image.Image:
    try:
        orientation = int(image.getexif().get(0x0112, 1))
        oriented = ImageOps.exif_transpose(image)
    except _DECODE_ERRORS + (KeyError, TypeError) as exc:
        # A broken EXIF block does not spoil the pixels: keep them, say so.
        record["exif_orientation"] = f"unreadable ({exc})"
        return image
    record["exif_orientation"] = orientation
    return oriented if oriented is not None else image


def _to_channels(image: Image.Image, channels: int, record: dict[str, Any]) -> Image.Image:
    """8-bit L (channels == 1) or RGB (channels == 3), alpha dropped."""
    mode = image.mode
    record["alpha"] = "dropped" if ("A" in mode or "transparency" in image.info) else "none"
    if mode in _SIXTEEN_BIT:
        values = np.asarray(image).astype(np.float32)
        image = Image.fromarray(np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8))
        record["bit_depth"] = "16-bit values divided by 257"
    elif mode == "F":
        values = np.asarray(image, dtype=np.float32)
        low, high = float(values.min()), float(values.max())
        span = high - low if high > low else 1.0
        image = Image.fromarray(np.rint((values - low) * (255.0 / span)).astype(np.uint8))
        record["bit_depth"] = f"float values rescaled from [{low:g}, {high:g}] to [0, 255]"
    elif mode == "P":
        image = image.convert("RGBA")
    target = "L" if channels == 1 else "RGB"
    record["color"] = f"{mode}->{target}" if mode != target else target
    return image.convert(target) if image.mode != target else image


def target_size(
    original: tuple[int, int], input_shape: tuple[int | None, int | None, int], max_side: int
) -> tuple[int, int]:
    """(H, W) to resize to: the model's fixed size, else the image's, capped at max_side."""
    height, width = original
    free = [side for side, fixed in zip(original, input_shape[:2], strict=True) if fixed is None]
    scale = min(1.0, max_side / max(free)) if free else 1.0
    out_h = input_shape[0] if input_shape[0] is not None else max(1, round(height * scale))
    out_w = input_shape[1] if input_shape[1] is not None else max(1, round(width * scale))
    return int(out_h), int(out_w)


def check_scale(options: JobOptions, channels: int) -> None:
    """Raise InvalidJob unless `options` are valid and their mean/std fit `channels`.

    The options' own checks are the contract's (`JobOptions.validate`); only
    what depends on the model is checked here.
    """
    try:
        options.validate()
    except ValueError as exc:
        raise InvalidJob(str(exc)) from None
    if options.scale == "caffe" and channels != 3:
        raise InvalidJob(f"scale 'caffe' reorders RGB to BGR; this model takes {channels} channel")
    if options.scale != "meanstd":
        return
    for name in ("mean", "std"):
        values = getattr(options, name)
        if not values or len(values) not in (1, channels):
            raise InvalidJob(f"scale 'meanstd' needs options.{name} with 1 or {channels} values")


def resolve_scale(options: JobOptions, auto: AutoScale = CLASSIC) -> JobOptions:
    """`options` with the scale 'auto' made the model's `auto` (input_scale.py)."""
    if options.scale != "auto":
        return options
    mean, std = (list(auto.mean), list(auto.std)) if auto.mean and auto.std else (None, None)
    return dataclasses.replace(options, scale=auto.scale, mean=mean, std=std)


def scale_pixels(display: np.ndarray, options: JobOptions) -> np.ndarray:
    """(H, W, C) uint8 -> (H, W, C) float32 with options.scale applied."""
    x = display.astype(np.float32)
    if options.scale == "1/255":
        x /= np.float32(255)
    elif options.scale == "-1..1":
        x /= np.float32(127.5)
        x -= np.float32(1)
    elif options.scale == "meanstd":
        x /= np.float32(255)
        x -= np.asarray(options.mean, dtype=np.float32)
        x /= np.asarray(options.std, dtype=np.float32)
    elif options.scale == "caffe":
        x = x[..., ::-1] - np.asarray(CAFFE_MEAN, dtype=np.float32)
    return x


def _scale_record(options: JobOptions, auto: AutoScale) -> dict[str, Any]:
    """The scale applied and its formula; for 'auto', why; and a note where the job
    named a scale other than the one the model's own layers or name chose."""
    asked = options.scale
    options = resolve_scale(options, auto)
    record: dict[str, Any] = {"scale": options.scale, "formula": FORMULAS[options.scale]}
    if asked == "auto":
        record["scale_auto"] = auto.why
    elif auto.found and asked != auto.scale:
        record["scale_note"] = (
            f"'auto' would feed this model scale {auto.scale!r} ({auto.why}); this job "
            f"asked for {asked!r}"
        )
    if options.scale == "meanstd":
        record.update(mean=list(options.mean or []), std=list(options.std or []))
    return record
