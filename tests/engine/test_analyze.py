"""analyze(): activations, grids and stats checked against independent computations.

The reference for every activation is plain Keras on a separately loaded copy
of the model (`keras.Model(inputs, [layer.output ...])`); the reference for
every grid pixel and every statistic is numpy on those reference activations.
"""

from __future__ import annotations

import io
import json

import keras
import models
import numpy as np
import pytest
from PIL import Image
from sample_images import image_bytes

from producer.contract import MANIFEST_VERSION, ErrorCode, JobOptions
from producer.errors import InvalidImage, InvalidJob, UnknownLayer
from producer.settings import Settings
from worker.engine import Artifacts, analyze, extract, manifest_bytes, open_model, preprocess
from worker.engine import warmup as warm
from worker.engine.cam_pass import analyze_cam
from worker.report import render_report

LEVELS = 255
ATOL = 1e-5
to_numpy = keras.ops.convert_to_numpy  # any backend, any device


# ---- independent references ----------------------------------------------------


def reference_activations(path, names: list[str], x: np.ndarray) -> list[np.ndarray]:
    """Plain Keras on a fresh copy: one multi-output model over top-level layers. A model
    that takes (batch, H, W) is fed `x` without its axis of one channel, as its author
    would; a channels-first one is run as its channels-last twin, with its weights
    (TensorFlow's own CPU kernels take NHWC only)."""
    model = keras.saving.load_model(path, compile=False)
    if any(getattr(layer, "data_format", "") == "channels_first" for layer in model.layers):
        model = models.channels_last_twin(model)
    if len(model.inputs[0].shape) == 3:
        x = x[..., 0]
    probe = keras.Model(model.inputs[0], [model.get_layer(n).output for n in names])
    out = probe(x, training=False)
    return [to_numpy(o) for o in (out if isinstance(out, (list, tuple)) else [out])]


def expected_indices(act: np.ndarray, mode: str = "channel", percentile: float = 99.0):
    """(H, W, C) -> palette indices 0..254, computed per the documented formulas."""
    x = act.astype(np.float64)
    if mode == "meanstd":
        mean, std = x.mean(axis=(0, 1)), x.std(axis=(0, 1))
        with np.errstate(invalid="ignore", divide="ignore"):
            v = np.where(std > 0, (x - mean) / std * 64 + 128, 128.0)
        v = np.clip(v, 0, 255) * (LEVELS - 1) / 255.0
    else:
        if mode == "channel":
            low, high = x.min(axis=(0, 1)), x.max(axis=(0, 1))
        elif mode == "layer":
            low, high = x.min(), x.max()
        else:
            low = np.percentile(x, 100 - percentile, axis=(0, 1))
            high = np.percentile(x, percentile, axis=(0, 1))
        span = np.asarray(high - low)
        with np.errstate(invalid="ignore", divide="ignore"):
            v = np.where(span > 0, (x - low) / span * (LEVELS - 1), 0.0)
    return np.clip(np.floor(v + 0.5), 0, LEVELS - 1).astype(np.int64)


def grid_tiles(png: bytes, grid: dict) -> np.ndarray:
    """Cut a grid PNG back into (h, w, C) palette indices using the manifest geometry."""
    image = Image.open(io.BytesIO(png))
    assert image.mode == "P"
    pixels = np.asarray(image)
    assert pixels.shape == (grid["height"], grid["width"])
    step_h, step_w = grid["tile_h"] + grid["separator"], grid["tile_w"] + grid["separator"]
    tiles = []
    for c in range(grid["channels"]):
        r, k = divmod(c, grid["cols"])
        tiles.append(
            pixels[r * step_h : r * step_h + grid["tile_h"], k * step_w :][:, : grid["tile_w"]]
        )
    return np.stack(tiles, axis=-1).astype(np.int64)


def assert_grid_matches(png: bytes, grid: dict, act: np.ndarray, mode: str = "channel", **kw):
    tiles = grid_tiles(png, grid)
    expected = expected_indices(act, mode, **kw)
    assert tiles.shape == expected.shape
    # Activations agree to 1e-5; a value on a rounding edge may land one level off.
    assert np.abs(tiles - expected).max() <= 1
    assert (tiles == expected).mean() > 0.99


