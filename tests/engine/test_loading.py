"""Opening models: every supported format, and a typed error for every bad one."""

from __future__ import annotations

import shutil
from pathlib import Path

import keras
import models
import numpy as np
import pytest

from producer.contract import ErrorCode
from producer.errors import InvalidModel, ModelNotFound, UnsafeModel
from worker.engine import open_model

to_numpy = keras.ops.convert_to_numpy  # any backend, any device


def _same_predictions(a: keras.Model, b: keras.Model, shape: tuple[int, ...]) -> float:
    x = np.random.default_rng(3).random((2, *shape)).astype(np.float32)
    return float(np.abs(to_numpy(a(x)) - to_numpy(b(x))).max())


def test_h5_and_keras_files_open_with_their_input_shape(model_files):
    seq = open_model(model_files["sequential_h5"], uri="s3://b/seq_cnn.h5")
    assert seq.input_shape == (32, 32, 3)
    assert seq.uri == "s3://b/seq_cnn.h5"
    assert len(seq.sha256) == 64
    assert seq.nbytes == sum(int(np.prod(w.shape)) * 4 for w in seq.model.weights) > 0
    assert open_model(model_files["fully_conv"]).input_shape == (None, None, 3)
    assert open_model(model_files["gray"]).input_shape == (32, 32, 1)
    # (batch, H, W): grayscale without a channel axis, fed (H, W, 1) images without it
    assert open_model(model_files["gray_hw"]).input_shape == (32, 32, 1)


def test_keras2_h5_file_loads_with_its_weights(keras2_files):
    loaded = open_model(keras2_files["keras2_cnn.h5"])
    names = [ref.name for ref in loaded.layers]
    assert names[:4] == ["conv2d_1", "max_pooling2d_1", "conv2d_2", "max_pooling2d_2"]
    kernel = loaded.model.get_layer("conv2d_1").get_weights()[0]
    assert kernel.shape == (3, 3, 3, 4) and np.abs(kernel).sum() > 0


def test_keras2_savedmodel_is_rebuilt_with_layers_and_same_outputs(keras2_files):
    rebuilt = open_model(keras2_files["keras2_savedmodel"])
    reference = open_model(keras2_files["keras2_cnn.h5"])
    assert [r.name for r in rebuilt.layers] == [r.name for r in reference.layers]
    assert _same_predictions(rebuilt.model, reference.model, (32, 32, 3)) == 0.0


def test_savedmodel_without_keras_layers_is_refused_with_conversion_hint(model_dir):
    path = models.save_tf_module_savedmodel(model_dir)
    with pytest.raises(InvalidModel) as err:
        open_model(path)
    assert err.value.code == ErrorCode.INVALID_MODEL
    assert "model.save('model.keras')" in err.value.message


def test_file_without_extension_is_recognised_by_content(model_files, tmp_path):
    copy = tmp_path / "downloaded-model"
    shutil.copy(model_files["residual"], copy)
    loaded = open_model(copy)
    reference = keras.saving.load_model(model_files["residual"])
    assert _same_predictions(loaded.model, reference, (32, 32, 3)) == 0.0


def test_missing_file_is_model_not_found(tmp_path):
    with pytest.raises(ModelNotFound) as err:
        open_model(tmp_path / "nope.h5")
    assert err.value.code == ErrorCode.MODEL_NOT_FOUND


