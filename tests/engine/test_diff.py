"""Diffs of two models: a model against itself, and against a copy with one layer perturbed."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest
from sample_images import image_bytes

from producer.contract import JobOptions
from producer.errors import InvalidJob
from worker.engine import open_model
from worker.engine.diff import channel_correlation, diff_image


def perturbed_copy(path: Path, layer: str, out: Path) -> Path:
    """The model at `path`, saved again with `layer`'s kernel nudged."""
    model = keras.saving.load_model(path, compile=False)
    weights = model.get_layer(layer).get_weights()
    noise = np.random.default_rng(0).standard_normal(weights[0].shape).astype("float32")
    weights[0] = weights[0] + 0.05 * noise
    model.get_layer(layer).set_weights(weights)
    target = out / f"perturbed-{layer}.keras"
    model.save(target)
    return target


def test_a_model_diffed_with_itself_is_zero_everywhere(model_files, settings) -> None:  # noqa: ANN001
    a = open_model(model_files["residual"])
    b = open_model(model_files["residual"])  # loaded twice: two objects, same weights
    result = diff_image(a, b, image_bytes(seed=2), JobOptions(), settings)
    diff = result.manifest["diff"]
    assert diff["first_divergent"] is None and diff["unmatched"] == []
    assert [layer["name"] for layer in diff["layers"]] == [r.name for r in a.select(None)]
    for layer in diff["layers"]:
        assert layer["relative_l2"] == 0.0 and layer["max_abs_diff"] == 0.0
        assert layer["mean_correlation"] == 1.0
        assert layer["sparsity_change"] == 0.0 and layer["mean_change"] == 0.0
        assert set(layer["grids"]) == {"a", "b", "delta"}
        assert result.files[layer["grids"]["a"]] == result.files[layer["grids"]["b"]]


@pytest.mark.parametrize(
    ("model", "layer"),
    [("residual", "block1_sep"), ("residual", "block2_sep"), ("nested", "features/inner_conv_b")],
)
def test_a_perturbed_layer_is_the_first_divergence_and_nothing_before_it_moves(
    model: str, layer: str, model_files, tmp_path: Path, settings
) -> None:  # noqa: ANN001
    a = open_model(model_files[model])
    inner = layer.rsplit("/", 1)[-1]
    if "/" in layer:  # a nested model's layer: perturb it through its container
        loaded = keras.saving.load_model(model_files[model], compile=False)
        container = loaded.get_layer(layer.split("/")[0])
        weights = container.get_layer(inner).get_weights()
        weights[0] = weights[0] + 0.05
        container.get_layer(inner).set_weights(weights)
        path = tmp_path / "nested-perturbed.keras"
        loaded.save(path)
    else:
        path = perturbed_copy(model_files[model], layer, tmp_path)
    b = open_model(path)
    options = JobOptions(layers=":" if model == "residual" else None, threshold=1e-6)
    diff = diff_image(a, b, image_bytes(seed=3), options, settings).manifest["diff"]
    assert diff["first_divergent"] == layer
    names = [entry["name"] for entry in diff["layers"]]
    position = names.index(layer)
    for entry in diff["layers"][:position]:
        assert entry["relative_l2"] == 0.0, entry["name"]
    assert diff["layers"][position]["relative_l2"] > 1e-3


def test_layers_that_do_not_match_are_listed_not_dropped(model_files, tmp_path, settings) -> None:  # noqa: ANN001
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import models

    renamed = models.softmax_cnn()
    renamed.get_layer("conv_b").name = "conv_b2"  # the same layer, another name
    path = tmp_path / "renamed.keras"
    renamed.save(path)
    a, b = open_model(model_files["softmax"]), open_model(path)
    by_name = diff_image(a, b, image_bytes(seed=1), JobOptions(), settings).manifest["diff"]
    assert [entry["name"] for entry in by_name["layers"]] == ["conv_a", "pool_a"]
    unmatched = {(u["model"], u["name"]) for u in by_name["unmatched"]}
    assert ("a", "conv_b") in unmatched and ("b", "conv_b2") in unmatched
    by_index = diff_image(a, b, image_bytes(seed=1), JobOptions(match="index"), settings)
    layers = by_index.manifest["diff"]["layers"]
    assert [(e["name"], e["partner"]) for e in layers][-1] == ("conv_b", "conv_b2")
    assert all(e["relative_l2"] == 0.0 for e in layers)  # same seed, same weights
    other = open_model(model_files["nested"])  # other names and shapes everywhere
    with pytest.raises(InvalidJob, match="no layer of the two models matches") as failed:
        diff_image(
            open_model(model_files["residual"]),
            other,
            image_bytes(seed=1),
            JobOptions(match="index"),
            settings,
        )
    assert "output shapes differ" in failed.value.message


def test_models_with_different_inputs_are_refused(model_files, settings) -> None:  # noqa: ANN001
    a = open_model(model_files["residual"])
    b = open_model(model_files["wide"])
    with pytest.raises(InvalidJob, match="different inputs"):
        diff_image(a, b, image_bytes(seed=1), JobOptions(), settings)


def test_channel_correlation_matches_numpy_and_handles_constant_channels() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 4))
    y = x * 2.0 + rng.standard_normal((50, 4)) * 0.1
    x[:, 2] = y[:, 2] = 0.0  # both dead: equal
    y[:, 3] = 1.0  # one constant
    r = channel_correlation(x, y)
    for c in (0, 1):
        assert r[c] == pytest.approx(np.corrcoef(x[:, c], y[:, c])[0, 1], abs=1e-12)
    assert r[2] == 1.0 and r[3] == 0.0


def test_a_diff_over_the_activation_limit_fails_activations_too_large(model_files) -> None:  # noqa: ANN001
    from producer.errors import ActivationsTooLarge
    from producer.settings import Settings

    a = open_model(model_files["residual"])
    with pytest.raises(ActivationsTooLarge, match="the two models' selected layers make"):
        diff_image(a, a, image_bytes(seed=1), JobOptions(), Settings(max_image_activation_mb=0))
