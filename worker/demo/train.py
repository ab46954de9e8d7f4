"""Train the demo CNN: `python -m worker.demo.train`.

The demo needs a trained network, so that its grids show learned edge and colour
detectors rather than random filters, and it must build without a network. The
training data is therefore one real photo that an installed package ships
(matplotlib's sample photo of Grace Hopper), and the task is self-supervised
rotation prediction (RotNet): given a random crop turned by 0, 90, 180 or 270
degrees, say which. Telling "up" from "sideways" needs oriented edges and
shading, which is what the first layers learn.

The convolutional stack is the classic small recipe (Conv2D + MaxPooling2D four
times, 32-64-128-128 filters, 3x3 but 5x5 first, ReLU) for a 150x150x3 input. Because it ends
in global average pooling, the same weights run at any size: training uses
64x64 crops (about 5x cheaper), and the saved model is rebuilt at 150x150 with
the trained weights. Held-out accuracy is measured on crops from the bottom
rows of the photo, which training never sees, and on a second shipped photo.

Writes demo_cnn.keras, demo_photo.jpg and model_card.json next to this file.
Seeds are fixed; on 2 CPU cores training takes about two minutes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
INPUT_SIZE = 150
TRAIN_SIZE = 64
HOLDOUT_ROWS = 150  # bottom rows of the training photo kept out of training
SEED = 1234


def load_photo(name: str) -> Image.Image:
    """A sample photo that matplotlib ships, as RGB (alpha composited on white)."""
    from matplotlib import cbook

    with Image.open(cbook.get_sample_data(name, asfileobj=False)) as img:
        img.load()
        if img.mode == "RGBA":
            canvas = Image.new("RGB", img.size, (255, 255, 255))
            canvas.paste(img, mask=img.getchannel("A"))
            return canvas
        return img.convert("RGB")


def sample_crops(
    photo: Image.Image, count: int, rng: np.random.Generator, *, jitter: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Random square crops, resized to TRAIN_SIZE and rotated by k*90 degrees.

    Returns (x, y): x is (count, TRAIN_SIZE, TRAIN_SIZE, 3) float32 in [0, 1],
    y is (count,) int32 in 0..3 (the number of quarter turns).
    """
    width, height = photo.size
    smallest = min(96, width, height)
    x = np.empty((count, TRAIN_SIZE, TRAIN_SIZE, 3), np.float32)
    y = rng.integers(0, 4, size=count).astype(np.int32)
    for i in range(count):
        side = int(rng.integers(smallest, min(width, height, 320) + 1))
        left = int(rng.integers(0, width - side + 1))
        top = int(rng.integers(0, height - side + 1))
        crop = photo.crop((left, top, left + side, top + side))
        crop = crop.resize((TRAIN_SIZE, TRAIN_SIZE), Image.BILINEAR)
        pixels = np.asarray(crop, np.float32) / 255.0
        if jitter:
            if rng.random() < 0.5:
                pixels = pixels[:, ::-1]
            gains = rng.uniform(0.8, 1.2, size=3).astype(np.float32)
            pixels = np.clip(pixels * gains + rng.uniform(-0.1, 0.1), 0.0, 1.0)
        x[i] = np.rot90(pixels, k=int(y[i]))
    return x, y


def build_model(size: int | None):
    """The demo CNN. size=None builds the fully convolutional training variant."""
    import keras
    from keras import layers

    inputs = keras.Input((size, size, 3), name="image")
    h = inputs
    for block, filters in enumerate((32, 64, 128, 128), start=1):
        # A 5x5 first layer has room for visibly oriented edge filters.
        kernel = 5 if block == 1 else 3
        h = layers.Conv2D(filters, kernel, activation="relu", name=f"conv{block}")(h)
        if block < 4:
            h = layers.MaxPooling2D(2, name=f"pool{block}")(h)
    h = layers.GlobalAveragePooling2D(name="gap")(h)
    outputs = layers.Dense(4, activation="softmax", name="rotation")(h)
    return keras.Model(inputs, outputs, name="actviz_demo_cnn")