def assert_stats_match(layer: dict, act: np.ndarray, top_k: int = 8):
    x = act.astype(np.float64).reshape(-1, act.shape[-1])
    stats, summary = layer["stats"], layer["summary"]
    tol = {"rtol": 1e-4, "atol": 1e-5}
    np.testing.assert_allclose(stats["mean"], x.mean(axis=0), **tol)
    np.testing.assert_allclose(stats["std"], x.std(axis=0), **tol)
    np.testing.assert_allclose(stats["min"], x.min(axis=0), **tol)
    np.testing.assert_allclose(stats["max"], x.max(axis=0), **tol)
    np.testing.assert_allclose(stats["sparsity"], (x == 0).mean(axis=0), **tol)
    constant = (x.max(axis=0) == x.min(axis=0)) if x.shape[0] > 1 else (x[0] == 0)
    assert stats["dead"] == list(np.flatnonzero(constant))
    np.testing.assert_allclose(summary["mean"], x.mean(), **tol)
    np.testing.assert_allclose(summary["std"], x.std(), **tol)
    np.testing.assert_allclose([summary["min"], summary["max"]], [x.min(), x.max()], **tol)
    np.testing.assert_allclose(summary["sparsity"], (x == 0).mean(), **tol)
    assert summary["dead_count"] == int(constant.sum())
    means = np.asarray(stats["mean"])
    assert summary["top_k"] == list(np.argsort(-means, kind="stable")[:top_k])


def check_against_reference(loaded, path, data: bytes, options: JobOptions, settings):
    """Run analyze on one image and check every layer against the references."""
    (result,) = analyze(loaded, [data], options, settings)
    assert isinstance(result, Artifacts)
    prepared = preprocess(data, loaded.input_shape, options, settings, loaded.auto_scale)
    refs = loaded.select(options.layers)
    batch = prepared.pixels[None]
    engine_acts = extract(loaded, batch, refs)
    reference = reference_activations(path, [r.name for r in refs], batch)
    layers = result.manifest["layers"]
    assert [entry["name"] for entry in layers] == [r.name for r in refs]
    for entry, mine, theirs in zip(layers, engine_acts, reference, strict=True):
        np.testing.assert_allclose(mine, theirs, atol=ATOL, rtol=0)
        act = theirs[0]
        assert entry["output_shape"] == list(act.shape)
        if act.ndim == 3:
            assert_grid_matches(result.files[entry["grid"]["png"]], entry["grid"], act)
        assert_stats_match(entry, act, options.top_k)
    return result


# ---- every model kind against the reference ------------------------------------


@pytest.mark.parametrize(
    "name, layers",
    [
        ("sequential_h5", None),
        ("sequential_h5", "conv2d_1,max_pooling2d_1,flatten,dense,head"),
        ("residual", None),
        ("residual", "block1_sep,block1_bn,block1_add,gap,logits"),
        ("gray", ":4"),
        ("gray_hw", ":"),
        ("channels_first", ":"),
    ],
)
def test_activations_grids_and_stats_equal_the_keras_reference(
    model_files, loaded_models, settings, name, layers
):
    data = image_bytes(45, 37, fmt="JPEG", seed=11)
    options = JobOptions(layers=layers, top_k=3)
    result = check_against_reference(
        loaded_models(name), model_files[name], data, options, settings
    )
    assert result.manifest["version"] == MANIFEST_VERSION


def test_keras2_h5_model_matches_the_reference(keras2_files, settings):
    path = keras2_files["keras2_cnn.h5"]
    loaded = open_model(path)
    check_against_reference(loaded, path, image_bytes(seed=12), JobOptions(layers=":5"), settings)


def test_a_model_that_takes_uint8_pixels_is_fed_them_and_refuses_a_scale_it_would_truncate(
    model_files, loaded_models, settings
):
    """Scaled by 1/255, every pixel would reach its uint8 input as 0 or 1: asked for,
    a typed error, not activations of a black image. By default (scale 'auto') its own
    Rescaling sees 0..255."""
    loaded = loaded_models("uint8_input")
    assert loaded.auto_scale.scale == "none" and "its input is uint8" in loaded.auto_scale.why
    data = image_bytes(40, 30, seed=14)
    for kind in (analyze, analyze_cam):
        with pytest.raises(InvalidJob) as err:
            kind(loaded, [data], JobOptions(scale="1/255"), settings)
        assert err.value.code == ErrorCode.INVALID_JOB
        assert "scale='none'" in err.value.message and "uint8" in err.value.message
    for options in (JobOptions(), JobOptions(scale="none")):
        result = check_against_reference(
            loaded, model_files["uint8_input"], data, options, settings
        )
        assert result.manifest["preprocessing"]["scale"] == "none"
        rescaled = result.manifest["layers"][0]
        assert rescaled["name"] == "rescale" and rescaled["summary"]["min"] >= 0.0
        assert 0.5 < rescaled["summary"]["max"] <= 1.0  # pixels / 255, as its author meant
        (cam,) = analyze_cam(loaded, [data], options, settings)
        assert isinstance(cam, Artifacts)
    warm(loaded, JobOptions())  # a preloaded model warms whatever the jobs' scale


