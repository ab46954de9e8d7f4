"""A Grad-CAM pass over images of one group, and each image's files and manifest section.

`CamPass` is to Grad-CAM what `ForwardPass` is to activations: `analyze_cam`
(images in process) and the micro-batcher (jobs of a worker) both run their
images through it. Images of one model, Grad-CAM layer, input shape and
`CamKey` share one compiled forward and backward pass (worker/engine/gradcam.py);
each image's heatmaps are then encoded on the caller's pool, and its result
arrives on its own Future.

Per explained class the job folder gets (names: `contract.gradcam_names`):
the heatmap colour-mapped at the input's size (PNG), the heatmap over the
input as the model saw it (PNG), and the raw map at the layer's resolution
(float16 .npy, values in [0, 1]). The manifest's "gradcam" section:

```
"gradcam": {"layer", "layer_index", "layer_shape": [h, w, C], "method",
            "scores": "softmax" | "raw", "gradient_of": "logit" | "output",
            "target": "classes" | "pixels",    # pixels: a per-pixel output, see below
            "region"?: "image" | "predicted",  # pixels only
            "num_classes", "labels": bool, "output"?,  # several outputs: the one explained
            "predictions": [{"class", "name"?, "score"}],     # top P, best first
            "classes": [{"class", "name"?, "score", "rank"?, "requested",
                         "heatmap", "overlay", "values", "peak": [y, x], "empty"}]}
```

A per-pixel output's (a segmentation model's, `"target": "pixels"`) class score
is its mean over every pixel (the share of the image it covers, for
probabilities); the gradient is that of the class's scores summed over the
job's `region`: every pixel, or those the model assigns to the class
(worker/engine/gradcam.py).
"""

from __future__ import annotations

import io
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

import keras
import numpy as np
from PIL import Image

from producer.contract import JobOptions, gradcam_names
from producer.errors import ActvizError
from producer.settings import Settings
from worker.engine.analysis import check_activation_budget, check_options, encoder_pool
from worker.engine.artifacts import Artifacts, image_record, model_record
from worker.engine.forward_pass import PassImage, Submit, cpu_clock, run_inline
from worker.engine.gradcam import CamKey, CamModel
from worker.engine.loading import LoadedModel
from worker.engine.manifest import build_manifest, json_safe
from worker.engine.preprocess import PreparedImage, preprocess
from worker.engine.render import colormap_lut, encode_palette_png, encode_png

OVERLAY_ALPHA = 0.45  # the heatmap's weight over the input


def cam_of(loaded: LoadedModel, options: JobOptions) -> tuple[CamModel, CamKey, list[int]]:
    """The job's CamModel, CamKey and requested row; raises InvalidJob, NotDifferentiable."""
    cam = loaded.cam(options.layer, options.region)
    key, row = cam.key(options.classes, options.top, options.method, options.predictions)
    return cam, key, row


def prepare_cam_image(
    data: bytes,
    loaded: LoadedModel,
    cam: CamModel,
    key: CamKey,
    options: JobOptions,
    settings: Settings,
) -> PreparedImage:
    """Preprocess one image and check what its Grad-CAM pass would hold (as
    `prepare_image` does for activations). Raises InvalidImage, ImageTooLarge,
    ActivationsTooLarge."""
    image = preprocess(data, loaded.input_shape, options, settings, loaded.auto_scale)
    height, width, _ = image.pixels.shape
    check_activation_budget(
        cam.image_bytes(image.pixels.shape, key.count),
        settings,
        f"at the {height}x{width} input, Grad-CAM at layer '{cam.ref.name}' holds {{mb}} "
        "for one image",
        "pick an earlier layer, fewer classes, or raise the limit on a worker with the memory",
    )
    return image


