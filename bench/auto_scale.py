"""How wrong the classic x / 255 is for models that scale their own input.

Not a speed. Keras's applications that carry their preprocessing (EfficientNetB0,
MobileNetV3Small: a Rescaling in front) and the Keras tutorials' classifier
(`Rescaling(1. / 255)` first), with random weights, 96 x 96 x 3, each saved and
opened by actviz: for four of its convolutions, the relative L2 distance between
the activations of one image fed as the scale 'auto' chooses (the pixels) and as
x / 255 (what every job fed them before 'auto'), and the two activations' spreads.
A distance near 1 means the grids and statistics of x / 255 say nothing of what
the model computes on the images it learnt from.

    python bench/auto_scale.py
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

import numpy as np

SIDE = 96


def models() -> dict:
    import keras

    layers = keras.layers
    inputs = keras.Input((SIDE, SIDE, 3))
    x = layers.Rescaling(1.0 / 255)(inputs)
    for filters in (16, 32, 64, 64):
        x = layers.MaxPooling2D()(layers.Conv2D(filters, 3, activation="relu")(x))
    tutorial = keras.Model(inputs, layers.Dense(2)(layers.Flatten()(x)), name="tutorial")
    shape = (SIDE, SIDE, 3)
    return {
        "tutorial (Rescaling(1/255) first)": tutorial,
        "EfficientNetB0": keras.applications.EfficientNetB0(weights=None, input_shape=shape),
        "MobileNetV3Small": keras.applications.MobileNetV3Small(weights=None, input_shape=shape),
    }


def photo() -> bytes:
    from PIL import Image

    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[0:SIDE, 0:SIDE] / SIDE
    pixels = np.stack([xx, yy, (xx + yy) / 2], axis=-1) * 200 + rng.normal(0, 12, (SIDE, SIDE, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import keras

    from producer.contract import JobOptions
    from producer.settings import Settings
    from worker.engine import extract, open_model, preprocess

    keras.utils.set_random_seed(0)
    data, settings = photo(), Settings()
    print(f"{'model':36} {'layer':24} {'L2 distance':>11} {'std auto':>10} {'std x/255':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, model in models().items():
            path = Path(tmp) / f"{model.name}.keras"
            model.save(path)
            loaded = open_model(path)
            convs = [ref for ref in loaded.layers if ref.class_name == "Conv2D"]
            refs = [convs[int(i)] for i in np.linspace(0, len(convs) - 1, 4)]
            seen = {}
            for scale in ("auto", "1/255"):
                options = JobOptions(scale=scale)
                x = preprocess(data, loaded.input_shape, options, settings, loaded.auto_scale)
                seen[scale] = extract(loaded, x.pixels[None], refs)
            print(f"{name}: auto = {loaded.auto_scale.scale!r}, {loaded.auto_scale.why}")
            for ref, a, b in zip(refs, seen["auto"], seen["1/255"], strict=True):
                distance = float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-30))
                print(
                    f"{'':36} {ref.name[:24]:24} {distance:11.3f} {a.std():10.3g} {b.std():10.3g}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