def test_a_model_that_rescales_its_own_input_is_fed_pixels_unless_the_job_says_otherwise(
    model_files, loaded_models, settings
):
    """The tutorials' `Rescaling(1. / 255)` in front of the first convolution: fed
    x / 255 as well, its first layers would see values 255 times too small, and every
    activation would be wrong without an error. By default it is fed the pixels; a
    scale the job names is applied, and the manifest notes what the model takes."""
    loaded = loaded_models("rescaling")
    data = image_bytes(40, 30, seed=15)
    result = check_against_reference(
        loaded, model_files["rescaling"], data, JobOptions(layers="rescale,conv"), settings
    )
    pre = result.manifest["preprocessing"]
    assert (pre["scale"], pre["formula"]) == ("none", "x")
    assert "'rescale' (Rescaling) multiplies its input by 0.003922" in pre["scale_auto"]
    rescaled = next(e for e in result.manifest["layers"] if e["name"] == "rescale")
    assert 0.5 < rescaled["summary"]["max"] <= 1.0  # pixels / 255, as its author meant
    page = render_report(result.manifest)["index.html"].decode()
    assert "takes pixel values 0..255" in page and "multiplies its input by 0.003922" in page
    (asked,) = analyze(loaded, [data], JobOptions(layers="rescale,conv", scale="1/255"), settings)
    pre = asked.manifest["preprocessing"]
    assert pre["scale"] == "1/255" and "scale_auto" not in pre
    assert "takes pixel values 0..255" in pre["scale_note"]
    rescaled = next(e for e in asked.manifest["layers"] if e["name"] == "rescale")
    assert rescaled["summary"]["max"] <= 1.0 / 255
    (plain,) = analyze(loaded_models("softmax"), [data], JobOptions(), settings)
    pre = plain.manifest["preprocessing"]
    assert pre["scale"] == "1/255" and "nothing in front" in pre["scale_auto"]
    assert "scale_note" not in pre


def test_gray_model_fed_an_rgb_image_sees_its_luma(loaded_models, settings):
    data = image_bytes(32, 32, seed=13)
    (result,) = analyze(loaded_models("gray"), [data], JobOptions(), settings)
    seen = np.asarray(Image.open(io.BytesIO(result.files["input.png"])))
    expected = np.asarray(Image.open(io.BytesIO(data)).convert("L"))
    np.testing.assert_array_equal(seen, expected)
    assert result.manifest["preprocessing"]["color"] == "RGB->L"


def test_nested_model_inner_layers_match_a_stepwise_reference(model_files, loaded_models, settings):
    loaded = loaded_models("nested")
    data = image_bytes(32, 32, seed=14)
    options = JobOptions(layers="stem,features/inner_conv_a,features/inner_conv_b,features,gap")
    (result,) = analyze(loaded, [data], options, settings)
    x = preprocess(data, loaded.input_shape, options, settings).pixels[None]

    model = keras.saving.load_model(model_files["nested"], compile=False)
    stem = to_numpy(keras.Model(model.inputs[0], model.get_layer("stem").output)(x))
    inner = model.get_layer("features")
    inner_probe = keras.Model(
        inner.inputs[0],
        [inner.get_layer("inner_conv_a").output, inner.get_layer("inner_conv_b").output],
    )
    conv_a, conv_b = (to_numpy(t) for t in inner_probe(stem))
    gap = to_numpy(keras.Model(model.inputs[0], model.get_layer("gap").output)(x))
    reference = [stem, conv_a, conv_b, conv_b, gap]

    refs = loaded.select(options.layers)
    for entry, mine, theirs in zip(
        result.manifest["layers"], extract(loaded, x, refs), reference, strict=True
    ):
        np.testing.assert_allclose(mine, theirs, atol=ATOL, rtol=0)
        if theirs.ndim == 4:
            assert_grid_matches(result.files[entry["grid"]["png"]], entry["grid"], theirs[0])
        assert_stats_match(entry, theirs[0])
    assert [e["name"] for e in result.manifest["layers"]][1] == "features/inner_conv_a"