def analyze_cam(
    loaded: LoadedModel, images: list[bytes], options: JobOptions, settings: Settings
) -> list[Artifacts | ActvizError]:
    """Grad-CAM for each image with `loaded`; one result per image, in order.

    Images of one shape share one pass. A slot holds an ActvizError
    (InvalidImage, ImageTooLarge, ActivationsTooLarge) when that image is bad.
    Raises InvalidJob (bad options, layer or class) or NotDifferentiable for all.
    """
    check_options(options, loaded)
    cam, key, row = cam_of(loaded, options)
    results: list[Artifacts | ActvizError | None] = [None] * len(images)
    groups: dict[tuple[int, ...], list[tuple[int, PassImage]]] = defaultdict(list)
    for i, data in enumerate(images):
        started, cpu_started = time.perf_counter(), cpu_clock(settings)
        try:
            image = prepare_cam_image(data, loaded, cam, key, options, settings)
        except ActvizError as exc:
            results[i] = exc
            continue
        timings = {"preprocess": (time.perf_counter() - started) * 1000.0}
        cpu = {"preprocess": (cpu_clock(settings) - cpu_started) * 1000.0}
        groups[image.pixels.shape].append((i, PassImage(image, options, timings, cpu)))
    for members in groups.values():
        items = [item for _, item in members]
        futures = CamPass(loaded, cam, key, items, [row] * len(items), settings).run(
            encoder_pool().submit
        )
        for (i, _), future in zip(members, futures, strict=True):
            results[i] = future.result()
    return [r for r in results if r is not None]


class CamPass:
    """Grad-CAM over `images` (one group: one CamModel and CamKey), then each image's
    Artifacts through `submit`. `number`, `on_finished` and `futures` as in ForwardPass."""

    def __init__(
        self,
        loaded: LoadedModel,
        cam: CamModel,
        key: CamKey,
        images: list[PassImage],
        rows: list[list[int]],
        settings: Settings,
        number: int | None = None,
        on_finished: Callable[[CamPass], None] | None = None,
        futures: list[Future] | None = None,
    ) -> None:
        self.loaded, self.cam, self.key = loaded, cam, key
        self.images, self.rows, self.settings = images, rows, settings
        self.number, self.on_finished = number, on_finished
        self.futures: list[Future] = futures or [Future() for _ in images]
        self.result: dict[str, np.ndarray] = {}
        self._left = len(images)
        self._lock = threading.Lock()

    def run(self, submit: Submit = run_inline) -> list[Future]:
        """The pass here; each image's encoding through `submit`. Errors of the pass propagate."""
        pixels = np.stack([item.image.pixels for item in self.images])
        started, cpu_started = time.perf_counter(), cpu_clock(self.settings)
        self.result = self.cam.run(pixels, np.asarray(self.rows, dtype=np.int32), self.key)
        self._pass_end = time.perf_counter()
        forward_ms = (self._pass_end - started) * 1000.0
        engine_cpu_ms = (cpu_clock(self.settings) - cpu_started) * 1000.0 / len(self.images)
        for item in self.images:
            item.timings["gradcam"] = forward_ms
            if self.settings.stage_cpu:
                item.cpu["engine"] = item.cpu.get("engine", 0.0) + engine_cpu_ms
        for position in range(len(self.images)):
            submit(self._render, position)
        return self.futures

    def _render(self, position: int) -> None:
        future = self.futures[position]
        try:
            item = self.images[position]
            started = time.perf_counter()
            cpu_started = cpu_clock(self.settings)
            picked = {name: array[position] for name, array in self.result.items()}
            section, files = cam_section(self.cam, picked, item.image, item.options)
            done = time.perf_counter()
            item.timings["gradcam_render"] = (done - started) * 1000.0
            # From the pass's end: its own rendering and its wait behind the pass's other
            # images (as an activations pass's `render_wall`).
            item.timings["gradcam_render_wall"] = (done - self._pass_end) * 1000.0
            if self.settings.stage_cpu:
                spent = (cpu_clock(self.settings) - cpu_started) * 1000.0
                item.cpu["encode"] = item.cpu.get("encode", 0.0) + spent
            info: dict[str, Any] = {"size": len(self.images), "position": position}
            if self.number is not None:
                info["number"] = self.number
            future.set_result(cam_artifacts(self.loaded, item, section, files, info))
        except BaseException as exc:  # noqa: BLE001 (the image's own job gets the error)
            if not future.done():
                future.set_exception(exc)
        finally:
            with self._lock:
                self._left -= 1
                last = self._left == 0
            if last and self.on_finished is not None:
                self.on_finished(self)


def cam_artifacts(
    loaded: LoadedModel,
    item: PassImage,
    section: dict[str, Any],
    files: dict[str, bytes],
    batch: dict[str, Any],
) -> Artifacts:
    """A Grad-CAM job's Artifacts: its manifest (no layers, a gradcam section) and files."""
    files = {"input.png": encode_png(item.image.display), **files}
    image, preprocessing = image_record(item.image)
    manifest = build_manifest(
        model=model_record(loaded),
        image=image,
        preprocessing=preprocessing,
        options=item.options,
        engine={"backend": keras.backend.backend(), "keras": keras.__version__},
        layers=[],
        files=list(files),
        timings_ms=item.timings,
        cpu_ms=item.cpu,
        batch=batch,
    )
    manifest["gradcam"] = section
    return Artifacts(manifest=manifest, files=files)


