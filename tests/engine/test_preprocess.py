"""Image bytes -> model input: decoding, limits, conversion, resizing, scaling."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from sample_images import encode, huge_png_header, image_bytes, noise, png16

from producer.contract import ErrorCode, JobOptions
from producer.errors import ImageTooLarge, InvalidImage, InvalidJob
from producer.settings import Settings
from worker.engine.preprocess import decode_image, preprocess

RGB32 = (32, 32, 3)
FREE = (None, None, 3)


def run(data: bytes, shape=RGB32, settings: Settings | None = None, **options):
    return preprocess(data, shape, JobOptions(**options), settings or Settings())


# ---- bad bytes -----------------------------------------------------------------


def test_truncated_jpeg_is_invalid_image():
    data = image_bytes(64, 64, fmt="JPEG")
    with pytest.raises(InvalidImage) as err:
        run(data[: len(data) // 2])
    assert err.value.code == ErrorCode.INVALID_IMAGE


def test_html_saved_as_jpg_is_invalid_image():
    with pytest.raises(InvalidImage, match="not a readable image") as refused:
        run(b"<!doctype html><html><body>404 Not Found</body></html>")
    # It says what the bytes are, not where Python kept them.
    assert "b'<!doctype html><'" in str(refused.value)
    assert "object at 0x" not in str(refused.value)


def test_zero_byte_file_is_invalid_image():
    with pytest.raises(InvalidImage, match="empty"):
        run(b"")


def test_header_claiming_40000x40000_is_refused_before_decoding():
    data = huge_png_header(40000, 40000)
    assert len(data) < 200  # nothing was allocated to make it
    with pytest.raises(ImageTooLarge) as err:
        run(data)
    assert err.value.code == ErrorCode.IMAGE_TOO_LARGE


def test_image_over_max_pixels_is_image_too_large_without_decoding():
    # 5000 x 4000 = 20 MP, over a 10 MP limit but under Pillow's own bomb check;
    # the pixel data is bogus, so only a header check can give image_too_large.
    data = huge_png_header(5000, 4000)
    with pytest.raises(ImageTooLarge, match="20.0 megapixels; the limit is 10 megapixels"):
        run(data, settings=Settings(max_pixels=10_000_000))


# ---- decoding and colour -------------------------------------------------------


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "TIFF", "GIF"])
def test_every_supported_format_decodes(fmt):
    prepared = run(image_bytes(20, 10, fmt=fmt))
    assert prepared.pixels.shape == (32, 32, 3) and prepared.pixels.dtype == np.float32
    assert prepared.record["format"] == fmt
    assert prepared.original_size == (10, 20)


def test_gif_uses_its_first_frame():
    frames = [Image.new("RGB", (8, 8), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    prepared = run(buffer.getvalue(), shape=(8, 8, 3))
    assert tuple(prepared.display[0, 0]) == (255, 0, 0)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (20, 10), (0, 0, 0))
    image.paste((255, 255, 255), (0, 0, 10, 10))  # white left half
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: display needs a 90 degree turn clockwise
    decoded, record = decode_image(encode(image, "JPEG", exif=exif, quality=95), 10**8)
    assert decoded.size == (10, 20)
    assert record["exif_orientation"] == 6
    assert record["original_size"] == [20, 10]  # (H, W) as displayed
    pixels = np.asarray(decoded.convert("L"), dtype=np.float32)
    assert pixels[:10].mean() > 200 and pixels[10:].mean() < 50  # left half is now on top


def test_alpha_is_dropped():
    rgba = noise(16, 16, "RGBA", seed=4)
    prepared = run(encode(rgba, "PNG"), shape=(16, 16, 3))
    assert prepared.display.shape == (16, 16, 3)
    assert prepared.record["alpha"] == "dropped"
    np.testing.assert_array_equal(prepared.display, np.asarray(rgba)[:, :, :3])


def test_16bit_gray_png_is_scaled_to_8_bits():
    values = (np.arange(16, dtype=np.uint16).reshape(4, 4) * 4369).astype(np.uint16)
    prepared = run(png16(values), shape=(4, 4, 1))
    np.testing.assert_array_equal(prepared.display[:, :, 0], np.rint(values / 257.0))
    assert "16-bit" in prepared.record["bit_depth"]


def test_16bit_rgb_png_decodes():
    values = np.zeros((4, 4, 3), dtype=np.uint16)
    values[..., 0] = 65535
    values[..., 2] = 32896
    prepared = run(png16(values), shape=(4, 4, 3))
    assert tuple(prepared.display[0, 0]) == (255, 0, 128)


def test_16bit_tiff_is_scaled_to_8_bits():
    values = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    tiff = encode(Image.fromarray(values), "TIFF")
    prepared = run(tiff, shape=(8, 8, 1))
    assert Image.open(io.BytesIO(tiff)).mode.startswith("I;16")
    np.testing.assert_array_equal(prepared.display[:, :, 0], np.rint(values / 257.0))


def test_cmyk_jpeg_converts_to_rgb():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    prepared = run(encode(cmyk, "JPEG", quality=95), shape=(16, 16, 3))
    red, green, blue = prepared.display[8, 8].astype(int)
    assert red > 200 and green < 60 and blue < 60
    assert prepared.record["color"] == "CMYK->RGB"


def test_rgb_is_converted_to_gray_for_one_channel_models():
    image = noise(12, 12, seed=5)
    prepared = run(encode(image, "PNG"), shape=(12, 12, 1))
    assert prepared.display.shape == (12, 12, 1)
    np.testing.assert_array_equal(prepared.display[:, :, 0], np.asarray(image.convert("L")))
    assert prepared.record["color"] == "RGB->L"


def test_gray_is_converted_to_rgb_for_three_channel_models():
    gray = noise(12, 12, "L", seed=6)
    prepared = run(encode(gray, "PNG"), shape=(12, 12, 3))
    for c in range(3):
        np.testing.assert_array_equal(prepared.display[:, :, c], np.asarray(gray))


# ---- size ------------------------------------------------------------------------


def test_image_is_resized_bilinearly_to_the_model_size():
    image = noise(40, 30, seed=7)
    prepared = run(encode(image, "PNG"), shape=(32, 32, 3))
    expected = np.asarray(image.resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(prepared.display, expected)
    assert prepared.record["size"] == [32, 32] and prepared.record["resample"] == "bilinear"


def test_fully_convolutional_model_keeps_the_image_size():
    prepared = run(image_bytes(40, 30), shape=FREE)
    assert prepared.pixels.shape == (30, 40, 3)
    assert prepared.record["resized"] is False


def test_fully_convolutional_size_is_capped_by_max_side():
    prepared = run(image_bytes(100, 50), shape=FREE, settings=Settings(max_side=40))
    assert prepared.pixels.shape == (20, 40, 3)


# ---- scaling ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, formula",
    [
        ({}, lambda x: x / 255.0),
        ({"scale": "none"}, lambda x: x),
        ({"scale": "-1..1"}, lambda x: x / 127.5 - 1.0),
        (
            {"scale": "meanstd", "mean": [0.4, 0.5, 0.6], "std": [0.2, 0.25, 0.3]},
            lambda x: (x / 255.0 - np.array([0.4, 0.5, 0.6])) / np.array([0.2, 0.25, 0.3]),
        ),
    ],
)
def test_scale_modes_follow_their_recorded_formula(options, formula):
    prepared = run(image_bytes(32, 32), **options)
    expected = formula(prepared.display.astype(np.float64))
    np.testing.assert_allclose(prepared.pixels, expected, rtol=1e-6, atol=1e-6)
    assert prepared.record["scale"] == options.get("scale", "1/255")
    assert prepared.record["formula"]


@pytest.mark.parametrize(
    "options",
    [
        {"scale": "1/256"},
        {"scale": "meanstd"},
        {"scale": "meanstd", "mean": [0.5, 0.5], "std": [0.2]},
        {"scale": "meanstd", "mean": [0.5], "std": [0.0]},
    ],
)
def test_bad_scale_options_are_invalid_job(options):
    with pytest.raises(InvalidJob) as err:
        run(image_bytes(), **options)
    assert err.value.code == ErrorCode.INVALID_JOB


def photo(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth colour gradients with mild noise: what a downscaled photo looks like."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin(xx / 97 + yy / 131)], axis=-1)
    pixels = np.clip(base * 220 + rng.normal(0, 6, base.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def test_a_large_jpeg_is_decoded_at_the_scale_the_model_needs():
    """24 MP for a 150x150 model: decoded at 1/8 by DCT scaling, close to a full decode."""
    big = photo(6000, 4000)
    data = encode(big, "JPEG", quality=92)
    prepared = run(data, shape=(150, 150, 3))
    assert prepared.record["draft_scale"] == "1/8"
    assert prepared.original_size == (4000, 6000)
    assert prepared.display.shape == (150, 150, 3)
    # The same photo decoded whole and resized the same way.
    full = Image.open(io.BytesIO(data)).convert("RGB").resize((150, 150), Image.BILINEAR)
    diff = np.abs(prepared.display.astype(int) - np.asarray(full, dtype=int))
    assert diff.mean() < 2.0 and np.percentile(diff, 99) <= 8


def test_draft_decoding_keeps_exif_orientation_and_never_goes_below_the_target():
    big = photo(1600, 800, seed=2)  # stored landscape, shown portrait (orientation 6)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(big, "JPEG", exif=exif, quality=92)
    prepared = run(data, shape=(300, 150, 3))  # H 300, W 150: needs 300 of the stored 1600
    assert prepared.original_size == (1600, 800)
    assert prepared.record["exif_orientation"] == 6
    assert prepared.record["draft_scale"] == "1/4"  # 400x200 covers 300x150; 1/8 would not
    assert prepared.display.shape == (300, 150, 3)
    # A model as large as the image decodes it whole; so does PNG, which has no DCT scaling.
    assert "draft_scale" not in run(data, shape=(1600, 800, 3)).record
    assert "draft_scale" not in run(encode(big, "PNG"), shape=(150, 150, 3)).record


def test_decoded_pixels_are_known_from_the_header_draft_included():
    from worker.engine.preprocess import decoded_pixels

    big = photo(1600, 1200, seed=3)
    settings = Settings()
    jpeg, png = encode(big, "JPEG", quality=90), encode(big, "PNG")
    assert decoded_pixels(png, (150, 150, 3), settings) == 1600 * 1200
    assert decoded_pixels(jpeg, (150, 150, 3), settings) == 200 * 150  # decoded at 1/8
    assert decoded_pixels(jpeg, (1200, 1600, 3), settings) == 1600 * 1200
    assert decoded_pixels(b"not an image", (150, 150, 3), settings) == 0
    prepared = run(jpeg, shape=(150, 150, 3))
    assert prepared.record["draft_scale"] == "1/8"