def test_fully_convolutional_model_groups_images_by_shape(model_files, loaded_models, settings):
    loaded = loaded_models("fully_conv")
    images = [image_bytes(30, 20, seed=1), image_bytes(18, 26, seed=2), image_bytes(30, 20, seed=3)]
    results = analyze(loaded, images, JobOptions(), settings)
    assert [r.manifest["batch"]["size"] for r in results] == [2, 1, 2]
    assert [r.manifest["batch"]["position"] for r in results] == [0, 0, 1]
    for data, result in zip(images, results, strict=True):
        x = preprocess(data, loaded.input_shape, JobOptions(), settings).pixels[None]
        (conv1, conv2) = reference_activations(
            model_files["fully_conv"], ["fc_conv1", "fc_conv2"], x
        )
        layers = result.manifest["layers"]
        assert layers[0]["output_shape"] == list(conv1.shape[1:])
        assert layers[1]["output_shape"] == list(conv2.shape[1:])
        assert_grid_matches(result.files[layers[0]["grid"]["png"]], layers[0]["grid"], conv1[0])
        assert_stats_match(layers[1], conv2[0])


# ---- rendering details -------------------------------------------------------------


def test_dead_channel_renders_flat_and_is_flagged(loaded_models, settings):
    (result,) = analyze(
        loaded_models("sequential_h5"), [image_bytes(seed=5)], JobOptions(), settings
    )
    layer = result.manifest["layers"][0]
    assert layer["name"] == "conv2d_1"
    assert 1 in layer["stats"]["dead"] and layer["summary"]["dead_count"] >= 1
    tiles = grid_tiles(result.files[layer["grid"]["png"]], layer["grid"])
    assert (tiles[:, :, 1] == 0).all()
    assert layer["stats"]["std"][1] == 0.0 and layer["stats"]["sparsity"][1] == 1.0


@pytest.mark.parametrize(
    "mode, extra", [("layer", {}), ("meanstd", {}), ("percentile", {"percentile": 90.0})]
)
def test_normalization_modes_follow_their_formulas(
    model_files, loaded_models, settings, mode, extra
):
    loaded = loaded_models("residual")
    data = image_bytes(seed=6)
    options = JobOptions(layers="stem", normalize=mode, **extra)
    (result,) = analyze(loaded, [data], options, settings)
    x = preprocess(data, loaded.input_shape, options, settings).pixels[None]
    (act,) = reference_activations(model_files["residual"], ["stem"], x)
    layer = result.manifest["layers"][0]
    assert_grid_matches(result.files[layer["grid"]["png"]], layer["grid"], act[0], mode, **extra)
    assert result.manifest["normalization"]["mode"] == mode


def test_grid_geometry_holds_every_channel_near_square(loaded_models, settings):
    (result,) = analyze(loaded_models("wide"), [image_bytes(seed=7)], JobOptions(), settings)
    grid = result.manifest["layers"][0]["grid"]
    assert (grid["rows"], grid["cols"], grid["channels"]) == (6, 7, 40)
    assert (grid["tile_h"], grid["tile_w"], grid["separator"]) == (64, 64, 1)
    assert (grid["height"], grid["width"]) == (6 * 64 + 5, 7 * 64 + 6)
    image = Image.open(io.BytesIO(result.files[grid["png"]]))
    assert image.size == (grid["width"], grid["height"])
    # Separator lines and the two unused tiles use the separator index.
    pixels = np.asarray(image)
    assert (pixels[64, :] == 255).all() and (pixels[:, 64] == 255).all()
    assert (pixels[-64:, -2 * 65 + 1 :] == 255).all()


def test_large_maps_are_downsampled_to_fit_max_grid_side(model_files, loaded_models):
    settings = Settings(max_grid_side=200)
    loaded = loaded_models("wide")
    data = image_bytes(seed=8)
    (result,) = analyze(loaded, [data], JobOptions(), settings)
    grid = result.manifest["layers"][0]["grid"]
    assert max(grid["height"], grid["width"]) <= 200
    assert grid["downsample"] == 3 and grid["tile_h"] == 22
    x = preprocess(data, loaded.input_shape, JobOptions(), settings).pixels[None]
    (act,) = reference_activations(model_files["wide"], ["wide_conv"], x)
    assert_grid_matches(result.files[grid["png"]], grid, act[0, ::3, ::3])


