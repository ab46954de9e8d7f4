"""The shipped demo model: small, safe to load, and trained (not random weights)."""

from __future__ import annotations

import numpy as np
from PIL import Image

from worker.demo import image_path, model_card, model_path


def test_demo_files_ship_with_the_package_and_are_small() -> None:
    assert model_path().suffix == ".keras" and model_path().stat().st_size < 2 * 1024 * 1024
    with Image.open(image_path()) as photo:
        assert photo.format == "JPEG" and photo.size == (512, 600)


def test_model_card_describes_the_shipped_model() -> None:
    from worker.engine import open_model

    card = model_card()
    loaded = open_model(str(model_path()), uri="builtin:demo", trusted=False)
    assert list(loaded.input_shape) == card["input_shape"] == [150, 150, 3]
    assert loaded.model.count_params() == card["params"]
    held = card["heldout"]
    assert held["bottom_rows_accuracy"] > held["chance"]
    assert {"training_data", "task", "epochs", "demo_photo"} <= set(card)


def test_demo_model_tells_which_way_up_the_demo_photo_is() -> None:
    """Trained on rotation prediction, it names each quarter turn of the whole photo."""
    from worker.engine import open_model

    model = open_model(str(model_path()), uri="builtin:demo", trusted=False).model
    with Image.open(image_path()) as photo:
        pixels = np.asarray(photo.convert("RGB").resize((150, 150), Image.BILINEAR), np.float32)
    turns = np.stack([np.rot90(pixels / 255.0, k) for k in range(4)])
    predicted = np.argmax(model.predict(turns, verbose=0), axis=1)
    assert predicted.tolist() == [0, 1, 2, 3]