def train(epochs: int, train_count: int, out_dir: Path) -> dict:
    """Train, save the model and copy the demo photo; returns the model card."""
    import keras

    keras.utils.set_random_seed(SEED)
    rng = np.random.default_rng(SEED)
    photo = load_photo("grace_hopper.jpg")
    width, height = photo.size
    train_part = photo.crop((0, 0, width, height - HOLDOUT_ROWS))
    held_part = photo.crop((0, height - HOLDOUT_ROWS, width, height))
    x_train, y_train = sample_crops(train_part, train_count, rng, jitter=True)
    x_held, y_held = sample_crops(held_part, 512, rng, jitter=False)
    x_other, y_other = sample_crops(
        load_photo("Minduka_Present_Blue_Pack.png"), 512, rng, jitter=False
    )

    model = build_model(None)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    started = time.perf_counter()
    history = model.fit(x_train, y_train, batch_size=64, epochs=epochs, shuffle=True, verbose=2)
    seconds = time.perf_counter() - started
    held_acc = float(model.evaluate(x_held, y_held, verbose=0)[1])
    other_acc = float(model.evaluate(x_other, y_other, verbose=0)[1])

    final = build_model(INPUT_SIZE)
    final.set_weights(model.get_weights())
    out_dir.mkdir(parents=True, exist_ok=True)
    final.save(out_dir / "demo_cnn.keras")
    shutil.copyfile(_sample_path("grace_hopper.jpg"), out_dir / "demo_photo.jpg")
    card = {
        "name": "actviz_demo_cnn",
        "task": "self-supervised rotation prediction (RotNet): 4 classes, "
        "0/90/180/270 degree quarter turns of a square crop",
        "architecture": "Conv2D 32 (5x5), 64, 128, 128 (3x3), ReLU, MaxPooling2D(2) between, "
        "GlobalAveragePooling2D, Dense(4, softmax)",
        "input_shape": [INPUT_SIZE, INPUT_SIZE, 3],
        "preprocessing": "RGB scaled to [0, 1] (job option scale '1/255')",
        "params": int(final.count_params()),
        "training_data": f"{train_count} random square crops (96-320 px, resized to "
        f"{TRAIN_SIZE}x{TRAIN_SIZE}, random flip and colour gain) of the top "
        f"{height - HOLDOUT_ROWS} rows of matplotlib's sample photo grace_hopper.jpg",
        "training_size": [TRAIN_SIZE, TRAIN_SIZE, 3],
        "epochs": epochs,
        "batch_size": 64,
        "optimizer": "Adam(1e-3)",
        "seed": SEED,
        "train_seconds": round(seconds, 1),
        "final_train_accuracy": round(float(history.history["accuracy"][-1]), 4),
        "heldout": {
            "bottom_rows_accuracy": round(held_acc, 4),
            "bottom_rows_description": f"512 crops from the bottom {HOLDOUT_ROWS} rows of "
            "grace_hopper.jpg, never seen in training",
            "other_photo_accuracy": round(other_acc, 4),
            "other_photo_description": "512 crops of matplotlib's sample photo "
            "Minduka_Present_Blue_Pack.png, never seen in training",
            "chance": 0.25,
        },
        "demo_photo": {
            "file": "demo_photo.jpg",
            "provenance": "grace_hopper.jpg from matplotlib's mpl-data/sample_data "
            "(official U.S. Navy portrait of Rear Admiral Grace M. Hopper, a work of "
            "the U.S. government in the public domain), copied unchanged",
        },
        "keras_version": keras.__version__,
    }
    (out_dir / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    return card


def _sample_path(name: str) -> str:
    from matplotlib import cbook

    return str(cbook.get_sample_data(name, asfileobj=False))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--crops", type=int, default=8192)
    parser.add_argument("--out", type=Path, default=HERE)
    args = parser.parse_args(argv)
    card = train(args.epochs, args.crops, args.out)
    print(json.dumps(card["heldout"], indent=2))


if __name__ == "__main__":
    main()