def test_non_spatial_layers_get_stats_and_a_strip_when_small(loaded_models, settings):
    options = JobOptions(layers="flatten,dense")
    (result,) = analyze(loaded_models("sequential_h5"), [image_bytes(seed=9)], options, settings)
    flatten, dense = result.manifest["layers"]
    assert flatten["spatial"] is False and flatten["output_shape"] == [216]
    assert flatten["grid"]["rows"] == 1 and flatten["grid"]["cols"] == 216
    strip = Image.open(io.BytesIO(result.files[flatten["grid"]["png"]]))
    assert strip.size == (216 * flatten["grid"]["tile_w"], flatten["grid"]["tile_h"])
    assert len(dense["stats"]["mean"]) == 5


def test_non_spatial_layer_over_4096_values_gets_stats_only(loaded_models, settings):
    options = JobOptions(layers="flat,wide_dense")
    (result,) = analyze(loaded_models("wide_dense"), [image_bytes(seed=3)], options, settings)
    flat, dense = result.manifest["layers"]
    assert flat["grid"] is not None  # 72 values: a strip
    assert dense["grid"] is None and dense["output_shape"] == [4100]
    assert len(dense["stats"]["mean"]) == 4100
    assert not any(key.endswith("-wide_dense.png") for key in result.files)


def test_optional_channel_pngs_npz_and_overlay(model_files, loaded_models, settings):
    loaded = loaded_models("sequential_h5")
    data = image_bytes(seed=10)
    options = JobOptions(layers="conv2d_1,dense", channel_pngs=True, save_npz=True, overlay=True)
    (result,) = analyze(loaded, [data], options, settings)
    conv = result.manifest["layers"][0]
    channel_files = sorted(k for k in result.files if k.startswith("channels/00-conv2d_1/"))
    assert channel_files == [f"channels/00-conv2d_1/{c:03d}.png" for c in range(4)]
    assert conv["overlay"] == "overlays/00-conv2d_1.png"
    overlay = Image.open(io.BytesIO(result.files[conv["overlay"]]))
    assert overlay.size == (32, 32) and overlay.mode == "RGB"
    assert "overlay" not in result.manifest["layers"][1]

    x = preprocess(data, loaded.input_shape, options, settings).pixels[None]
    reference = reference_activations(model_files["sequential_h5"], ["conv2d_1", "dense"], x)
    saved = np.load(io.BytesIO(result.files["activations.npz"]))
    assert sorted(saved.files) == ["00-conv2d_1", "05-dense"]
    for key, ref in zip(["00-conv2d_1", "05-dense"], reference, strict=True):
        assert saved[key].dtype == np.float16
        np.testing.assert_allclose(saved[key], ref[0], rtol=2e-3, atol=2e-3)
    one = np.asarray(Image.open(io.BytesIO(result.files[channel_files[2]]))).astype(np.int64)
    np.testing.assert_array_equal(
        one, grid_tiles(result.files[conv["grid"]["png"]], conv["grid"])[:, :, 2]
    )


# ---- manifest, batching, errors ---------------------------------------------------


def test_manifest_is_complete_and_json_safe(loaded_models, settings):
    loaded = loaded_models("sequential_h5")
    (result,) = analyze(loaded, [image_bytes(50, 40, fmt="JPEG")], JobOptions(), settings)
    manifest = json.loads(manifest_bytes(result.manifest))
    assert manifest["job_id"] is None and manifest["image"]["uri"] is None
    assert manifest["model"]["sha256"] == loaded.sha256
    assert manifest["model"]["input_shape"] == [32, 32, 3]
    assert manifest["image"]["original_size"] == [40, 50]
    assert manifest["input"] == "input.png" and "input.png" in result.files
    assert manifest["preprocessing"]["size"] == [32, 32]
    assert manifest["colormap"] == "viridis"
    assert set(manifest["timings_ms"]) >= {"preprocess", "forward", "render", "stats"}
    assert manifest["timings_ms"]["render_wall"] > 0  # the pass's end to the last layer
    assert manifest["files"] == sorted(result.files)
    for layer in manifest["layers"]:
        assert layer["grid"]["png"] in result.files


def test_a_bad_image_fails_only_its_own_slot(loaded_models, settings):
    good = image_bytes(seed=1)
    truncated = image_bytes(64, 64, fmt="JPEG")[:300]
    results = analyze(
        loaded_models("sequential_h5"), [good, truncated, good], JobOptions(), settings
    )
    assert isinstance(results[0], Artifacts) and isinstance(results[2], Artifacts)
    assert isinstance(results[1], InvalidImage)
    assert results[0].manifest["batch"]["size"] == 2


