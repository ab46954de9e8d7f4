"""tf.keras's applications, saved by tf_keras, opened by actviz: the same outputs?

Each application is built by tf_keras (random weights, 96 x 96 x 3, 5 classes) in a
process of its own, saved as legacy `.h5` and as tf.keras's own `.keras`, and run
on the same images; then actviz's `open_model` (Keras 3, worker/engine/keras2_config.py
adapting what Keras 3 cannot build as it is, worker/engine/keras2_archive.py reading
the `.keras`) runs each file again. Prints each one's largest difference in class
probabilities and which adapted layers it holds; exits 1 if any fails to open or
differs by more than --tolerance. Needs tf_keras (the test extras install it).

    python bench/keras2_applications.py                     # every application below
    python bench/keras2_applications.py MobileNetV3Small ConvNeXtTiny --formats keras
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

APPLICATIONS = (
    "MobileNet", "MobileNetV2", "MobileNetV3Small", "MobileNetV3Large", "EfficientNetB0",
    "EfficientNetV2B0", "Xception", "NASNetMobile", "ConvNeXtTiny", "RegNetX002",
    "RegNetY002", "ResNet50", "ResNet50V2", "DenseNet121", "InceptionV3",
    "InceptionResNetV2", "VGG16",
)  # fmt: skip
SIDE = 96

WRITE = """
import os, sys
import numpy as np
import tf_keras
name, folder = sys.argv[1], sys.argv[2]
model = getattr(tf_keras.applications, name)(weights=None, input_shape=({side}, {side}, 3), classes=5)
model.save(os.path.join(folder, name + ".h5"), save_format="h5")
model.save(os.path.join(folder, name + ".keras"), save_format="keras")
x = np.load(os.path.join(folder, "x.npy"))
np.save(os.path.join(folder, name + ".npy"), model(x, training=False).numpy())
"""


def compare(name: str, fmt: str, folder: Path, x: np.ndarray, tolerance: float) -> bool:
    """Open `name`'s file of format `fmt` with actviz, run it on `x`: within tolerance?"""
    import keras

    from worker.engine import open_model

    label = f"{name} .{fmt}"
    try:
        loaded = open_model(folder / f"{name}.{fmt}")
    except Exception as exc:  # noqa: BLE001 (reported, counted)
        print(f"{label:24s} FAILS to open: {exc}")
        return False
    got = keras.ops.convert_to_numpy(loaded.model(x, training=False))
    diff = float(np.abs(got - np.load(folder / f"{name}.npy")).max())
    adapted = sorted(
        {r.class_name for r in loaded.layers} & {"TFOp", "LayerScale", "CustomScaleLayer"}
    )
    print(f"{label:24s} max |diff| {diff:.1e}  adapted layers: {', '.join(adapted) or '-'}")
    return diff <= tolerance


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=list(APPLICATIONS))
    parser.add_argument("--tolerance", type=float, default=1e-4)
    parser.add_argument("--formats", default="h5,keras", help="comma-separated: h5, keras")
    args = parser.parse_args()
    env = {**os.environ, "TF_USE_LEGACY_KERAS": "1", "TF_CPP_MIN_LOG_LEVEL": "2"}
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras

    failed = 0
    with tempfile.TemporaryDirectory(prefix="actviz-keras2-") as tmp:
        folder = Path(tmp)
        x = np.random.default_rng(0).random((2, SIDE, SIDE, 3), dtype=np.float32) * 255.0
        np.save(folder / "x.npy", x)
        formats = args.formats.split(",")
        print(f"keras {keras.__version__} ({keras.backend.backend()}); tf_keras writes each file")
        for name in args.names:
            written = subprocess.run(
                [sys.executable, "-c", WRITE.format(side=SIDE), name, tmp],
                env=env, capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            if written.returncode:
                print(f"{name:18s} tf_keras could not build it: {written.stderr[-300:]}")
                failed += 1
                continue
            for fmt in formats:
                failed += not compare(name, fmt, folder, x, args.tolerance)
    print("PASS" if not failed else f"FAIL: {failed} of {len(args.names) * len(formats)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
