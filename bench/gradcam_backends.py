"""Grad-CAM on every backend: one backend's heatmaps against TensorFlow's, on the same models.

TensorFlow's maps are the ones the test suite checks against an independent
GradientTape computation of the recipe (tests/engine/test_gradcam.py). This
script carries them to a machine with another backend (JAX or torch, often a
GPU node without TensorFlow):

    python bench/gradcam_backends.py write REF_DIR                       # TensorFlow
    KERAS_BACKEND=jax   python bench/gradcam_backends.py check REF_DIR   # elsewhere
    KERAS_BACKEND=torch python bench/gradcam_backends.py check REF_DIR

`write` saves the test models (Sequential with a softmax head, functional,
nested, .h5, one that takes (batch, H, W), channels-first, a U-Net's per-pixel
softmax), random inputs and the maps of every
class for both methods and for the top-2 predictions. `check` recomputes them, float32 matmuls at full
precision (no TF32), and prints the largest difference; it exits 1 above 1e-4.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

TOLERANCE = 1e-4
LAYERS = {
    "softmax": "conv_b",
    "residual": "block2_add",
    "nested": "features/inner_conv_b",
    "seq_h5": "conv2d_2",
    "gray_hw": "conv_b",
    "channels_first": "conv_b",
    "segmentation": "decode",
}


def cases(loaded, layer: str):  # noqa: ANN001, ANN201
    from producer.contract import JobOptions

    every = list(range(loaded.cam(layer).classes))
    for method in ("gradcam", "gradcam++"):
        yield method, JobOptions(classes=every, layer=layer, method=method)
    yield "top-2", JobOptions(top=2, predictions=3)


def run(loaded, options, x: np.ndarray) -> dict[str, np.ndarray]:  # noqa: ANN001
    from worker.engine.cam_pass import cam_of

    cam, key, row = cam_of(loaded, options)
    return cam.run(x, np.array([row] * len(x)), key)


def write(out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import models

    from worker.engine import open_model

    out.mkdir(parents=True, exist_ok=True)
    files = {
        "softmax": models.save_softmax_keras(out),
        "residual": models.save_residual_keras(out),
        "nested": models.save_nested_keras(out),
        "seq_h5": models.save_sequential_h5(out),
        "gray_hw": models.save_gray_hw_h5(out),
        "channels_first": models.save_channels_first_keras(out),
        "segmentation": models.save_segmentation_keras(out),
    }
    rng = np.random.default_rng(0)
    arrays = {}
    for name, path in files.items():
        loaded = open_model(path)
        x = arrays[f"{name}/x"] = rng.random((3, *loaded.input_shape), dtype=np.float32)
        for case, options in cases(loaded, LAYERS[name]):
            got = run(loaded, options, x)
            arrays[f"{name}/{case}/maps"] = got["maps"]
            arrays[f"{name}/{case}/classes"] = got["classes"]
    np.savez(out / "maps.npz", **arrays)
    (out / "models.json").write_text(json.dumps({k: v.name for k, v in files.items()}))
    print(f"wrote {len(arrays)} arrays and {len(files)} models to {out}")


def check(ref: Path) -> int:
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
        device = str(jax.devices()[0])
    elif backend == "torch":
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    else:
        device = "default"
    from worker.engine import open_model

    maps = np.load(ref / "maps.npz")
    names = json.loads((ref / "models.json").read_text())
    print(f"backend {backend} on {device}; reference: TensorFlow")
    worst = 0.0
    for name, file in names.items():
        loaded = open_model(ref / file)
        x = maps[f"{name}/x"]
        for case, options in cases(loaded, LAYERS[name]):
            got = run(loaded, options, x)
            same = bool((got["classes"] == maps[f"{name}/{case}/classes"]).all())
            diff = float(np.abs(got["maps"] - maps[f"{name}/{case}/maps"]).max())
            worst = max(worst, diff if same else float("inf"))
            print(f"{name:9s} {case:10s} classes equal {same!s:5s} max |diff| {diff:.2e}")
    verdict = "PASS" if worst <= TOLERANCE else "FAIL"
    print(f"largest difference {worst:.2e} (tolerance {TOLERANCE:g}): {verdict}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if len(sys.argv) != 3 or sys.argv[1] not in ("write", "check"):
        sys.exit(__doc__)
    if sys.argv[1] == "write":
        write(Path(sys.argv[2]))
    else:
        sys.exit(check(Path(sys.argv[2])))