def merge_cam(activations: Artifacts, cam: Artifacts) -> Artifacts:
    """An activations job's Artifacts with its Grad-CAM's section, files and timings added."""
    manifest = dict(activations.manifest)
    files = {**activations.files, **cam.files}
    manifest["gradcam"] = cam.manifest["gradcam"]
    manifest["files"] = sorted(files)
    timings = dict(manifest.get("timings_ms") or {})
    for stage in ("gradcam", "gradcam_render", "gradcam_render_wall"):
        if stage in cam.manifest["timings_ms"]:
            timings[stage] = cam.manifest["timings_ms"][stage]
    manifest["timings_ms"] = timings
    cpu = dict(manifest.get("cpu_ms") or {})
    for stage, ms in (cam.manifest.get("cpu_ms") or {}).items():
        cpu[stage] = round(cpu.get(stage, 0.0) + ms, 3)
    manifest["cpu_ms"] = cpu
    return Artifacts(manifest=manifest, files=files)


def cam_section(
    cam: CamModel, result: dict[str, np.ndarray], image: PreparedImage, options: JobOptions
) -> tuple[dict[str, Any], dict[str, bytes]]:
    """One image's manifest section and files from its slice of a pass's result."""
    labels = options.labels or []
    lut = colormap_lut(options.colormap)
    height, width = image.display.shape[:2]
    ranks = {int(c): r for r, c in enumerate(result["top_classes"])}
    files: dict[str, bytes] = {}
    explained = []
    for slot, index in enumerate(int(c) for c in result["classes"]):
        names = gradcam_names(index)
        raw = np.asarray(result["maps"][slot], dtype=np.float32)
        heat = upsample(raw, height, width)
        indices = np.clip(np.rint(heat * 254.0), 0, 254).astype(np.uint8)
        files[names["heatmap"]] = encode_palette_png(indices, lut)
        files[names["overlay"]] = blend(image.display, lut[indices], OVERLAY_ALPHA)
        files[names["values"]] = npy(raw.astype(np.float16))
        peak_y, peak_x = np.unravel_index(int(np.argmax(heat)), heat.shape)
        entry: dict[str, Any] = {
            "class": index,
            "score": float(result["class_scores"][slot]),
            "requested": options.classes is not None,
            **names,
            "peak": [int(peak_y), int(peak_x)],
            "empty": bool(result["peaks"][slot] <= 0),
        }
        if index in ranks:
            entry["rank"] = ranks[index] + 1
        if index < len(labels):
            entry["name"] = labels[index]
        explained.append(entry)
    predictions = []
    for index, score in zip(result["top_classes"], result["top_scores"], strict=True):
        row: dict[str, Any] = {"class": int(index), "score": float(score)}
        if int(index) < len(labels):
            row["name"] = labels[int(index)]
        predictions.append(row)
    section = {
        "layer": cam.ref.name,
        "layer_index": cam.ref.index,
        "layer_shape": list(result["maps"].shape[1:]) + [int(cam.ref.output_shape[-1] or 0)],
        "method": options.method,
        "scores": "softmax" if cam.softmax else "raw",
        "gradient_of": "logit" if cam.softmax else "output",
        "target": "pixels" if cam.pixels else "classes",
        **({"region": options.region} if cam.pixels else {}),
        "num_classes": cam.classes,
        "labels": bool(labels),
        "predictions": predictions,
        "classes": explained,
    }
    if cam.output is not None:  # the model has several outputs: this one is explained
        section["output"] = cam.output
    return json_safe(section), files


def upsample(values: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w) float32 -> (height, width), bilinear (Pillow's 'F' mode)."""
    if values.shape == (height, width):
        return values
    resized = Image.fromarray(values, mode="F").resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, dtype=np.float32)


def blend(image: np.ndarray, colors: np.ndarray, alpha: float) -> bytes:
    """(H, W, 1|3) uint8 input and (H, W, 3) uint8 colours -> the blended RGB PNG."""
    base = image if image.shape[2] == 3 else np.repeat(image, 3, axis=2)
    mixed = base * (1.0 - alpha) + colors.astype(np.float32) * alpha
    return encode_png(np.clip(np.rint(mixed), 0, 255).astype(np.uint8))


def npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()
