"""A diff of two models, layer by layer, on one image: where a checkpoint diverges from another.

    result = diff_image(loaded_a, loaded_b, image_bytes, JobOptions(match="name"), settings)

The image is preprocessed once (the two models must take the same input) and
goes through both models' extractors. Layers pair up by name (`match="name"`,
in A's order) or by position in the flattened layer list (`match="index"`);
the layer spec selects among A's layers (every spatial layer by default).
Layers of one model without a partner, or whose partner's output shape
differs, are listed in the result, never dropped silently.

Per matched layer, over every value of the image's output:

- `relative_l2`: ||A - B|| / ||A|| (||A - B|| when A is all zeros: 0 means equal);
- `correlation`: per channel, Pearson's r of A and B over the positions
  (1 where both are the same constant, 0 where one is constant and the other
  not), and its mean over channels;
- sparsity (share of exact zeros) and mean of A and of B, and their changes;
- three grids: A and B with shared per-channel bounds (so a colour means the
  same value in both) and |A - B| with its own.

`first_divergent` is the first matched layer, in A's order, whose relative L2
distance reaches `options.threshold`.
"""

from __future__ import annotations

import time
from typing import Any

import keras
import numpy as np

from producer.contract import JobOptions, layer_stem
from producer.errors import InvalidJob
from producer.settings import Settings
from worker.engine.analysis import check_activation_budget, check_integer_input
from worker.engine.artifacts import Artifacts, image_record, model_record
from worker.engine.layers import LayerRef
from worker.engine.loading import LoadedModel
from worker.engine.manifest import build_manifest, json_safe
from worker.engine.preprocess import preprocess
from worker.engine.render import (
    colormap_lut,
    downsample_factor,
    encode_palette_png,
    encode_png,
    normalize_maps,
    tile_indices,
)


def match_layers(
    a: LoadedModel, b: LoadedModel, layer_spec: Any, match: str
) -> tuple[list[tuple[LayerRef, LayerRef]], list[dict[str, Any]]]:
    """(pairs of A's selected layers with B's, the layers left unmatched and why)."""
    chosen = a.select(layer_spec)
    b_layers = [ref for ref in b.layers if not ref.container]
    by_name = {ref.name: ref for ref in b_layers}
    pairs: list[tuple[LayerRef, LayerRef]] = []
    unmatched: list[dict[str, Any]] = []
    for ref in chosen:
        partner = by_name.get(ref.name) if match == "name" else _at(b.layers, ref.index)
        if partner is None:
            reason = f"no layer of B {_how(match, ref)}"
            unmatched.append({"model": "a", "name": ref.name, "reason": reason})
        elif tuple(partner.output_shape) != tuple(ref.output_shape):
            unmatched.append(
                {
                    "model": "a",
                    "name": ref.name,
                    "partner": partner.name,
                    "reason": f"output shapes differ: {tuple(ref.output_shape)} in A, "
                    f"{tuple(partner.output_shape)} in B",
                }
            )
        else:
            pairs.append((ref, partner))
    a_names = {ref.name for ref in a.layers}
    for ref in b_layers:
        if ref.is_input:
            continue
        missing = ref.name not in a_names if match == "name" else ref.index >= len(a.layers)
        if missing:
            unmatched.append({"model": "b", "name": ref.name, "reason": "no layer of A matches it"})
    return pairs, unmatched


def _at(refs: list[LayerRef], index: int) -> LayerRef | None:
    return refs[index] if 0 <= index < len(refs) and not refs[index].container else None


def _how(match: str, ref: LayerRef) -> str:
    return f"is named '{ref.name}'" if match == "name" else f"is at index {ref.index}"


