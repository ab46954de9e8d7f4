"""Grad-CAM against an independent computation of the recipe, and its errors.

The reference is Chollet's recipe written out with TensorFlow's GradientTape:
run the model up to the chosen layer, watch that output, run the rest, take
the gradient of the class score (the logit when the head is a softmax, its
activation removed as in the recipe), average it over space, weigh the
channels, ReLU, divide by the maximum. It shares no code with the engine.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import models
import numpy as np
import pytest
import tensorflow as tf
from sample_images import image_bytes

from producer.contract import JobOptions, gradcam_names
from producer.errors import InvalidJob, NotDifferentiable
from worker.engine import flatten_layers, open_model
from worker.engine.cam_pass import analyze_cam, cam_of, prepare_cam_image
from worker.engine.describe import describe_model
from worker.engine.gradcam import build_cam_model
from worker.report import render_report

TOLERANCE = 1e-4


def images(count: int = 3) -> list[bytes]:
    return [image_bytes(width=36, height=40, seed=seed) for seed in range(count)]


def pixels_for(loaded, options: JobOptions, settings) -> np.ndarray:  # noqa: ANN001
    cam, key, _ = cam_of(loaded, options)
    return np.stack(
        [prepare_cam_image(d, loaded, cam, key, options, settings).pixels for d in images()]
    )


def reference_sequential(model: keras.Model, target: str, x: np.ndarray, cls: int):
    """(A, dscore/dA) running a Sequential model layer by layer (nested: 'outer/inner')."""
    outer, _, inner = target.partition("/")
    with tf.GradientTape() as tape:
        h = tf.convert_to_tensor(x)
        acts = None
        for layer in model.layers:
            if inner and layer.name == outer:
                for sub in layer.layers[1:]:  # its InputLayer is not in .layers of Keras 3
                    h = sub(h)
                    if sub.name == inner:
                        tape.watch(h)
                        acts = h
                continue
            h = layer(h)
            if layer.name == target:
                tape.watch(h)
                acts = h
        score = h[:, cls]
    return acts.numpy(), tape.gradient(score, acts).numpy()


def reference_functional(model: keras.Model, target: str, x: np.ndarray, cls: int):
    """Chollet's grad_model: a Model over (the layer's output, the model's output)."""
    grad_model = keras.Model(model.inputs, [model.get_layer(target).output, model.output])
    with tf.GradientTape() as tape:
        acts, preds = grad_model(x)
        score = preds[:, cls]
    return acts.numpy(), tape.gradient(score, acts).numpy()


def gradcam_from(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    weights = grads.mean(axis=(1, 2))  # (N, C)
    heat = np.maximum(np.einsum("nhwc,nc->nhw", acts, weights), 0)
    peak = heat.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, heat / np.where(peak > 0, peak, 1), 0)


def gradcam_pp_from(acts: np.ndarray, grads: np.ndarray) -> np.ndarray:
    g2, g3 = grads**2, grads**3
    total = acts.sum(axis=(1, 2), keepdims=True)
    denom = 2 * g2 + total * g3
    alpha = np.where(grads != 0, g2 / np.where(denom != 0, denom, 1), 0)
    weights = (alpha * np.maximum(grads, 0)).sum(axis=(1, 2))
    heat = np.maximum(np.einsum("nhwc,nc->nhw", acts, weights), 0)
    peak = heat.max(axis=(1, 2), keepdims=True)
    return np.where(peak > 0, heat / np.where(peak > 0, peak, 1), 0)


def logits_model(path) -> keras.Model:  # noqa: ANN001
    """The recipe's own step: load the model again and remove the last softmax."""
    model = keras.saving.load_model(path, compile=False)
    model.layers[-1].activation = None
    return model


