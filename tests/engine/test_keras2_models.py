"""tf.keras models whose configs Keras 3 cannot build as they are (worker/engine/keras2_config.py).

Each was written by tf_keras in a subprocess (tests/models.py `_write_keras2_adapted`),
with its outputs on the same images; here it opens, and gives those outputs.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import h5py
import keras
import models
import numpy as np
import pytest
from sample_images import image_bytes

from producer.contract import ErrorCode, JobOptions
from producer.errors import InvalidModel, UnsafeModel
from worker.engine import Artifacts, analyze, extract, open_model
from worker.engine.cam_pass import analyze_cam
from worker.engine.keras2_config import OPS, adapt

to_numpy = keras.ops.convert_to_numpy  # any backend, any device
TOLERANCE = 1e-5


@pytest.mark.parametrize(
    "name, outputs, ops",
    [
        ("keras2_ops.h5", "ops", True),
        ("keras2_ops_savedmodel", "ops", True),
        ("keras2_mobilenet_v3.h5", "mobilenet_v3", True),
        ("keras2_transfer_functional.h5", "transfer_functional", True),
        ("keras2_transfer_sequential.h5", "transfer_sequential", False),
        ("keras2_channels_first.h5", "channels_first", False),
        ("keras2_caffe_preprocess.h5", "caffe_preprocess", True),
        ("keras2_torch_preprocess.h5", "torch_preprocess", True),
        # The same models as tf.keras's own .keras archives
        ("keras2_v3.keras", "ops", True),
        ("keras2_mobilenet_v3.keras", "mobilenet_v3", True),
        ("keras2_transfer_functional.keras", "transfer_functional", True),
        ("keras2_transfer_sequential.keras", "transfer_sequential", False),
        ("keras2_channels_first.keras", "channels_first", False),
        ("keras2_torch_preprocess.keras", "torch_preprocess", True),
    ],
)
def test_a_tf_keras_model_keras3_cannot_build_as_it_is_gives_tf_keras_outputs(
    keras2_files, name, outputs, ops
):
    loaded = open_model(keras2_files[name])
    x = models.keras2_input() * np.float32(1.0 if outputs in ("ops", "channels_first") else 255.0)
    if loaded.channels_first:  # its images are (N, C, H, W); its outputs, its twin's
        x = x.transpose(0, 3, 1, 2)
    expected = np.load(keras2_files["keras2_outputs.npz"])[outputs]
    (mine,) = models.run_model(loaded.model, x)
    np.testing.assert_allclose(mine, expected, atol=TOLERANCE)
    classes = {ref.class_name for ref in loaded.layers}
    assert ("TFOp" in classes) == ops and "TFOpLambda" not in classes


def test_a_config_keras3_builds_as_it_is_is_left_as_it_is(keras2_files):
    with h5py.File(keras2_files["keras2_cnn.h5"], "r") as fh:
        config = json.loads(fh.attrs["model_config"])
    assert adapt(config) is config  # and its file is opened as it is, not copied


def test_the_adapted_config_rebuilds_ops_renames_slashes_and_drops_groups(keras2_files):
    with h5py.File(keras2_files["keras2_ops.h5"], "r") as fh:
        config = json.loads(fh.attrs["model_config"])
    adapted = adapt(config)
    assert adapted is not config
    layers = {entry["name"]: entry for entry in adapted["config"]["layers"]}
    assert "block_depthwise" in layers and "block/depthwise" not in layers
    assert "groups" not in layers["block_depthwise"]["config"]
    functions = {
        entry["config"]["function"]
        for entry in layers.values()
        if entry["class_name"] == "ActvizTFOp"
    }
    assert functions == {
        "__operators__.add", "math.multiply", "math.subtract", "nn.relu6", "math.truediv",
        "concat", "math.sigmoid", "reshape", "image.resize", "compat.v1.transpose",
        "nn.leaky_relu", "expand_dims", "compat.v1.squeeze", "math.reduce_mean",
    }  # fmt: skip
    assert functions <= set(OPS)
    # The nested Sequential "stem" was node 1 of tf.keras's graph; it is node 0 of Keras 3's.
    assert layers["block_depthwise"]["inbound_nodes"] == [[["stem", 0, 0, {}]]]


def test_its_layers_are_analyzed_and_explained_like_any_models(keras2_files, settings):
    loaded = open_model(keras2_files["keras2_mobilenet_v3.h5"])
    data = image_bytes(40, 36, seed=21)
    spec = "re:.*(multiply|add|Conv_BatchNorm).*"
    (result,) = analyze(loaded, [data], JobOptions(layers=spec), settings)
    assert isinstance(result, Artifacts)
    refs = loaded.select(spec)
    assert {ref.class_name for ref in refs} >= {"TFOp", "BatchNormalization"}
    # The extractor traces the graph again: each op layer's output is Keras's own.
    x = models.keras2_input() * np.float32(255.0)
    mine = extract(loaded, x, refs)
    probe = keras.Model(loaded.model.inputs, [ref.layer.output for ref in refs])
    theirs = probe(x, training=False)
    for ref, a, b in zip(refs, mine, theirs, strict=True):
        np.testing.assert_allclose(a, to_numpy(b), atol=TOLERANCE, err_msg=ref.name)
    names = [entry["name"] for entry in result.manifest["layers"]]
    assert names == [ref.name for ref in refs]
    (cam,) = analyze_cam(loaded, [data], JobOptions(), settings)
    assert isinstance(cam, Artifacts)
    # Its head pools to 1 x 1 and ends in 1 x 1 convolutions: a larger map is explained.
    assert cam.manifest["gradcam"]["layer_shape"][:2] != [1, 1]


def test_a_tf_keras_op_not_rebuilt_is_still_refused_as_code(keras2_files):
    with pytest.raises(UnsafeModel, match="tf.math.cumsum") as err:
        open_model(keras2_files["keras2_unknown_op.h5"])
    assert err.value.code == ErrorCode.UNSAFE_MODEL
    with pytest.raises(InvalidModel) as trusted:  # Keras 3 has no layer to run it with
        open_model(keras2_files["keras2_unknown_op.h5"], trusted=True)
    assert trusted.value.code == ErrorCode.INVALID_MODEL


def test_a_tf_keras_archive_opens_as_its_h5_does(keras2_files, settings):
    """A Sequential whose first layer declares its input, as tf_keras writes it in both."""
    archive = open_model(keras2_files["keras2_cnn.keras"])
    h5 = open_model(keras2_files["keras2_cnn.h5"])
    assert [(r.name, r.class_name, r.output_shape) for r in archive.layers] == [
        (r.name, r.class_name, r.output_shape) for r in h5.layers
    ]
    x = np.random.default_rng(3).random((2, models.SIDE, models.SIDE, 3), dtype=np.float32)
    mine, theirs = models.run_model(archive.model, x), models.run_model(h5.model, x)
    np.testing.assert_array_equal(mine[0], theirs[0])
    data = image_bytes(40, 36, seed=24)
    (a,), (b,) = (analyze(m, [data], JobOptions(), settings) for m in (archive, h5))
    assert a.files == b.files
    assert a.manifest["preprocessing"] == b.manifest["preprocessing"]


def test_a_tf_keras_archive_with_a_lambda_is_code_refused_unless_trusted(keras2_files):
    with pytest.raises(UnsafeModel, match="Lambda") as err:
        open_model(keras2_files["keras2_lambda.keras"])
    assert err.value.code == ErrorCode.UNSAFE_MODEL
    trusted = open_model(keras2_files["keras2_lambda.keras"], trusted=True)
    x = np.random.default_rng(2).random((1, models.SIDE, models.SIDE, 3), dtype=np.float32)
    conv = keras.Model(trusted.model.inputs, trusted.model.get_layer("conv").output)
    np.testing.assert_allclose(
        models.run_model(trusted.model, x)[0], 2.0 * models.run_model(conv, x)[0], rtol=1e-6
    )


def _rewritten(source: Path, out: Path, **members: bytes | None) -> Path:
    """A copy of the archive `source` with `members` replaced (None: left out)."""
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(out, "w") as new:
        for info in old.infolist():
            if info.filename not in members:
                new.writestr(info, old.read(info))
        for name, data in members.items():
            if data is not None:
                new.writestr(name, data)
    return out


def test_a_tf_keras_archive_whose_weights_do_not_fit_is_invalid_model(keras2_files, tmp_path):
    with zipfile.ZipFile(keras2_files["keras2_v3.keras"]) as other:
        foreign = other.read("model.weights.h5")
    source = keras2_files["keras2_cnn.keras"]
    for name, weights in (("foreign", foreign), ("missing", None)):
        path = _rewritten(source, tmp_path / f"{name}.keras", **{"model.weights.h5": weights})
        with pytest.raises(InvalidModel) as err:
            open_model(path)
        assert err.value.code == ErrorCode.INVALID_MODEL
        assert f"could not load model '{name}.keras'" in err.value.message


def test_a_keras3_h5_is_not_adapted_its_nested_sequential_called_twice(tmp_path):
    """Only what Keras 2 wrote is adapted: Keras 3 numbers a nested Sequential's calls
    from 0 already, and its second call is node 1."""
    inputs = keras.Input((8, 8, 3))
    shared = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(3, 1)], name="shared")
    model = keras.Model(inputs, shared(shared(inputs)))
    path = tmp_path / "keras3_shared.h5"
    model.save(path)
    x = np.random.default_rng(1).random((1, 8, 8, 3)).astype(np.float32)
    opened = open_model(path)
    np.testing.assert_allclose(to_numpy(opened.model(x)), to_numpy(model(x)), atol=TOLERANCE)


def test_a_keras_2_0_h5_as_the_book_saved_it_runs_and_shows_the_recipes_layers(tmp_path, settings):
    """Deep Learning with Python's `cats_and_dogs_small_2.h5`, as Keras 2.0.8 wrote it (a
    Sequential's config as a bare list, no InputLayer): its twin's outputs, and the
    recipe's `model.layers[:8]` as `:8`."""
    path, twin = models.save_keras_2_0_h5(tmp_path)
    with h5py.File(path, "r") as fh:
        config = json.loads(fh.attrs["model_config"])
    assert isinstance(config["config"], list)  # what Keras 3 alone cannot read
    adapted = adapt(config)["config"]
    assert adapted["layers"][0]["class_name"] == "InputLayer"
    assert adapted["layers"][0]["config"]["batch_input_shape"] == [None, 150, 150, 3]
    assert "batch_input_shape" not in adapted["layers"][1]["config"]
    loaded = open_model(path)
    assert loaded.input_shape == (150, 150, 3)
    x = np.random.default_rng(4).random((2, 150, 150, 3), dtype=np.float32)
    np.testing.assert_allclose(to_numpy(loaded.model(x)), to_numpy(twin(x)), atol=1e-6)
    names = [ref.name for ref in loaded.select(":8")]
    assert names == [f"{kind}_{i}" for i in range(1, 5) for kind in ("conv2d", "max_pooling2d")]
    (result,) = analyze(loaded, [image_bytes(64, 48, seed=22)], JobOptions(layers=":8"), settings)
    assert [entry["name"] for entry in result.manifest["layers"]] == names
    assert all(entry["grid"] for entry in result.manifest["layers"])
    assert result.manifest["preprocessing"]["scale"] == "1/255"  # the recipe's


