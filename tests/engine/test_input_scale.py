"""Which models take pixel values 0..255 (worker/engine/input_scale.py): each is built
the way its users build it, saved, and opened as a worker opens it."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from sample_images import image_bytes

from producer.contract import ErrorCode, JobOptions
from producer.errors import InvalidJob
from producer.settings import Settings
from worker.engine import open_model
from worker.engine.diff import diff_image

layers = keras.layers
SIDE = 32


def cnn(*front: keras.layers.Layer, dtype: str = "float32") -> keras.Model:
    """`front` layers in front of a convolution and a head."""
    inputs = keras.Input((SIDE, SIDE, 3), dtype=dtype)
    x = inputs
    for layer in front:
        x = layer(x)
    x = layers.Conv2D(4, 3, activation="relu", name="conv")(x)
    return keras.Model(inputs, layers.Dense(2)(layers.GlobalAveragePooling2D()(x)))


def adapted(values: np.ndarray) -> keras.layers.Normalization:
    norm = layers.Normalization(name="norm")
    norm.adapt(values)
    return norm


def applications() -> dict[str, keras.Model]:
    shape = (SIDE, SIDE, 3)
    return {
        "efficientnet": keras.applications.EfficientNetB0(weights=None, input_shape=shape),
        "mobilenet_v3": keras.applications.MobileNetV3Small(
            weights=None, input_shape=shape, minimalistic=True
        ),
        "resnet": keras.applications.ResNet50(weights=None, input_shape=shape),
    }


PIXELS = np.random.default_rng(3).random((8, SIDE, SIDE, 3)) * 255.0

CASES = [
    ("plain", lambda: cnn(), None),
    ("rescaling", lambda: cnn(layers.Rescaling(1 / 255, name="pre")), "'pre' (Rescaling)"),
    (
        "rescaling_to_plus_minus_one_after_augmentation",
        lambda: cnn(
            keras.Sequential([layers.RandomFlip(), layers.RandomZoom(0.1)], name="augment"),
            layers.Resizing(SIDE, SIDE),
            layers.Rescaling(1 / 127.5, offset=-1, name="pre"),
        ),
        "multiplies its input by 0.007843",
    ),
    ("normalization_of_pixels", lambda: cnn(adapted(PIXELS)), "'norm' (Normalization) subtracts"),
    (
        "normalization_of_pixels_given",
        lambda: cnn(layers.Normalization(mean=[124, 116, 104], variance=[3364, 3249, 3249])),
        "subtracts a mean of [124, 116, 104]",
    ),
    ("normalization_of_0_to_1", lambda: cnn(adapted(PIXELS / 255.0)), None),
    ("rescaling_of_0_to_1", lambda: cnn(layers.Rescaling(2.0, offset=-1)), None),
    (
        "rescaling_after_the_first_weights",
        lambda: cnn(layers.Conv2D(3, 1), layers.Rescaling(1 / 255)),
        None,
    ),
    ("uint8", lambda: cnn(layers.Rescaling(1 / 255), dtype="uint8"), "its input is uint8"),
    ("efficientnet", lambda: applications()["efficientnet"], "(Rescaling) multiplies its input"),
    ("mobilenet_v3", lambda: applications()["mobilenet_v3"], "multiplies its input by 0.007843"),
    ("resnet", lambda: applications()["resnet"], None),  # caffe-style: its input is outside
]


@pytest.mark.parametrize("name, build, reason", CASES, ids=[case[0] for case in CASES])
def test_a_model_takes_pixel_values_where_its_front_layers_scale_them(
    tmp_path, name, build, reason
):
    path = tmp_path / f"{name}.keras"
    build().save(path)
    found = open_model(path).pixel_input
    if reason is None:
        assert found is None
    else:
        assert found is not None and reason in found, found


def test_a_legacy_h5_rescaling_model_takes_pixel_values(tmp_path):
    path = tmp_path / "rescaling.h5"
    cnn(layers.Rescaling(1 / 255, name="pre")).save(path)
    assert "'pre' (Rescaling)" in open_model(path).pixel_input


def test_tf_keras_preprocessing_saved_as_op_layers_makes_the_model_take_pixel_values(
    keras2_files,
):
    """tf.keras's MobileNetV3 (its own Rescaling), transfer models calling the
    `preprocess_input` of MobileNetV2 (x / 127.5 - 1), ResNet50 (BGR, a mean subtracted)
    and DenseNet (x / 255, a mean, a std), as op layers, and a Sequential with
    `Rescaling(1 / 127.5, offset=-1)`; an op model whose ops follow its weights does not."""
    expected = {
        "keras2_mobilenet_v3.h5": "(Rescaling) multiplies its input by 0.007843",
        "keras2_transfer_functional.h5": "(TFOp) divides its input by 127.5",
        "keras2_transfer_sequential.h5": "(Rescaling) multiplies its input by 0.007843",
        "keras2_caffe_preprocess.h5": "(TFOp) subtracts a mean of [103.9, 116.8, 123.7]",
        "keras2_torch_preprocess.h5": "(TFOp) divides its input by 255",
    }
    for name, reason in expected.items():
        found = open_model(keras2_files[name]).pixel_input
        assert found is not None and reason in found, (name, found)
    assert open_model(keras2_files["keras2_ops.h5"]).pixel_input is None


def test_a_diff_of_two_models_that_scale_differently_asks_for_the_scale(tmp_path):
    keras.utils.set_random_seed(1)
    a_path, b_path = tmp_path / "a.keras", tmp_path / "b.keras"
    cnn(layers.Rescaling(1 / 255, name="pre")).save(a_path)
    cnn(layers.Rescaling(1.0, name="pre")).save(b_path)
    a, b = open_model(a_path), open_model(b_path)
    data = image_bytes(SIDE, SIDE, seed=4)
    with pytest.raises(InvalidJob) as err:
        diff_image(a, b, data, JobOptions(layers="conv"), Settings())
    assert err.value.code == ErrorCode.INVALID_JOB
    assert "model a takes pixel values 0..255" in err.value.message
    assert "model b takes x / 255" in err.value.message
    result = diff_image(a, b, data, JobOptions(layers="conv", scale="none"), Settings())
    assert result.manifest["preprocessing"]["scale"] == "none"