CASES = {
    # name: (model file fixture key, how the reference runs it, the layer)
    "sequential_softmax": ("softmax", reference_sequential, "conv_b"),
    "functional": ("residual", reference_functional, "block2_add"),
    "nested": ("nested", reference_sequential, "features/inner_conv_b"),
    "keras3_h5": ("sequential_h5", reference_sequential, "conv2d_2"),
    "keras2_h5": ("keras2_cnn.h5", reference_sequential, "conv2d_2"),  # written by tf_keras
    "gray_hw": ("gray_hw", reference_sequential, "conv_b"),  # takes (batch, H, W)
    "channels_first": ("channels_first", reference_functional, "conv_b"),  # (batch, C, H, W)
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_heatmaps_equal_the_recipe_computed_independently(
    case: str, method: str, request: pytest.FixtureRequest, settings
) -> None:  # noqa: ANN001
    if keras.backend.backend() != "tensorflow":
        pytest.skip(
            "the reference is written with TensorFlow's GradientTape; on this backend the "
            "heatmaps are compared with TensorFlow's (test_this_backends_heatmaps_equal_tensorflows)"
        )
    key, reference, layer = CASES[case]
    files = request.getfixturevalue("keras2_files" if case == "keras2_h5" else "model_files")
    loaded = open_model(files[key])
    every = list(range(loaded.cam(layer).classes))  # every class, the top-1 and the others
    options = JobOptions(classes=every, layer=layer, method=method)
    cam, cam_key, row = cam_of(loaded, options)
    x = pixels_for(loaded, options, settings)
    got = cam.run(x, np.array([row] * len(x)), cam_key)

    model = logits_model(files[key]) if cam.softmax else loaded.model
    fed = x[..., 0] if len(model.inputs[0].shape) == 3 else x  # (batch, H, W): as its author
    if loaded.channels_first:
        # TensorFlow's own CPU kernels take NHWC only (the engine runs such a model under
        # XLA): the recipe runs on its channels-last twin, which holds the same weights, in
        # float64: in float32, those kernels put its Grad-CAM++ maps up to 3.6e-4 off the
        # float64 ones, where the engine's stay within 1.3e-5 of them.
        model, fed = models.channels_last_twin(model, "float64"), x.astype(np.float64)
    shown = 0
    for slot, cls in enumerate(every):
        acts, grads = reference(model, layer, fed, cls)
        want = (gradcam_pp_from if method == "gradcam++" else gradcam_from)(acts, grads)
        np.testing.assert_allclose(got["maps"][:, slot], want, atol=TOLERANCE, rtol=0)
        assert (got["classes"][:, slot] == cls).all()
        shown += int((want.max(axis=(1, 2)) > 0).sum())
    assert shown >= len(x), "the reference heatmaps are mostly empty: the case shows little"


def test_this_backends_heatmaps_equal_tensorflows(tmp_path: Path) -> None:
    """On JAX (`make test`'s second run), or torch: every case's heatmaps equal
    TensorFlow's, which the test above compares with the independent recipe.
    bench/gradcam_backends.py writes TensorFlow's maps in a process of its own, then
    computes them again on this backend: 7 models, both methods and the top-2 predictions."""
    backend = keras.backend.backend()
    if backend == "tensorflow":
        pytest.skip("TensorFlow's heatmaps are compared with the independent recipe above")
    script = str(Path(__file__).resolve().parents[2] / "bench" / "gradcam_backends.py")

    def run(step: str, on: str) -> subprocess.CompletedProcess:
        env = {**os.environ, "KERAS_BACKEND": on}
        return subprocess.run(
            [sys.executable, script, step, str(tmp_path)],
            env=env, capture_output=True, text=True, timeout=240,
        )  # fmt: skip

    written = run("write", "tensorflow")
    assert written.returncode == 0, written.stderr[-2000:]
    checked = run("check", backend)
    assert checked.returncode == 0, checked.stdout + checked.stderr[-2000:]
    assert checked.stdout.startswith(f"backend {backend} "), checked.stdout
    cases = 7 * 3  # 7 models x (gradcam, gradcam++, top-2)
    assert checked.stdout.count("classes equal True") == cases, checked.stdout
    assert "PASS" in checked.stdout.splitlines()[-1], checked.stdout


def test_softmax_head_reports_probabilities_and_takes_the_logit_gradient(model_files, settings):  # noqa: ANN001
    loaded = open_model(model_files["softmax"])
    options = JobOptions(top=2, predictions=4)
    cam, key, row = cam_of(loaded, options)
    assert cam.softmax and cam.ref.name == "conv_b"  # the default: the last (H, W, C) layer
    x = pixels_for(loaded, options, settings)
    got = cam.run(x, np.array([row] * len(x)), key)
    probs = loaded.model.predict(x, verbose=0)
    np.testing.assert_allclose(got["top_scores"], -np.sort(-probs, axis=1), atol=1e-5)
    np.testing.assert_array_equal(got["classes"], np.argsort(-probs, axis=1)[:, :2])
    np.testing.assert_allclose(got["top_scores"].sum(axis=1), 1.0, atol=1e-5)


def test_a_job_writes_png_heatmaps_overlays_float16_values_and_a_manifest_section(
    model_files, settings
) -> None:  # noqa: ANN001
    from PIL import Image

    loaded = open_model(model_files["softmax"])
    labels = ["cat", "dog", "bird", "fish"]
    options = JobOptions(classes=[2, 0], labels=labels, colormap="magma")
    (result,) = analyze_cam(loaded, images(1), options, settings)
    section = result.manifest["gradcam"]
    assert section["layer"] == "conv_b" and section["scores"] == "softmax"
    assert section["gradient_of"] == "logit" and section["num_classes"] == 4
    assert [c["class"] for c in section["classes"]] == [2, 0]
    assert [c["name"] for c in section["classes"]] == ["bird", "cat"]
    assert len(section["predictions"]) == 4 and all("name" in p for p in section["predictions"])
    assert result.manifest["layers"] == []
    size = tuple(result.manifest["preprocessing"]["size"])
    for entry in section["classes"]:
        names = gradcam_names(entry["class"])
        assert {entry[k] for k in ("heatmap", "overlay", "values")} == set(names.values())
        heat = Image.open(io.BytesIO(result.files[names["heatmap"]]))
        overlay = Image.open(io.BytesIO(result.files[names["overlay"]]))
        assert (heat.height, heat.width) == size == (overlay.height, overlay.width)
        assert overlay.mode == "RGB"
        values = np.load(io.BytesIO(result.files[names["values"]]), allow_pickle=False)
        assert values.dtype == np.float16 and values.shape == tuple(section["layer_shape"][:2])
        assert float(values.min()) >= 0.0 and float(values.max()) <= 1.0
        assert entry["empty"] == (float(values.max()) == 0.0)
    json.dumps(result.manifest, allow_nan=False)


def test_a_pass_records_each_images_wall_from_its_end_waits_included(model_files, settings):  # noqa: ANN001
    """`gradcam_render_wall`: from the pass's end to the image's files, so an image
    rendered after the others (one thread, in order) waited for theirs."""
    from worker.engine.cam_pass import CamPass
    from worker.engine.forward_pass import PassImage, run_inline

    loaded = open_model(model_files["softmax"])
    options = JobOptions()
    cam, key, row = cam_of(loaded, options)
    items = [
        PassImage(prepare_cam_image(d, loaded, cam, key, options, settings), options)
        for d in images(3)
    ]
    futures = CamPass(loaded, cam, key, items, [row] * 3, settings).run(run_inline)
    timings = [future.result().manifest["timings_ms"] for future in futures]
    renders = [t["gradcam_render"] for t in timings]
    for position, t in enumerate(timings):
        assert t["gradcam_render_wall"] >= sum(renders[: position + 1]) > 0, timings


def test_grad_cam_plus_plus_and_a_second_layer_compile_their_own_programs(model_files):  # noqa: ANN001
    loaded = open_model(model_files["residual"])
    assert loaded.cam("stem") is loaded.cam("stem")  # kept warm
    assert loaded.cam("stem") is not loaded.cam(None)
    assert loaded.cam(None).ref.name == "pool"


def test_a_layer_without_an_hwc_output_fails_invalid_job_naming_the_valid_layers(model_files):  # noqa: ANN001
    loaded = open_model(model_files["softmax"])
    with pytest.raises(InvalidJob) as failed:
        loaded.cam("flatten")
    assert "not (H, W, C)" in failed.value.message
    assert "conv_a, pool_a, conv_b" in failed.value.message
    with pytest.raises(InvalidJob) as failed:
        loaded.cam("conv_c")
    assert "conv_a, pool_a, conv_b" in failed.value.message
    with pytest.raises(InvalidJob, match="selects 2 layers"):
        loaded.cam("Conv2D")


def test_a_layer_off_the_path_to_the_output_fails_invalid_job() -> None:
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, name="trunk")(inputs)
    side = keras.layers.Conv2D(2, 3, name="side")(inputs)
    logits = keras.layers.Dense(3, name="logits")(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, [logits, side])
    with pytest.raises(InvalidJob) as failed:
        build_cam_model(model, flatten_layers(model), "side")
    assert "not on the way to the model's output" in failed.value.message
    assert "trunk" in failed.value.message
    assert build_cam_model(model, flatten_layers(model), None).ref.name == "trunk"


