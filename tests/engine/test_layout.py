"""Channels-first models (worker/engine/layout.py): run as built, seen as (H, W, C).

Their activations, grids and statistics are compared with Keras's own in
test_analyze.py, their Grad-CAM with the recipe's in test_gradcam.py, and a
tf.keras file's outputs with its channels-last twin's in test_keras2_models.py;
here, what the engine shows of them and the model it refuses.
"""

from __future__ import annotations

import keras
import models
import numpy as np
import pytest
from sample_images import image_bytes

from producer.contract import ErrorCode, JobOptions
from producer.errors import InvalidModel
from worker.engine import Artifacts, analyze, extract, open_model
from worker.engine.cam_pass import analyze_cam

layers = keras.layers


def test_a_channels_first_model_shows_every_shape_as_h_w_c(loaded_models, settings):
    loaded = loaded_models("channels_first")
    assert loaded.channels_first and loaded.input_shape == (32, 32, 3)
    shapes = {ref.name: ref.output_shape for ref in loaded.layers}
    assert shapes["image"] == (32, 32, 3) and shapes["conv_a"] == (32, 32, 6)
    assert shapes["concat"] == (32, 32, 12) and shapes["pool"] == (16, 16, 12)
    assert shapes["flatten"] == (14 * 14 * 8,)
    (result,) = analyze(loaded, [image_bytes(40, 30, seed=16)], JobOptions(), settings)
    assert result.manifest["model"]["data_format"] == "channels_first"
    assert result.manifest["model"]["input_shape"] == [32, 32, 3]
    entries = {entry["name"]: entry for entry in result.manifest["layers"]}
    assert entries["concat"]["output_shape"] == [32, 32, 12]
    assert entries["concat"]["grid"]["channels"] == 12
    (plain,) = analyze(loaded_models("softmax"), [image_bytes(seed=1)], JobOptions(), settings)
    assert "data_format" not in plain.manifest["model"]


def test_a_legacy_channels_first_h5_is_analyzed_and_explained(keras2_files, settings):
    """tf.keras on a GPU wrote it; Keras 3 runs it here, on the CPU."""
    loaded = open_model(keras2_files["keras2_channels_first.h5"])
    assert loaded.channels_first and loaded.input_shape == (32, 32, 3)
    data = image_bytes(40, 36, seed=17)
    (result,) = analyze(loaded, [data], JobOptions(), settings)
    assert isinstance(result, Artifacts)
    grids = [entry for entry in result.manifest["layers"] if entry["grid"]]
    assert [entry["output_shape"][-1] for entry in grids] == [5, 5, 5, 4]
    (cam,) = analyze_cam(loaded, [data], JobOptions(), settings)
    assert isinstance(cam, Artifacts)
    assert cam.manifest["gradcam"]["layer_shape"] == [13, 13, 4]


def test_its_maps_are_the_transposed_maps_of_the_model_run_as_built(loaded_models):
    loaded = loaded_models("channels_first")
    refs = loaded.select("conv_a,concat,conv_c,flatten,probs")
    x = np.random.default_rng(2).random((2, 32, 32, 3), dtype=np.float32)
    mine = extract(loaded, x, refs)
    # Run as built, under XLA (TensorFlow's own CPU kernels take NHWC only), and as its
    # channels-last twin with its weights.
    probe = keras.Model(loaded.model.inputs, [ref.layer.output for ref in refs])
    built = models.run_model(probe, x.transpose(0, 3, 1, 2))
    twin = models.channels_last_twin(loaded.model)
    twin_probe = keras.Model(twin.inputs, [twin.get_layer(ref.name).output for ref in refs])
    for ref, a, b, c in zip(refs, mine, built, models.run_model(twin_probe, x), strict=True):
        np.testing.assert_allclose(a, b.transpose(0, 2, 3, 1) if b.ndim == 4 else b, atol=1e-5)
        np.testing.assert_allclose(a, c, atol=1e-5, err_msg=ref.name)


def test_a_model_mixing_channels_first_and_last_convolutions_is_invalid_model(tmp_path):
    inputs = keras.Input((3, 16, 16))
    x = layers.Conv2D(4, 3, data_format="channels_first", name="first")(inputs)
    x = layers.Conv2D(4, 3, data_format="channels_last", name="last")(x)
    path = tmp_path / "mixed.keras"
    keras.Model(inputs, x).save(path)
    with pytest.raises(InvalidModel) as err:
        open_model(path)
    assert err.value.code == ErrorCode.INVALID_MODEL
    assert "channels_first layers (first)" in err.value.message
    assert "channels_last ones (last)" in err.value.message