@pytest.mark.parametrize(
    "name, content",
    [
        ("notes.h5", b"this is a text file, not a model\n"),
        ("empty.keras", b""),
        ("broken.keras", b"PK\x03\x04 truncated zip"),
        ("broken.h5", b"\x89HDF\r\n\x1a\n" + b"\x00" * 64),
    ],
)
def test_non_model_file_is_invalid_model(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(InvalidModel) as err:
        open_model(path)
    assert err.value.code == ErrorCode.INVALID_MODEL


def test_plain_folder_is_invalid_model(tmp_path):
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(InvalidModel, match="not a TensorFlow SavedModel"):
        open_model(tmp_path)


@pytest.mark.parametrize(
    "shape, why",
    [((784,), "is not (batch, H, W, C) or (batch, H, W) image input"), ((8, 8, 4), "4 channels")],
)
def test_a_model_that_takes_no_image_is_invalid_model_saying_why(tmp_path, shape, why):
    inputs = keras.Input(shape)
    path = tmp_path / "not_an_image_model.keras"
    keras.Model(inputs, keras.layers.Dense(2)(inputs)).save(path)
    with pytest.raises(InvalidModel) as err:
        open_model(path)
    assert err.value.code == ErrorCode.INVALID_MODEL
    assert why in err.value.message


def _sequence_models():
    layers = keras.layers
    steps = keras.Input((64, 3))
    conv1d = layers.Conv1D(4, 3, name="conv1d")(steps)
    encoder = keras.Sequential(
        [keras.Input((64, 3)), layers.Conv1D(4, 3, name="inner_conv1d"), layers.Flatten()],
        name="encoder",
    )
    return {
        "conv1d": (
            keras.Model(steps, layers.GlobalAveragePooling1D()(conv1d)),
            "'conv1d' (Conv1D)",
        ),
        "lstm": (
            keras.Sequential([keras.Input((20, 8)), layers.LSTM(4, name="lstm"), layers.Dense(2)]),
            "'lstm' (LSTM) takes 20 steps of 8 features",
        ),
        "nested": (keras.Model(steps, encoder(steps)), "'inner_conv1d' (Conv1D)"),
    }


@pytest.mark.parametrize("name", ["conv1d", "lstm", "nested"])
def test_a_model_reading_its_input_as_a_sequence_is_invalid_model_not_a_gray_image(tmp_path, name):
    """(batch, steps, features) has the shape of MNIST's (batch, H, W); the layer that
    reads it tells them apart. MNIST's models reshape or flatten it first, and open."""
    model, why = _sequence_models()[name]
    path = tmp_path / f"{name}.keras"
    model.save(path)
    with pytest.raises(InvalidModel) as err:
        open_model(path)
    assert err.value.code == ErrorCode.INVALID_MODEL
    assert "as a sequence" in err.value.message and why in err.value.message
    mnist = keras.Sequential(
        [
            keras.Input((28, 28)),
            keras.layers.Flatten(),
            keras.layers.Dense(10, activation="softmax"),
        ]
    )
    mnist.save(tmp_path / "mnist_mlp.keras")
    assert open_model(tmp_path / "mnist_mlp.keras").input_shape == (28, 28, 1)


def test_a_layer_class_of_the_models_author_is_named_in_the_error(tmp_path):
    """Written by a process that defined (and registered) the class; this one has not."""
    import subprocess
    import sys

    path = tmp_path / "custom_layer.keras"
    script = (
        "import sys, keras\n"
        "@keras.saving.register_keras_serializable(package='mine')\n"
        "class Twice(keras.layers.Layer):\n"
        "    def call(self, x):\n"
        "        return x * 2\n"
        "inputs = keras.Input((8, 8, 3))\n"
        "keras.Model(inputs, Twice()(keras.layers.Conv2D(2, 3)(inputs))).save(sys.argv[1])\n"
    )
    subprocess.run([sys.executable, "-c", script, str(path)], check=True, timeout=240)
    with pytest.raises(InvalidModel) as err:
        open_model(path)
    assert err.value.code == ErrorCode.INVALID_MODEL
    assert "not Keras's (mine>Twice)" in err.value.message


def test_never_built_sequential_is_invalid_model_saying_why(model_files):
    with pytest.raises(InvalidModel) as err:
        open_model(model_files["unbuilt"])
    assert "no defined input" in err.value.message
    assert "keras.Input" in err.value.message


@pytest.mark.parametrize("name", ["lambda_keras", "lambda_h5"])
def test_lambda_model_is_unsafe_unless_trusted(model_files, name):
    with pytest.raises(UnsafeModel) as err:
        open_model(model_files[name])
    assert err.value.code == ErrorCode.UNSAFE_MODEL
    assert "Lambda 'double'" in err.value.message
    trusted = open_model(model_files[name], trusted=True)
    x = np.ones((1, 32, 32, 3), dtype=np.float32)
    conv = trusted.model.get_layer("conv")
    np.testing.assert_allclose(to_numpy(trusted.model(x)), 2.0 * to_numpy(conv(x)), rtol=1e-6)


def test_keras2_lambda_h5_is_refused_before_deserializing(keras2_files):
    with pytest.raises(UnsafeModel, match="Lambda 'double'"):
        open_model(keras2_files["keras2_lambda.h5"])


def test_lambda_nested_inside_a_model_is_found(tmp_path):
    inner_in = keras.Input((8, 8, 3))
    inner = keras.Model(inner_in, keras.layers.Lambda(lambda t: t + 1.0, name="plus")(inner_in))
    outer = keras.Sequential([keras.Input((8, 8, 3)), inner, keras.layers.Flatten()])
    path = Path(tmp_path) / "nested_lambda.h5"
    outer.save(path)
    with pytest.raises(UnsafeModel, match="Lambda 'plus'"):
        open_model(path)


def test_lambda_spelled_with_a_module_path_is_found(model_files, tmp_path):
    """'layers.Lambda' or a registered name still names the Lambda class."""
    import json
    import zipfile

    source = model_files["lambda_keras"]
    with zipfile.ZipFile(source) as archive:
        members = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(members["config.json"])
    text = json.dumps(config).replace('"class_name": "Lambda"', '"class_name": "layers.Lambda"')
    assert text != json.dumps(config)
    respelled = tmp_path / "respelled.keras"
    with zipfile.ZipFile(respelled, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, text if name == "config.json" else data)
    with pytest.raises(UnsafeModel, match="Lambda 'double'"):
        open_model(respelled)


def test_h5_declaring_gigabytes_of_weights_it_does_not_hold_is_refused_unread(tmp_path):
    import h5py

    path = tmp_path / "bomb.h5"
    keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(2, 3)]).save(path)
    with h5py.File(path, "a") as fh:  # 3.9 GB declared, no byte of it written
        fh.create_dataset("model_weights/bomb", shape=(975_000_000,), dtype="f4", chunks=(1 << 20,))
    assert path.stat().st_size < 1_000_000
    with pytest.raises(InvalidModel, match="decompression bomb") as err:
        open_model(path)
    assert err.value.code == ErrorCode.INVALID_MODEL


def test_keras_archive_whose_config_inflates_past_the_bound_is_refused_unread(tmp_path):
    import zipfile

    from worker.engine.safety import MAX_CONFIG_BYTES

    path = tmp_path / "config-bomb.keras"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("metadata.json", "{}")
        archive.writestr("config.json", " " * (MAX_CONFIG_BYTES + 1))
    assert path.stat().st_size < 200_000
    with pytest.raises(InvalidModel, match="bomb|config.json of"):
        open_model(path)