def test_unknown_layer_and_bad_options_fail_the_whole_call(loaded_models, settings):
    loaded = loaded_models("sequential_h5")
    with pytest.raises(UnknownLayer, match="nearest"):
        analyze(loaded, [image_bytes()], JobOptions(layers="conv2d_7"), settings)
    with pytest.raises(InvalidJob, match="colormap"):
        analyze(loaded, [image_bytes()], JobOptions(colormap="no_such_map"), settings)
    with pytest.raises(InvalidJob, match="normalize"):
        analyze(loaded, [image_bytes()], JobOptions(normalize="zscore"), settings)


def test_any_matplotlib_colormap_name_works(loaded_models, settings):
    (result,) = analyze(
        loaded_models("residual"),
        [image_bytes()],
        JobOptions(layers="stem", colormap="magma"),
        settings,
    )
    assert result.manifest["colormap"] == "magma"
    palette = Image.open(io.BytesIO(result.files["layers/01-stem.png"])).getpalette()
    import matplotlib

    assert tuple(palette[:3]) == tuple(
        np.rint(np.asarray(matplotlib.colormaps["magma"](0.0)[:3]) * 255).astype(int)
    )


def test_extractor_is_built_once_per_layer_set(loaded_models, settings):
    loaded = loaded_models("residual")
    warm(loaded, JobOptions(layers="stem,pool"), settings)
    first = loaded.extractor("stem,pool")
    analyze(loaded, [image_bytes()], JobOptions(layers="pool, stem"), settings)
    assert loaded.extractor(["stem", "pool"]) is first
    assert loaded.extractor("stem") is not first


def test_extractor_of_a_loaded_sequential_runs_each_layer_once(model_files):
    # Deserialized Sequential models keep stale inbound nodes per layer; an
    # extractor over `layer.output` would run layers several times per call.
    loaded = open_model(model_files["sequential_h5"])
    extractor = loaded.extractor(":4")
    nodes = sum(len(n) for n in extractor.model._nodes_by_depth.values())
    assert nodes == 1 + 4  # the input plus the four selected layers


def test_shared_layer_shows_its_first_call(tmp_path, settings):
    inputs = keras.Input((16, 16, 3))
    shared = keras.layers.Conv2D(3, 3, padding="same", activation="relu", name="shared")
    outputs = keras.layers.Add(name="sum")([shared(inputs), shared(shared(inputs))])
    path = tmp_path / "shared.keras"
    keras.Model(inputs, outputs).save(path)
    loaded = open_model(path)
    data = image_bytes(16, 16, seed=4)
    x = preprocess(data, loaded.input_shape, JobOptions(), settings).pixels[None]
    (first_call, total) = reference_activations(path, ["shared", "sum"], x)
    (mine_shared, mine_sum) = extract(loaded, x, loaded.select("shared,sum"))
    np.testing.assert_allclose(mine_shared, first_call, atol=ATOL, rtol=0)
    np.testing.assert_allclose(mine_sum, total, atol=ATOL, rtol=0)


def test_image_whose_activations_exceed_the_bound_fails_before_its_forward_pass(png, tmp_path):
    """A fixed input far above ACTVIZ_MAX_SIDE: the image is upscaled, its activations bounded."""
    from producer.contract import ErrorCode
    from producer.errors import ActivationsTooLarge

    model = keras.Sequential([keras.Input((1500, 1500, 3)), keras.layers.Conv2D(8, 3, name="c")])
    model.save(tmp_path / "huge_input.keras")
    loaded = open_model(tmp_path / "huge_input.keras")
    small = Settings(max_image_activation_mb=64)
    (outcome,) = analyze(loaded, [png], JobOptions(), small)
    assert isinstance(outcome, ActivationsTooLarge)
    assert outcome.code == ErrorCode.ACTIVATIONS_TOO_LARGE
    assert "1500x1500" in outcome.message and "ACTVIZ_MAX_IMAGE_ACTIVATION_MB" in outcome.message
    # 1500 x 1500 x 3 + 1498 x 1498 x 8 float32 = 99 MB: under a larger bound the job runs.
    (fits,) = analyze(loaded, [png], JobOptions(), Settings(max_image_activation_mb=128))
    assert fits.manifest["layers"][0]["name"] == "c"
