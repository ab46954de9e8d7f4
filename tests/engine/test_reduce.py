"""Both reductions equal the numpy reference, on every model kind the engine serves.

The device program (worker/engine/reduce.py) computes statistics, normalizes,
quantizes and tiles where the activations are; a CPU does the same in fused
host loops (worker/engine/host_reduce.py), and each test runs both
(`on_host`). The reference is numpy on the float32 activations of an eager
pass, statistics in float64. Palette indices may differ by one (float32
rounding in another order); separators and geometry must be equal;
statistics agree within 1e-4 relative.
"""

from __future__ import annotations

import numpy as np
import pytest
from sample_images import image_bytes

from producer.contract import JobOptions
from producer.settings import Settings
from worker.engine import RenderKey, preprocess
from worker.engine.render import (
    SEPARATOR,
    channel_tile,
    downsample_factor,
    normalize_maps,
    palette_rows,
    tile_indices,
)

MODELS = ["sequential_h5", "gray", "residual", "nested", "fully_conv", "wide", "wide_dense"]
MODES = ["channel", "layer", "meanstd", "percentile"]
WHERE = pytest.mark.parametrize("on_host", [False, True], ids=["device", "host"])


def pixels_for(loaded, count: int = 2, side: int = 80) -> np.ndarray:  # noqa: ANN001
    settings = Settings()
    return np.stack(
        [
            preprocess(
                image_bytes(side, side, seed=40 + s), loaded.input_shape, JobOptions(), settings
            ).pixels
            for s in range(count)
        ]
    )


def reference_stats(act: np.ndarray) -> dict[str, np.ndarray]:
    x = act.reshape(-1, act.shape[-1]).astype(np.float64)
    return {
        "mean": x.mean(axis=0),
        "std": x.std(axis=0),
        "min": x.min(axis=0),
        "max": x.max(axis=0),
        "zeros": (x == 0).sum(axis=0),
    }


def assert_close(have: np.ndarray, want: np.ndarray, scale: float, what: str) -> None:
    # 1e-4 relative; values far below the layer's own scale compare against that scale.
    tolerance = 1e-4 * np.maximum(np.abs(want), 1e-3 * scale) + 1e-7
    worst = np.max(np.abs(have.astype(np.float64) - want) - tolerance, initial=-1.0)
    assert worst <= 0, f"{what}: off by {worst} beyond tolerance"


@WHERE
@pytest.mark.parametrize("name", MODELS)
def test_statistics_match_float64_numpy(loaded_models, name: str, on_host: bool) -> None:
    loaded = loaded_models(name)
    extractor = loaded.extractor(None)
    batch = pixels_for(loaded)
    floats = extractor(batch)
    reduced = extractor.reduce(batch, RenderKey.of(JobOptions(), Settings()), on_host=on_host)
    assert len(reduced) == len(floats) > 0
    for index, act in enumerate(floats):
        for position in range(batch.shape[0]):
            layer = reduced.layer(index, position)
            want = reference_stats(act[position])
            scale = float(np.max(np.abs(act[position]), initial=0.0))
            for row, key in enumerate(("mean", "std", "min", "max")):
                assert_close(layer.moments[row], want[key], scale, f"{name} layer {index} {key}")
            np.testing.assert_array_equal(layer.zeros, want["zeros"])
            assert layer.count == act[position].size // act.shape[-1]