@pytest.mark.parametrize("kind", ["functional", "nested"])
def test_keras_2_0_functional_models_give_their_twins_outputs_and_heatmaps(
    tmp_path, settings, kind
):
    """The book's VGG16 (a Keras 2.0 `Model`, which its Grad-CAM explains) and its
    section 5.3 model (that base inside a Sequential), as Keras 2.0.8 wrote them."""
    path, twin = models.save_keras_2_0_h5(tmp_path, kind, side=64)
    loaded = open_model(path)
    x = np.random.default_rng(6).random((2, 64, 64, 3), dtype=np.float32)
    np.testing.assert_allclose(to_numpy(loaded.model(x)), to_numpy(twin(x)), atol=1e-6)
    prefix = "vgg16/" if kind == "nested" else ""
    assert loaded.select("Conv2D")[0].name == f"{prefix}block1_conv1"
    twin_path = tmp_path / "twin.keras"
    twin.save(twin_path)
    data = image_bytes(70, 60, seed=23)
    (mine,) = analyze_cam(loaded, [data], JobOptions(), settings)
    (theirs,) = analyze_cam(open_model(twin_path), [data], JobOptions(), settings)
    assert mine.manifest["gradcam"]["layer"] == f"{prefix}block2_pool"
    assert mine.manifest["gradcam"]["classes"] == theirs.manifest["gradcam"]["classes"]
    heatmaps = [key for key in theirs.files if key.endswith(".png") and key != "input.png"]
    assert heatmaps and all(mine.files[key] == theirs.files[key] for key in heatmaps)


