"""Engine benchmark: the classic notebook recipe vs `analyze()`, in one run.

On the classic cats-vs-dogs CNN (4x Conv2D + MaxPooling2D on 150x150x3, Dense
head, random weights) and one image, for the first 8 layers (spec ":8"):

  a  forward   the cached multi-output extractor alone, on a preprocessed batch
  b  classic   load_img + x/255, keras.Model(inputs, [l.output for l in
               model.layers[:8]]).predict(x), then per layer the book's
               display_grid (16 channels per row, per-channel mean/std * 64 + 128)
               shown with plt.imshow and written with plt.savefig
  c  engine    analyze(): decode + preprocess, forward, every grid PNG,
               per-channel stats, manifest JSON bytes

Warm runs only (one untimed run each first), cases interleaved round by
round; medians over --repeats (--classic-repeats for b).
Targets: b / c >= 10 and c / a <= 8. Never asserts; prints a table.

    python bench/bench_engine.py [--repeats 20] [--classic-repeats 5]
"""

from __future__ import annotations

import argparse
import datetime
import io
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import matplotlib  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from producer.contract import JobOptions  # noqa: E402
from producer.settings import Settings  # noqa: E402
from worker.engine import analyze, manifest_bytes, open_model, preprocess  # noqa: E402

SPEC = ":8"
IMAGES_PER_ROW = 16


def classic_cnn() -> keras.Model:
    keras.utils.set_random_seed(0)
    layers = keras.layers
    stack: list = [keras.Input((150, 150, 3))]
    for filters in (32, 64, 128, 128):
        stack += [layers.Conv2D(filters, 3, activation="relu"), layers.MaxPooling2D(2)]
    stack += [
        layers.Flatten(),
        layers.Dropout(0.5),
        layers.Dense(512, activation="relu"),
        layers.Dense(1, activation="sigmoid"),
    ]
    return keras.Sequential(stack, name="cats_and_dogs_small")


def sample_image(width: int = 320, height: int = 240) -> bytes:
    """A photo-like JPEG: smooth gradients plus noise (seeded)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    base = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin(xx / 17 + yy / 23)], axis=-1)
    pixels = np.clip(base * 220 + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def classic_recipe(model: keras.Model, data: bytes, out_dir: Path) -> None:
    """The book's approach, step by step (Deep Learning with Python, 5.4.1)."""
    img = keras.utils.load_img(io.BytesIO(data), target_size=(150, 150))
    x = keras.utils.img_to_array(img)[None] / 255.0
    layer_outputs = [layer.output for layer in model.layers[:8]]
    activation_model = keras.Model(inputs=model.inputs, outputs=layer_outputs)
    activations = activation_model.predict(x, verbose=0)
    layer_names = [layer.name for layer in model.layers[:8]]
    for layer_name, layer_activation in zip(layer_names, activations, strict=True):
        n_features = layer_activation.shape[-1]
        size = layer_activation.shape[1]
        n_cols = n_features // IMAGES_PER_ROW
        display_grid = np.zeros((size * n_cols, IMAGES_PER_ROW * size))
        for col in range(n_cols):
            for row in range(IMAGES_PER_ROW):
                channel_image = layer_activation[0, :, :, col * IMAGES_PER_ROW + row]
                channel_image -= channel_image.mean()
                channel_image /= channel_image.std()
                channel_image *= 64
                channel_image += 128
                channel_image = np.clip(channel_image, 0, 255).astype("uint8")
                display_grid[col * size : (col + 1) * size, row * size : (row + 1) * size] = (
                    channel_image
                )
        scale = 1.0 / size
        plt.figure(figsize=(scale * display_grid.shape[1], scale * display_grid.shape[0]))
        plt.title(layer_name)
        plt.grid(False)
        plt.imshow(display_grid, aspect="auto", cmap="viridis")
        plt.savefig(out_dir / f"{layer_name}.png")
        plt.close()


def measure(cases: dict[str, tuple[Callable[[], object], int]]) -> dict[str, tuple[float, float]]:
    """{name: (fn, repeats)} -> {name: (median ms, min ms)}.

    Every case runs once untimed (warm: graphs, caches, colormap LUT), then
    the cases take turns round by round, so load from other processes on a
    shared machine falls on all of them alike.
    """
    for fn, _ in cases.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in cases}
    for round_ in range(max(n for _, n in cases.values())):
        for name, (fn, repeats) in cases.items():
            if round_ < repeats:
                started = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - started) * 1000.0)
    return {name: (statistics.median(t), min(t)) for name, t in times.items()}


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, {platform.system()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--classic-repeats", type=int, default=5)
    args = parser.parse_args()

    settings = Settings()
    options = JobOptions(layers=SPEC)
    data = sample_image()
    model = classic_cnn()
    with tempfile.TemporaryDirectory(prefix="actviz-bench-") as tmp:
        path = Path(tmp) / "cats_and_dogs_small.keras"
        model.save(path)
        loaded = open_model(path)
        extractor = loaded.extractor(SPEC)
        batch = preprocess(data, loaded.input_shape, options, settings).pixels[None]
        grids = Path(tmp) / "classic"
        grids.mkdir()

        def engine() -> bytes:
            (result,) = analyze(loaded, [data], options, settings)
            return manifest_bytes(result.manifest)

        timed = measure(
            {
                "a": (lambda: extractor(batch), args.repeats),
                "b": (lambda: classic_recipe(loaded.model, data, grids), args.classic_repeats),
                "c": (engine, args.repeats),
            }
        )
        a, b, c = timed["a"], timed["b"], timed["c"]
        (result,) = analyze(loaded, [data], options, settings)

    rows = [
        ("a  extractor forward pass", a),
        ("b  classic: predict + display_grid/imshow/savefig", b),
        ("c  engine: analyze() + manifest bytes", c),
    ]
    print(f"actviz engine benchmark  {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {machine()}; keras {keras.__version__} ({keras.backend.backend()})")
    print(f"model: {model.name}, 150x150x3, layers '{SPEC}'; image 320x240 JPEG")
    print("classic grids: book approach (display_grid array + plt.imshow + plt.savefig per layer)")
    print()
    print(f"{'case':<52}{'median ms':>12}{'min ms':>10}")
    for name, (med, low) in rows:
        print(f"{name:<52}{med:>12.1f}{low:>10.1f}")
    print()
    print(f"b / c = {b[0] / c[0]:6.1f}x   (target >= 10: engine vs classic)")
    print(f"c / a = {c[0] / a[0]:6.1f}x   (target <= 8: engine vs bare forward pass)")
    stages = result.manifest["timings_ms"]
    print("engine stages (one run, ms): " + ", ".join(f"{k} {v:.1f}" for k, v in stages.items()))


if __name__ == "__main__":
    main()