def test_the_default_layer_is_the_last_map_larger_than_one_pixel() -> None:
    """MobileNetV3's head: pooled to 1 x 1, then 1 x 1 convolutions up to the logits. By
    default Grad-CAM weighs the last map before that pool; a 1 x 1 layer named is used."""
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, activation="relu", name="last_map")(inputs)
    x = keras.layers.GlobalAveragePooling2D(keepdims=True, name="pool")(x)
    x = keras.layers.Conv2D(8, 1, activation="relu", name="head_conv")(x)
    x = keras.layers.Conv2D(3, 1, name="logits")(x)
    outputs = keras.layers.Softmax(name="probs")(keras.layers.Flatten(name="flat")(x))
    model = keras.Model(inputs, outputs)
    refs = flatten_layers(model)
    assert build_cam_model(model, refs, None).ref.name == "last_map"
    named = build_cam_model(model, refs, "head_conv")
    assert named.ref.name == "head_conv" and tuple(named.ref.output_shape) == (1, 1, 8)
    # Where every map is 1 x 1, the last of them.
    small = keras.Input((1, 1, 3))
    head = keras.layers.Conv2D(2, 1, name="only")(small)
    tiny = keras.Model(small, keras.layers.Flatten()(head))
    assert build_cam_model(tiny, flatten_layers(tiny), None).ref.name == "only"