def test_a_keras_2_2_sequential_without_an_input_layer_gives_its_twins_outputs(tmp_path):
    """Keras 2.2.3 to 2.2.5 wrote a Sequential's config as a dict, its first layer still
    declaring the input."""
    path, twin = models.save_keras_2_0_h5(tmp_path, "sequential", side=64, version="2.2.4")
    with h5py.File(path, "r") as fh:
        config = json.loads(fh.attrs["model_config"])["config"]
    assert "batch_input_shape" in config["layers"][0]["config"]
    loaded = open_model(path)
    x = np.random.default_rng(9).random((2, 64, 64, 3), dtype=np.float32)
    np.testing.assert_allclose(to_numpy(loaded.model(x)), to_numpy(twin(x)), atol=1e-6)


def test_a_keras_2_0_h5_theano_wrote_has_its_kernels_turned_as_keras_2_turned_them(tmp_path):
    """Theano's convolution is a true one: Keras 2 turned each kernel of a file Theano's
    backend wrote around in space as it loaded it, and actviz does too (Keras 3 does
    not), so the model computes what it computed under Theano (its twin here)."""
    path, twin = models.save_keras_2_0_h5(tmp_path, "sequential", side=64, backend="theano")
    loaded = open_model(path)
    x = np.random.default_rng(8).random((2, 64, 64, 3), dtype=np.float32)
    np.testing.assert_allclose(to_numpy(loaded.model(x)), to_numpy(twin(x)), atol=1e-6)
    conv = loaded.select("conv2d_2")[0]
    mine, theirs = extract(loaded, x, [conv])[0], twin.layers[2](twin.layers[1](twin.layers[0](x)))
    np.testing.assert_allclose(mine, to_numpy(theirs), atol=1e-5)
    (tmp_path / "tf").mkdir()
    as_tensorflow, _ = models.save_keras_2_0_h5(tmp_path / "tf", "sequential", side=64)
    with h5py.File(path, "r") as a, h5py.File(as_tensorflow, "r") as b:
        kernel = "model_weights/conv2d_1/conv2d_1/kernel:0"
        np.testing.assert_array_equal(a[kernel][()][::-1, ::-1], b[kernel][()])


def test_a_keras_1_h5_is_invalid_model_saying_how_to_convert_it(tmp_path):
    path, _ = models.save_keras_2_0_h5(tmp_path, "sequential", side=64)
    with h5py.File(path, "r+") as fh:
        fh.attrs["keras_version"] = b"1.2.2"  # the version is what the worker reads
    with pytest.raises(InvalidModel) as err:
        open_model(path)
    assert err.value.code == ErrorCode.INVALID_MODEL
    assert (
        "written by Keras 1.2.2" in err.value.message
        and "save it again as .h5" in err.value.message
    )
