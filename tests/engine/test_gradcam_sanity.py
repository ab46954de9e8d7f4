"""A sanity check that can fail: Grad-CAM points where a trained model's evidence is.

A small CNN learns a synthetic task decided by one region: an image is class 1
when a solid bright square lies in its top-left quadrant. Both classes also
carry a checkerboard patch of the same size and peak brightness in another
quadrant, so brightness alone decides nothing. Trained, the
model's class-1 heatmaps put most of their mass in that quadrant; an untrained
copy's do not (a randomization check in the spirit of Adebayo et al., 2018).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from worker.engine import flatten_layers
from worker.engine.cam_pass import upsample
from worker.engine.gradcam import build_cam_model

SIDE, SQUARE, REGION = 24, 5, 12  # the deciding region: rows and columns 0..11
SEEDS = (3, 5, 6)
pytestmark = pytest.mark.timeout(300)


def square_at(image: np.ndarray, top: int, left: int) -> None:
    image[top : top + SQUARE, left : left + SQUARE, :] = 1.0


def checkerboard_at(image: np.ndarray, top: int, left: int) -> None:
    rows, cols = np.indices((SQUARE, SQUARE))
    image[top : top + SQUARE, left : left + SQUARE, :] = ((rows + cols) % 2)[:, :, None]


def dataset(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 0.4, (count, SIDE, SIDE, 3)).astype("float32")
    y = rng.integers(0, 2, count)
    for image, label in zip(x, y, strict=True):
        if label:
            square_at(image, *rng.integers(0, REGION - SQUARE + 1, 2))
        # A distractor in one of the other three quadrants, in both classes.
        quadrant = rng.integers(1, 4)
        top = (REGION if quadrant >= 2 else 0) + rng.integers(0, REGION - SQUARE + 1)
        left = (REGION if quadrant != 2 else 0) + rng.integers(0, REGION - SQUARE + 1)
        checkerboard_at(image, top, left)
    return x, y


def classifier(seed: int) -> keras.Model:
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    return keras.Sequential(
        [
            keras.Input((SIDE, SIDE, 3)),
            layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_a"),
            layers.MaxPooling2D(name="pool_a"),
            layers.Conv2D(16, 3, padding="same", activation="relu", name="conv_b"),
            layers.GlobalAveragePooling2D(name="gap"),
            layers.Dense(2, activation="softmax", name="probs"),
        ]
    )


def region_mass(model: keras.Model, x: np.ndarray) -> float:
    """Mean share of the class-1 heatmap (at the input's size) inside the region."""
    cam = build_cam_model(model, flatten_layers(model), "conv_b")
    key, row = cam.key([1], None, "gradcam", 2)
    maps = cam.run(x, np.array([row] * len(x)), key)["maps"][:, 0]
    shares = []
    for heat in maps:
        full = upsample(heat, SIDE, SIDE)
        total = float(full.sum())
        shares.append(float(full[:REGION, :REGION].sum()) / total if total > 0 else 0.0)
    return float(np.mean(shares))


def test_a_trained_model_looks_at_the_deciding_region_and_an_untrained_one_does_not() -> None:
    x, y = dataset(1600, seed=1)
    test_x, test_y = dataset(200, seed=2)
    positives = test_x[test_y == 1][:40]
    learned, untrained = [], []
    # Three trainings, averaged: one seed's model may lean on the distractor more than another's.
    for seed in SEEDS:
        model = classifier(seed)
        model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
        model.fit(x, y, epochs=14, batch_size=64, verbose=0)
        accuracy = float((model.predict(test_x, verbose=0).argmax(axis=1) == test_y).mean())
        assert accuracy > 0.9, f"seed {seed}: the model did not learn the task ({accuracy:.2f})"
        learned.append(region_mass(model, positives))
        untrained.append(region_mass(classifier(seed + 100), positives))
    trained_share, untrained_share = float(np.mean(learned)), float(np.mean(untrained))
    assert trained_share > 0.7, f"trained: {learned} of the heatmaps in the deciding region"
    assert untrained_share < 0.7 and untrained_share < trained_share - 0.2, (learned, untrained)
