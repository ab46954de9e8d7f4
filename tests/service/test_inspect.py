"""`actviz inspect MODEL`: what the engine reads of a model, from a fresh shell."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from test_embedded import actviz_in

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models  # noqa: E402

pytestmark = pytest.mark.timeout(180)


def inspect_json(folder: Path, *args: str) -> dict:
    done = actviz_in(folder, "inspect", *args, "--json")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    return json.loads(done.stdout)


def test_the_books_h5_shows_the_recipes_layers_scale_and_grad_cam_layer(tmp_path: Path) -> None:
    path, _ = models.save_keras_2_0_h5(tmp_path)
    d = inspect_json(tmp_path, str(path))
    assert d["input_shape"] == [150, 150, 3] and d["data_format"] == "channels_last"
    assert d["scale_auto"]["scale"] == "1/255"
    names = [layer["name"] for layer in d["layers"]]
    assert names[:3] == ["conv2d_1", "max_pooling2d_1", "conv2d_2"] and len(names) == 12
    assert [layer["index"] for layer in d["layers"]] == list(range(12))
    first = d["layers"][0]
    assert first["output_shape"] == [148, 148, 32] and first["default"] and first["spatial"]
    assert not d["layers"][-1]["default"]  # the Dense head: stats, no grid
    cam = {
        "available": True,
        "default": "max_pooling2d_4",
        "layers": names[:8],
        "classes": 1,
        "target": "classes",
    }
    assert d["gradcam"] == cam  # the default: the last map, 7 x 7 x 128
    assert d["parameters"] == 3_453_121  # the book's count for this model


def test_a_model_that_scales_itself_channels_first_says_so(tmp_path: Path) -> None:
    keras_file = models.save_rescaling_keras(tmp_path)
    d = inspect_json(tmp_path, str(keras_file))
    assert d["scale_auto"]["scale"] == "none"
    assert "'rescale' (Rescaling) multiplies its input by 0.003922" in d["scale_auto"]["why"]
    d = inspect_json(tmp_path, str(models.save_channels_first_keras(tmp_path)))
    assert d["data_format"] == "channels_first" and d["input_shape"] == [32, 32, 3]
    assert {layer["name"]: layer["output_shape"] for layer in d["layers"]}["pool"] == [16, 16, 12]


def test_a_model_grad_cam_cannot_explain_says_why(tmp_path: Path) -> None:
    import keras

    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    keras.Model(inputs, keras.layers.Reshape((14, 56))(x)).save(tmp_path / "rows.keras")
    d = inspect_json(tmp_path, str(tmp_path / "rows.keras"))
    assert d["gradcam"]["available"] is False
    assert "(batch, classes)" in d["gradcam"]["why"]


def test_a_per_pixel_model_is_explained_per_pixel_before_its_last_layer(tmp_path: Path) -> None:
    d = inspect_json(tmp_path, str(models.save_fully_conv_keras(tmp_path)))
    cam = d["gradcam"]
    assert cam["available"] and cam["target"] == "pixels" and cam["classes"] == 2
    assert cam["default"] == "fc_conv1" and cam["layers"] == ["fc_conv1"]


def test_the_text_form_names_every_layer_and_how_to_select_them(tmp_path: Path) -> None:
    done = actviz_in(tmp_path, "inspect", "builtin:demo")
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    text = done.stdout.decode()
    assert "input   " in text and "scale   auto = 1/255" in text and "gradcam default layer" in text
    d = inspect_json(tmp_path, "builtin:demo")
    for layer in d["layers"]:
        assert layer["name"] in text
    assert "select with --layers" in text


def test_bad_models_fail_with_their_error_code(tmp_path: Path) -> None:
    done = actviz_in(tmp_path, "inspect", str(tmp_path / "nope.h5"))
    assert done.returncode == 1 and b"model_not_found" in done.stderr
    _, lambda_h5 = models.save_lambda_models(tmp_path)
    done = actviz_in(tmp_path, "inspect", str(lambda_h5))
    assert done.returncode == 1 and b"unsafe_model" in done.stderr
    assert b"Traceback" not in done.stderr
    assert inspect_json(tmp_path, str(lambda_h5), "--trusted")["layers"]