@WHERE
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", MODELS)
def test_grids_match_the_numpy_reference(
    loaded_models,  # noqa: ANN001
    name: str,
    mode: str,
    on_host: bool,
) -> None:
    loaded = loaded_models(name)
    extractor = loaded.extractor(None)
    batch = pixels_for(loaded)
    floats = extractor(batch)
    settings = Settings(max_grid_side=256)  # downsampling on the larger maps too
    options = JobOptions(normalize=mode, percentile=97.5)
    reduced = extractor.reduce(batch, RenderKey.of(options, settings), on_host=on_host)
    grids = 0
    for index, act in enumerate(floats):
        for position in range(batch.shape[0]):
            layer = reduced.layer(index, position)
            maps = act[position]
            if maps.ndim != 3:
                assert layer.canvas is None
                continue
            grids += 1
            factor = downsample_factor(*maps.shape, settings.max_grid_side)
            assert layer.plan.grid.downsample == factor
            strided = maps[::factor, ::factor]
            want, grid = tile_indices(normalize_maps(strided, mode, options.percentile))
            have = layer.canvas
            assert have.dtype == np.uint8 and have.shape == want.shape
            assert (grid.rows, grid.cols) == (layer.plan.grid.rows, layer.plan.grid.cols)
            separators = want == SEPARATOR
            np.testing.assert_array_equal(have[separators], want[separators])
            diff = np.abs(have.astype(np.int16) - want.astype(np.int16))
            assert diff.max(initial=0) <= 1, f"{name} layer {index} {mode}: off by {diff.max()}"
            # Off by one is float32 rounding at a level's edge: rare, not systematic.
            assert (diff == 0).mean() >= 0.99, f"{name} layer {index} {mode}: {diff.mean()}"
            # Where the host tiled the default grid, the same loop made its PNG rows.
            fused = on_host and factor == 1 and mode in ("channel", "layer")
            assert (layer.rows is not None) == fused
            if fused:
                np.testing.assert_array_equal(layer.rows, palette_rows(have))
            # A channel's tile, cut from the canvas, is that channel's indices.
            last = maps.shape[-1] - 1
            tile = channel_tile(have, layer.plan.grid, last)
            assert tile.shape == strided.shape[:2]
    assert grids > 0 or name == "wide_dense"


def test_only_uint8_grids_and_statistics_cross_unless_a_job_asks(loaded_models) -> None:
    loaded = loaded_models("residual")
    extractor = loaded.extractor(None)
    batch = pixels_for(loaded, count=3)
    settings = Settings()
    plain = extractor.reduce(batch, RenderKey.of(JobOptions(), settings), on_host=False)
    floats_bytes = sum(a.nbytes for a in extractor(batch))
    assert plain.activation_bytes == floats_bytes
    expected = 0
    for index in range(len(plain)):
        layer = plain.layer(index, 0)
        assert layer.half is None and layer.mean_map is None
        channels = layer.moments.shape[-1]
        expected += 16 * channels + 4 * channels  # moments (4 x float32) + zero counts
        if layer.canvas is not None:
            assert layer.canvas.dtype == np.uint8
            expected += layer.canvas.nbytes
        if layer.values is not None:
            expected += layer.values.nbytes
    assert plain.d2h_bytes == 3 * expected
    assert plain.d2h_bytes < floats_bytes / 3  # bytes, not floats
    full = extractor.reduce(
        batch, RenderKey.of(JobOptions(save_npz=True, overlay=True), settings), on_host=False
    )
    half = full.layer(0, 1).half
    assert half is not None and half.dtype == np.float16
    np.testing.assert_allclose(half, extractor(batch)[0][1], rtol=1e-3, atol=1e-3)
    assert full.layer(0, 1).mean_map is not None or full.layer(0, 1).canvas is None
    full.release(0)
    with pytest.raises(RuntimeError, match="released"):
        full.layer(0, 0)