def diff_image(
    a: LoadedModel,
    b: LoadedModel,
    data: bytes,
    options: JobOptions,
    settings: Settings,
) -> Artifacts:
    """One image through both models; its Artifacts (manifest with a "diff" section,
    the grids). Raises InvalidJob (inputs differ, nothing matches), UnknownLayer,
    the image's errors, ActivationsTooLarge."""
    if tuple(a.input_shape) != tuple(b.input_shape):
        raise InvalidJob(
            f"the two models take different inputs: {a.input_shape} and {b.input_shape} "
            "(H, W, C); a diff compares checkpoints of one architecture"
        )
    if options.scale == "auto" and a.auto_scale != b.auto_scale:
        raise InvalidJob(
            "the scale 'auto' differs between the two models: "
            + "; ".join(
                f"{name} would be fed {m.auto_scale.scale!r} ({m.auto_scale.why})"
                for name, m in (("model a", a), ("model b", b))
            )
            + "; name the scale the checkpoints were trained with (`--scale`)"
        )
    check_integer_input(options, a)
    check_integer_input(options, b)
    started = time.perf_counter()
    pairs, unmatched = match_layers(a, b, options.layers, options.match)
    if not pairs:
        raise InvalidJob(
            f"no layer of the two models matches by {options.match}: "
            + "; ".join(f"{u['name']}: {u['reason']}" for u in unmatched[:8])
        )
    image = preprocess(data, a.input_shape, options, settings, a.auto_scale)
    extract_a = a.extractor([ref.name for ref, _ in pairs])
    extract_b = b.extractor([ref.name for _, ref in pairs])
    check_activation_budget(
        2 * extract_a.activation_bytes(image.pixels.shape),
        settings,
        "the two models' selected layers make {mb} for this image",
        "select fewer layers",
    )
    preprocess_ms = (time.perf_counter() - started) * 1000.0
    started = time.perf_counter()
    batch = image.pixels[None]
    outputs_a, outputs_b = extract_a(batch), extract_b(batch)
    forward_ms = (time.perf_counter() - started) * 1000.0
    started = time.perf_counter()
    files: dict[str, bytes] = {"input.png": encode_png(image.display)}
    layers = []
    lut = colormap_lut(options.colormap)
    for (ref_a, ref_b), x, y in zip(pairs, outputs_a, outputs_b, strict=True):
        entry = compare(x[0], y[0])
        entry.update(
            name=ref_a.name, partner=ref_b.name, index=ref_a.index, partner_index=ref_b.index
        )
        entry["class_name"] = ref_a.class_name
        if x[0].ndim == 3:
            entry["grids"] = grids(ref_a, x[0], y[0], lut, settings.max_grid_side, files)
        layers.append(entry)
    first = next((e["name"] for e in layers if e["relative_l2"] >= options.threshold), None)
    section = {
        "against": {k: model_record(b)[k] for k in ("uri", "sha256", "name")},
        "match": options.match,
        "threshold": options.threshold,
        "first_divergent": first,
        "layers": layers,
        "unmatched": unmatched,
    }
    render_ms = (time.perf_counter() - started) * 1000.0
    described, preprocessing = image_record(image)
    manifest = build_manifest(
        model=model_record(a),
        image=described,
        preprocessing=preprocessing,
        options=options,
        engine={"backend": keras.backend.backend(), "keras": keras.__version__},
        layers=[],
        files=list(files),
        timings_ms={"preprocess": preprocess_ms, "forward": forward_ms, "render": render_ms},
        batch={"size": 1, "position": 0},
    )
    manifest["diff"] = json_safe(section)
    return Artifacts(manifest=manifest, files=files)


def compare(a: np.ndarray, b: np.ndarray) -> dict[str, Any]:
    """The numbers of one layer's pair of outputs (one image, (..., C) float32)."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    distance = float(np.linalg.norm(x - y))
    norm = float(np.linalg.norm(x))
    channels = x.shape[-1] if x.ndim >= 1 else 1
    flat_x, flat_y = x.reshape(-1, channels), y.reshape(-1, channels)
    correlation = channel_correlation(flat_x, flat_y)
    entry: dict[str, Any] = {
        "output_shape": list(a.shape),
        "relative_l2": distance / norm if norm > 0 else distance,
        "max_abs_diff": float(np.abs(x - y).max()) if x.size else 0.0,
        "mean_correlation": float(correlation.mean()) if correlation.size else 1.0,
        "sparsity_a": float((x == 0).mean()),
        "sparsity_b": float((y == 0).mean()),
        "mean_a": float(x.mean()),
        "mean_b": float(y.mean()),
    }
    entry["sparsity_change"] = entry["sparsity_b"] - entry["sparsity_a"]
    entry["mean_change"] = entry["mean_b"] - entry["mean_a"]
    if flat_x.shape[0] > 1:  # one value per channel (Dense) has no per-channel correlation
        entry["correlation"] = correlation.tolist()
    return entry


def channel_correlation(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson's r per column of (P, C) x and y; 1 where both columns are the same
    constant, 0 where exactly one is constant or they are different constants."""
    dx, dy = x - x.mean(axis=0), y - y.mean(axis=0)
    sx, sy = np.sqrt((dx**2).sum(axis=0)), np.sqrt((dy**2).sum(axis=0))
    both = (sx > 0) & (sy > 0)
    r = np.where(both, (dx * dy).sum(axis=0) / np.where(both, sx * sy, 1.0), 0.0)
    same_constant = (sx == 0) & (sy == 0) & np.all(x == y, axis=0)
    return np.clip(np.where(same_constant, 1.0, r), -1.0, 1.0)


def grids(
    ref: LayerRef,
    a: np.ndarray,
    b: np.ndarray,
    lut: np.ndarray,
    max_side: int,
    files: dict[str, bytes],
) -> dict[str, str]:
    """The channel grids of A, B (shared per-channel bounds) and |A - B| as PNG files."""
    height, width, channels = a.shape
    factor = downsample_factor(height, width, channels, max_side)
    a, b = a[::factor, ::factor], b[::factor, ::factor]
    both = normalize_maps(np.concatenate([a, b], axis=1).astype(np.float32), "channel")
    delta = normalize_maps(np.abs(a - b).astype(np.float32), "channel")
    stem = "diff/" + layer_stem(ref.index, ref.name)
    names = {"a": f"{stem}-a.png", "b": f"{stem}-b.png", "delta": f"{stem}-delta.png"}
    half = a.shape[1]
    for key, indices in (("a", both[:, :half]), ("b", both[:, half:]), ("delta", delta)):
        canvas, _ = tile_indices(np.ascontiguousarray(indices))
        files[names[key]] = encode_palette_png(canvas, lut)
    return names
