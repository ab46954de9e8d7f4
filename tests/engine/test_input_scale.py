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
from worker.engine import open_model, preprocess
from worker.engine.diff import diff_image
from worker.engine.input_scale import auto_scale
from worker.engine.preprocess import IMAGENET_MEAN, IMAGENET_STD

layers = keras.layers
SIDE = 32


def cnn(*front: keras.layers.Layer, dtype: str = "float32", name: str = "cnn") -> keras.Model:
    """`front` layers in front of a convolution and a head."""
    inputs = keras.Input((SIDE, SIDE, 3), dtype=dtype)
    x = inputs
    for layer in front:
        x = layer(x)
    x = layers.Conv2D(4, 3, activation="relu", name="conv")(x)
    return keras.Model(inputs, layers.Dense(2)(layers.GlobalAveragePooling2D()(x)), name=name)


def adapted(values: np.ndarray) -> keras.layers.Normalization:
    norm = layers.Normalization(name="norm")
    norm.adapt(values)
    return norm


PIXELS = np.random.default_rng(3).random((8, SIDE, SIDE, 3)) * 255.0
PIXELS_0_255 = "the model takes pixel values 0..255: "

CASES = [
    # name, the model, what 'auto' is for it, in why it is
    ("plain", lambda: cnn(), "1/255", "nothing in front of the model's first weights"),
    ("rescaling", lambda: cnn(layers.Rescaling(1 / 255, name="pre")), "none", "'pre' (Rescaling)"),
    (
        "rescaling_to_plus_minus_one_after_augmentation",
        lambda: cnn(
            keras.Sequential([layers.RandomFlip(), layers.RandomZoom(0.1)], name="augment"),
            layers.Resizing(SIDE, SIDE),
            layers.Rescaling(1 / 127.5, offset=-1, name="pre"),
        ),
        "none",
        "multiplies its input by 0.007843",
    ),
    (
        "normalization_of_pixels",
        lambda: cnn(adapted(PIXELS)),
        "none",
        "'norm' (Normalization) subtracts",
    ),
    (
        "normalization_of_pixels_given",
        lambda: cnn(layers.Normalization(mean=[124, 116, 104], variance=[3364, 3249, 3249])),
        "none",
        "subtracts a mean of [124, 116, 104]",
    ),
    ("normalization_of_0_to_1", lambda: cnn(adapted(PIXELS / 255.0)), "1/255", "nothing"),
    ("rescaling_of_0_to_1", lambda: cnn(layers.Rescaling(2.0, offset=-1)), "1/255", "nothing"),
    (
        "rescaling_after_the_first_weights",
        lambda: cnn(layers.Conv2D(3, 1), layers.Rescaling(1 / 255)),
        "1/255",
        "nothing",
    ),
    ("uint8", lambda: cnn(layers.Rescaling(1 / 255), dtype="uint8"), "none", "input is uint8"),
    (
        "efficientnet",
        lambda: keras.applications.EfficientNetB0(weights=None, input_shape=(SIDE, SIDE, 3)),
        "none",
        "(Rescaling) multiplies its input",
    ),
    (
        "mobilenet_v3",
        lambda: keras.applications.MobileNetV3Small(
            weights=None, input_shape=(SIDE, SIDE, 3), minimalistic=True
        ),
        "none",
        "multiplies its input by 0.007843",
    ),
    (
        "mobilenet",  # its preprocess_input is outside it: x / 127.5 - 1
        lambda: keras.applications.MobileNet(alpha=0.25, weights=None, input_shape=(SIDE, SIDE, 3)),
        "-1..1",
        "named 'mobilenet_0.25_32', as Keras names its Xception, Inception",
    ),
    ("named_vgg16", lambda: cnn(name="vgg16"), "caffe", "named 'vgg16'"),
    ("named_xception", lambda: cnn(name="xception"), "-1..1", "named 'xception'"),
    ("named_densenet121", lambda: cnn(name="densenet121"), "meanstd", "named 'densenet121'"),
    ("named_otherwise", lambda: cnn(name="my_resnet50_finetuned"), "1/255", "nothing"),
    (
        "named_vgg16_with_its_own_rescaling",
        lambda: cnn(layers.Rescaling(1 / 255), name="vgg16"),
        "none",
        "multiplies its input by 0.003922",
    ),
]


@pytest.mark.parametrize("name, build, scale, why", CASES, ids=[case[0] for case in CASES])
def test_auto_is_what_the_models_front_layers_or_keras_application_name_say(
    tmp_path, name, build, scale, why
):
    path = tmp_path / f"{name}.keras"
    build().save(path)
    auto = open_model(path).auto_scale
    assert auto.scale == scale and why in auto.why, auto
    assert auto.why.startswith(PIXELS_0_255) == (scale == "none")
    assert (auto.mean, auto.std) == (
        (IMAGENET_MEAN, IMAGENET_STD) if scale == "meanstd" else (None, None)
    )


def test_keras_names_its_applications_as_the_table_expects():
    """Built (not saved: they are large), Keras's own applications, by their own names."""
    apps = keras.applications
    shape = (SIDE, SIDE, 3)
    expected = {
        "caffe": [apps.VGG16, apps.ResNet50],
        "-1..1": [apps.ResNet50V2, apps.MobileNetV2],
        "meanstd": [apps.DenseNet121],
    }
    for scale, builders in expected.items():
        for build in builders:
            model = build(weights=None, include_top=False, input_shape=shape)
            assert auto_scale(model).scale == scale, model.name
    xception = apps.Xception(weights=None, include_top=False, input_shape=(71, 71, 3))
    assert auto_scale(xception).scale == "-1..1"
    assert auto_scale(cnn(name="vgg16"), channels=1).scale == "1/255"  # they take RGB


def test_the_caffe_scale_is_vggs_preprocess_input(settings):
    data = image_bytes(SIDE, SIDE, seed=8)
    shape = (SIDE, SIDE, 3)
    prepared = preprocess(data, shape, JobOptions(scale="caffe"), settings)
    x = prepared.display.astype(np.float32)[None]
    want = keras.applications.vgg16.preprocess_input(x.copy())[0]
    np.testing.assert_allclose(prepared.pixels, keras.ops.convert_to_numpy(want), atol=1e-4)
    assert prepared.record["formula"].startswith("x[..., ::-1]")
    with pytest.raises(InvalidJob, match="reorders RGB to BGR"):
        preprocess(data, (SIDE, SIDE, 1), JobOptions(scale="caffe"), settings)


def test_a_legacy_h5_rescaling_model_takes_pixel_values(tmp_path):
    path = tmp_path / "rescaling.h5"
    cnn(layers.Rescaling(1 / 255, name="pre")).save(path)
    assert "'pre' (Rescaling)" in open_model(path).auto_scale.why


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
        auto = open_model(keras2_files[name]).auto_scale
        assert auto.scale == "none" and reason in auto.why, (name, auto)
    assert not open_model(keras2_files["keras2_ops.h5"]).auto_scale.found


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
    assert "model a would be fed 'none' (the model takes pixel values 0..255" in err.value.message
    assert "model b would be fed '1/255'" in err.value.message
    result = diff_image(a, b, data, JobOptions(layers="conv", scale="none"), Settings())
    assert result.manifest["preprocessing"]["scale"] == "none"