@pytest.mark.parametrize(("pad", "runs"), [(True, [4]), (False, [2, 1])])
def test_a_pass_of_three_runs_on_powers_of_two_and_returns_three(
    loaded_models,  # noqa: ANN001
    pad: bool,
    runs: list[int],
) -> None:
    """Padded to 4 (an accelerator) or split into 2 + 1 (a CPU): the same three results."""
    from worker.engine.compiled import run_sized
    from worker.engine.extract import ReducedPass

    loaded = loaded_models("sequential_h5")
    extractor = loaded.extractor(None)
    batch = pixels_for(loaded, count=3)
    key = RenderKey.of(JobOptions(), Settings())
    program, seen = extractor.program(key), []

    def spy(pixels: np.ndarray):  # noqa: ANN202
        seen.append(int(pixels.shape[0]))
        return program(pixels)

    plans = extractor.reduce(batch[:1], key).plans
    three = ReducedPass(run_sized(spy, (batch,), (0.0,), pad=pad), plans, 3)
    assert seen == runs
    for index in range(len(three)):
        for image in range(3):
            a = three.layer(index, image)
            b = extractor.reduce(batch[image : image + 1], key, on_host=False).layer(index, 0)
            np.testing.assert_allclose(a.moments, b.moments, rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(a.zeros, b.zeros)
            if a.canvas is not None:
                assert np.abs(a.canvas.astype(int) - b.canvas.astype(int)).max() <= 1
    assert extractor.reduce(batch, key).count == 3


@pytest.mark.parametrize("name", ["sequential_h5", "fully_conv"])
def test_the_hosts_program_is_traced_once_and_runs_every_pass_whole(
    loaded_models,  # noqa: ANN001
    name: str,
) -> None:
    """On TensorFlow, the program whose float32 outputs the host reduces leaves the batch
    dimension to the pass: passes of 1, 3, 5 and 7 images make one trace where the
    power-of-two programs make three (1, 2, 4), each pass runs as one piece, and each
    image's outputs are those of a pass of its own. A model of any input size is traced
    once per image shape."""
    import keras

    from worker.engine.compiled import compile_program, run_sized, takes_any_batch

    if keras.backend.backend() != "tensorflow":
        pytest.skip("one trace for every pass size is TensorFlow's (input_signature)")
    loaded = loaded_models(name)
    extractor = loaded.extractor(None)
    assert takes_any_batch(extractor.program(None))
    batch = pixels_for(loaded, count=7)
    traces = {True: 0, False: 0}

    def counted(any_batch: bool):  # noqa: ANN202
        def tail(outputs: list) -> list:
            traces[any_batch] += 1  # Python runs only while TensorFlow traces
            return [keras.ops.cast(x, "float32") for x in outputs]

        return compile_program(extractor.model, tail, any_batch=any_batch)

    whole, split = counted(True), counted(False)
    singles = [run_sized(whole, (batch[i : i + 1],), (0.0,)) for i in range(7)]
    for count in (1, 3, 5, 7):
        pieces = run_sized(whole, (batch[:count],), (0.0,), pad=False, join=False)
        assert len(pieces) == 1
        for layer, outputs in enumerate(pieces[0]):
            assert outputs.shape[0] == count
            for image in range(count):
                np.testing.assert_allclose(
                    outputs[image], singles[image][layer][0], rtol=1e-5, atol=1e-5
                )
        run_sized(split, (batch[:count],), (0.0,), pad=False)
    assert traces == {True: 1, False: 3}
    if loaded.input_shape[0] is None:  # another image size: a trace of its own
        run_sized(whole, (pixels_for(loaded, count=2, side=64),), (0.0,))
        assert traces[True] == 2


@pytest.mark.parametrize("name", ["residual", "fully_conv", "wide_dense", "gray"])
def test_the_host_reduces_what_a_job_asks_besides_as_the_device_does(
    loaded_models,  # noqa: ANN001
    name: str,
) -> None:
    """Overlay means, float16 activations, strips and census peaks: the same from both paths;
    on the host path the program returns the float32 outputs and nothing else."""
    loaded = loaded_models(name)
    extractor = loaded.extractor(None)
    batch = pixels_for(loaded, count=3)
    options = JobOptions(save_npz=True, overlay=True, census=True)
    key = RenderKey.of(options, Settings())
    device = extractor.reduce(batch, key, on_host=False)
    host = extractor.reduce(batch, key, on_host=True)
    floats = extractor(batch)
    assert host.d2h_bytes == host.activation_bytes == sum(a.nbytes for a in floats)
    for index, act in enumerate(floats):
        for position in range(3):
            want, have = device.layer(index, position), host.layer(index, position)
            assert have.plan == want.plan
            for field in ("canvas", "values", "mean_map", "half", "peaks"):
                a, b = getattr(have, field), getattr(want, field)
                assert (a is None) == (b is None), f"{name} layer {index}: {field}"
                if a is None:
                    continue
                assert a.shape == b.shape and a.dtype == b.dtype, f"{name} {index} {field}"
                if field == "peaks":  # the first position of each channel's maximum
                    flat = act[position].reshape(-1, act.shape[-1])
                    np.testing.assert_array_equal(a, np.argmax(flat, axis=0))
                elif field == "canvas":
                    assert np.abs(a.astype(int) - b.astype(int)).max(initial=0) <= 1
                else:
                    np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5)
            assert have.peaks is not None