def test_a_class_out_of_range_fails_invalid_job_naming_the_class_count(model_files, settings):  # noqa: ANN001
    loaded = open_model(model_files["softmax"])
    with pytest.raises(InvalidJob, match="the model has 4 classes"):
        analyze_cam(loaded, images(1), JobOptions(classes=[4]), settings)


def test_top_above_the_class_count_explains_every_class(model_files, settings):  # noqa: ANN001
    loaded = open_model(model_files["sequential_h5"])  # one sigmoid output
    (result,) = analyze_cam(loaded, images(1), JobOptions(top=3), settings)
    assert [c["class"] for c in result.manifest["gradcam"]["classes"]] == [0]
    assert result.manifest["gradcam"]["scores"] == "raw"


def test_a_head_without_a_gradient_fails_not_differentiable() -> None:
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    x = keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x))
    ids = keras.layers.Discretization(bin_boundaries=[0.0], name="bucket")(x)
    model = keras.Model(inputs, ids)
    with pytest.raises(NotDifferentiable, match="floating point"):
        build_cam_model(model, flatten_layers(model), None)


def test_a_model_without_a_classifier_output_fails_invalid_job() -> None:
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    model = keras.Model(inputs, keras.layers.Reshape((14, 56))(x))  # (batch, 14, 56)
    with pytest.raises(
        InvalidJob, match=r"must be \(batch, classes\), or \(batch, H, W, classes\)"
    ):
        build_cam_model(model, flatten_layers(model), None)