@pytest.mark.parametrize("deflate", ["isal", "zlib"])
def test_grid_pngs_decode_to_the_canvas_and_its_palette(
    deflate: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PNG writer gives files any reader decodes to the same indices, with ISA-L's
    deflate (the worker extra installs python-isal) and with zlib's, where it is not."""
    import io

    from PIL import Image

    from worker.engine import render

    assert render._igzip is not None
    if deflate == "zlib":
        monkeypatch.setattr(render, "_igzip", None)
    rng = np.random.default_rng(5)
    for shape in [(1, 1), (3, 700), (257, 31)]:
        indices = rng.integers(0, 256, shape).astype(np.uint8)
        lut = render.colormap_lut("magma")
        with Image.open(io.BytesIO(render.encode_palette_png(indices, lut))) as image:
            image.load()
            assert image.mode == "P" and image.size == shape[::-1]
            np.testing.assert_array_equal(np.asarray(image), indices)
            assert bytes(image.getpalette()[:768]) == lut.tobytes()


def test_gray_and_rgb_pngs_decode_to_their_pixels() -> None:
    """The up-filtered gray and RGB PNGs (input images, overlays) decode exactly."""
    import io

    from PIL import Image

    from worker.engine import render

    rng = np.random.default_rng(6)
    for shape, mode in [
        ((1, 1), "L"),
        ((5, 9, 1), "L"),
        ((64, 48, 3), "RGB"),
        ((1, 700, 3), "RGB"),
    ]:
        pixels = rng.integers(0, 256, shape).astype(np.uint8)
        with Image.open(io.BytesIO(render.encode_png(pixels))) as image:
            image.load()
            assert image.mode == mode and image.size == (shape[1], shape[0])
            np.testing.assert_array_equal(np.asarray(image).reshape(pixels.shape), pixels)
    strided = rng.integers(0, 256, (40, 60, 3)).astype(np.uint8)[::2, ::3]  # not contiguous
    with Image.open(io.BytesIO(render.encode_png(strided))) as image:
        np.testing.assert_array_equal(np.asarray(image), strided)
    with pytest.raises(ValueError):
        render.encode_png(np.zeros((4, 4, 3), dtype=np.float32))


def test_a_warmup_compiles_every_pass_size_a_batch_can_take(loaded_models) -> None:  # noqa: ANN001
    """Passes run on powers of two; warming those sizes leaves no compile to the
    first jobs of a worker on an accelerator (worker/runtime/process.py)."""
    from worker.engine import pass_sizes, warmup

    assert pass_sizes(1, pad=True) == [1]
    assert pass_sizes(8, pad=True) == [1, 2, 4, 8]
    assert pass_sizes(12, pad=True) == [1, 2, 4, 8, 16]  # 9 to 12 images are padded to 16
    assert pass_sizes(12, pad=False) == [1, 2, 4, 8]  # a CPU runs 12 as 8 + 4
    assert pass_sizes(7, pad=False) == [1, 2, 4]
    loaded = loaded_models("sequential_h5")
    extractor = loaded.extractor(None)
    seen: list[int] = []
    reduce = extractor.reduce

    def spy(batch: np.ndarray, key: RenderKey):  # noqa: ANN202
        seen.append(batch.shape[0])
        return reduce(batch, key)

    extractor.reduce = spy
    try:
        warmup(loaded, sizes=pass_sizes(4))
    finally:
        del extractor.reduce
    assert seen == [1, 2, 4]


def test_an_output_with_no_position_has_no_statistics_on_the_host() -> None:
    """As the device's mean of nothing: NaN rows, no zeros counted, no grid or strip."""
    from worker.engine.host_reduce import reduce_image
    from worker.engine.reduce import LayerPlan

    empty = np.zeros((0, 4), np.float32)
    plan = LayerPlan.of(empty.shape, 512)
    out = reduce_image(empty, plan, RenderKey.of(JobOptions(), Settings()))
    assert out["moments"].shape == (4, 4) and np.isnan(out["moments"]).all()
    np.testing.assert_array_equal(out["zeros"], [0, 0, 0, 0])
    assert plan.grid is None and not plan.strip and "canvas" not in out and "values" not in out


@pytest.mark.parametrize("normalize", ["channel", "meanstd"])
def test_a_nan_in_a_channel_makes_its_statistics_nan_on_the_host_as_in_numpy(
    normalize: str,
) -> None:
    """numpy's min and max propagate NaN, and so do the host's loops: a channel holding a
    NaN has NaN statistics and renders flat, and the other channels are untouched."""
    from worker.engine.host_reduce import reduce_image
    from worker.engine.reduce import LayerPlan

    rng = np.random.default_rng(11)
    x = rng.standard_normal((9, 7, 3)).astype(np.float32)
    x[4, 2, 1] = np.nan
    key = RenderKey.of(JobOptions(normalize=normalize), Settings())
    plan = LayerPlan.of(x.shape, 512)
    out = reduce_image(x, plan, key)
    mean, std, low, high = out["moments"]
    assert np.isnan([mean[1], std[1], low[1], high[1]]).all()
    flat = x.reshape(-1, 3)
    for c in (0, 2):
        np.testing.assert_allclose(low[c], flat[:, c].min())
        np.testing.assert_allclose(high[c], flat[:, c].max())
        np.testing.assert_allclose(mean[c], flat[:, c].mean(), rtol=1e-6)
    with np.errstate(invalid="ignore"):  # the NaN channel's cast to uint8
        reference = normalize_maps(x, normalize)
    tiles = [channel_tile(out["canvas"], plan.grid, c) for c in range(3)]
    for c in (0, 2):
        assert np.abs(tiles[c].astype(int) - reference[:, :, c]).max() <= 1
    assert len(np.unique(tiles[1])) == 1


def test_the_hosts_one_pass_statistics_hold_far_from_zero_and_with_infinities() -> None:
    """The host's moments come from one pass over values less each channel's first
    (host_kernels.py `moments`): the std of values far from 0 stays within 1e-6 of
    float64 numpy's, a constant channel's is exactly 0, and a channel holding an
    infinity has numpy's statistics: an infinite mean, a NaN std, its true min and max."""
    from worker.engine.host_reduce import reduce_image
    from worker.engine.reduce import LayerPlan

    rng = np.random.default_rng(5)
    x = (1e4 + rng.standard_normal((20, 30, 4))).astype(np.float32)
    x[..., 1] = 3.25  # constant: a dead channel
    x[5, 6, 2] = np.inf
    x[..., 3] = rng.standard_normal((20, 30)).astype(np.float32) * 1e-3 - 7e3
    out = reduce_image(x, LayerPlan.of(x.shape, 512), RenderKey.of(JobOptions(), Settings()))
    mean, std, low, high = out["moments"]
    flat = x.reshape(-1, 4).astype(np.float64)
    for c in (0, 3):
        np.testing.assert_allclose(mean[c], flat[:, c].mean(), rtol=1e-7)
        np.testing.assert_allclose(std[c], flat[:, c].std(), rtol=1e-6)
        assert (low[c], high[c]) == (flat[:, c].min(), flat[:, c].max())
    assert (mean[1], std[1], low[1], high[1]) == (3.25, 0.0, 3.25, 3.25)
    assert mean[2] == np.inf and np.isnan(std[2]) and high[2] == np.inf
    assert low[2] == flat[:, 2].min()