@pytest.mark.parametrize("region", ["image", "predicted"])
@pytest.mark.parametrize("method", ["gradcam", "gradcam++"])
def test_a_segmentation_model_is_explained_per_class_over_its_region(
    tmp_path: Path, settings, method: str, region: str
) -> None:  # noqa: ANN001
    """Seg-Grad-CAM, as pytorch-grad-cam's SemanticSegmentationTarget: the gradient of
    the class's logits summed over the region (every pixel; or those whose argmax is
    the class, its tutorial's mask); its score, the mean of its probabilities over
    every pixel. Against the recipe written with a GradientTape on the model without
    its softmax."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("the reference is written with TensorFlow's GradientTape")
    path = tmp_path / "unet.keras"
    models.segmentation_cnn().save(path)
    loaded = open_model(path)
    every = [0, 1, 2, 3]
    options = JobOptions(classes=every, method=method, region=region)
    cam, cam_key, row = cam_of(loaded, options)
    assert cam.ref.name == "decode" and cam.pixels and cam.softmax and cam.classes == 4
    x = pixels_for(loaded, options, settings)
    got = cam.run(x, np.array([row] * len(x)), cam_key)
    logits = keras.saving.load_model(path, compile=False)
    logits.layers[-1].activation = None
    grad_model = keras.Model(logits.inputs, [logits.get_layer("decode").output, logits.output])
    probs = keras.ops.convert_to_numpy(keras.ops.softmax(grad_model(x)[1], axis=-1))
    mask = np.ones_like(probs) if region == "image" else np.eye(4)[probs.argmax(axis=-1)]
    assert region == "image" or mask.mean(axis=(0, 1, 2)).min() > 0  # each class has pixels
    shown = 0
    for slot, cls in enumerate(every):
        with tf.GradientTape() as tape:
            acts, out = grad_model(x)
            score = tf.reduce_sum(out[..., cls] * mask[..., cls])
        grads = tape.gradient(score, acts).numpy()
        want = (gradcam_pp_from if method == "gradcam++" else gradcam_from)(acts.numpy(), grads)
        np.testing.assert_allclose(got["maps"][:, slot], want, atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(
            got["class_scores"][:, slot], probs[..., cls].mean(axis=(1, 2)), rtol=1e-5
        )
        shown += int((want.max(axis=(1, 2)) > 0).sum())
    assert shown >= len(x), "the reference heatmaps are mostly empty: the case shows little"
    (job,) = analyze_cam(loaded, images(1), JobOptions(top=4, region=region), settings)
    section = job.manifest["gradcam"]
    assert section["target"] == "pixels" and section["layer"] == "decode"
    assert section["region"] == region
    assert section["scores"] == "softmax" and section["gradient_of"] == "logit"
    # Every pixel's probabilities sum to 1: so do the classes' shares of the image.
    assert sum(p["score"] for p in section["predictions"]) == pytest.approx(1.0, abs=1e-5)
    assert describe_model(loaded)["gradcam"]["target"] == "pixels"
    page = render_report(job.manifest)["index.html"].decode()
    assert "summed over every pixel" in page and "share of the pixels" in page


def test_a_per_pixel_head_is_not_a_layer_grad_cam_uses() -> None:
    model = models.segmentation_cnn()
    with pytest.raises(InvalidJob, match="Layers it can use: .*decode"):
        build_cam_model(model, flatten_layers(model), "seg")


def test_a_region_is_invalid_job_for_a_classifier_and_unknown_ones_are_refused(model_files):  # noqa: ANN001
    loaded = open_model(model_files["softmax"])
    with pytest.raises(InvalidJob, match="applies to a per-pixel"):
        loaded.cam(None, "predicted")
    with pytest.raises(ValueError, match="region 'mask' unknown"):
        JobOptions(region="mask").validate()


@pytest.mark.parametrize("structure", ["list", "dict"])
def test_a_multi_output_model_explains_its_class_head_as_its_single_output_twin(
    tmp_path: Path, settings, structure: str
) -> None:  # noqa: ANN001
    """A detector's or multi-task model's outputs: a box regression (batch, 4), listed
    first (a dict's are flattened by key: "box" before "cls"), and the softmax class
    head. Grad-CAM explains the class head, and says so; its maps are those of the
    same model with that output alone."""
    inputs = keras.Input((24, 24, 3))
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv_a")(inputs)
    x = keras.layers.Conv2D(6, 3, activation="relu", name="conv_b")(x)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    box = keras.layers.Dense(4, name="box")(pooled)
    cls = keras.layers.Dense(3, activation="softmax", name="cls")(pooled)
    outputs = [box, cls] if structure == "list" else {"cls": cls, "box": box}
    several, alone = tmp_path / "several.keras", tmp_path / "alone.keras"
    keras.Model(inputs, outputs).save(several)
    keras.Model(inputs, cls).save(alone)
    data = images(2)
    (mine, _), (theirs, _) = (
        analyze_cam(open_model(path), data, JobOptions(top=2), settings)
        for path in (several, alone)
    )
    assert mine.manifest["gradcam"]["output"] == "cls"
    assert "output" not in theirs.manifest["gradcam"]
    for key in ("layer", "num_classes", "scores", "predictions", "classes"):
        assert mine.manifest["gradcam"][key] == theirs.manifest["gradcam"][key], key
    heatmaps = [key for key in theirs.files if key.startswith("gradcam/")]
    assert heatmaps and all(mine.files[key] == theirs.files[key] for key in heatmaps)
    assert describe_model(open_model(several))["gradcam"]["output"] == "cls"


def test_an_image_whose_grad_cam_would_hold_too_much_fails_activations_too_large(model_files):  # noqa: ANN001
    from producer.errors import ActivationsTooLarge
    from producer.settings import Settings

    loaded = open_model(model_files["softmax"])
    (outcome,) = analyze_cam(loaded, images(1), JobOptions(), Settings(max_image_activation_mb=0))
    assert isinstance(outcome, ActivationsTooLarge)
    assert "Grad-CAM at layer 'conv_b'" in outcome.message
    assert "ACTVIZ_MAX_IMAGE_ACTIVATION_MB" in outcome.message


FRESH_PROCESS = """
import json, sys
from producer.contract import JobOptions
from producer.settings import Settings
from worker.engine import Artifacts, analyze, open_model
from worker.engine.cam_pass import analyze_cam
loaded = open_model(sys.argv[1])
data = open(sys.argv[2], "rb").read()
(cam,) = analyze_cam(loaded, [data], JobOptions(), Settings())
(acts,) = analyze(loaded, [data], JobOptions(), Settings())
print(json.dumps([type(cam).__name__, cam.manifest["gradcam"]["layer"], type(acts).__name__]))
"""


@pytest.mark.parametrize("channels_first", [False, True])
def test_layers_of_kerass_default_names_are_explained_in_a_fresh_process(
    tmp_path: Path, channels_first: bool
) -> None:
    """Keras names a model's first Add layer "add", as it names the first `keras.ops.add`
    of a process: a Grad-CAM graph holding both would be refused. A worker is a fresh
    process; so is this test's."""
    fmt = "channels_first" if channels_first else "channels_last"
    inputs = keras.Input((3, 24, 24) if channels_first else (24, 24, 3))
    a = keras.layers.Conv2D(4, 3, padding="same", data_format=fmt, name="conv2d")(inputs)
    b = keras.layers.Conv2D(4, 3, padding="same", data_format=fmt, name="conv2d_1")(a)
    x = keras.layers.Add(name="add")([a, b])
    x = keras.layers.GlobalAveragePooling2D(data_format=fmt, name="transpose")(x)
    probs = keras.layers.Dense(3, activation="softmax", name="dense")(x)
    path = tmp_path / "default_names.keras"
    keras.Model(inputs, probs).save(path)
    image = tmp_path / "image.png"
    image.write_bytes(image_bytes(seed=3))
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(root), TF_CPP_MIN_LOG_LEVEL="2")
    done = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(path), str(image)],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == ["Artifacts", "add", "Artifacts"]
