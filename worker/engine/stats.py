"""Per-channel and per-layer statistics of one image's activations.

The device computes each channel's moments and zero count
(worker/engine/reduce.py); here they become the manifest's statistics, the
layer summary and its top-k channels.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def stats_from_moments(moments: np.ndarray, zeros: np.ndarray, count: int) -> dict[str, Any]:
    """(4, C) rows mean, std, min, max + (C,) zero counts over `count` positions -> stats.

    sparsity: fraction of values exactly 0. dead: channel indices whose values
    are all equal (a dead ReLU is constant 0); for an output with a single
    position per channel (Dense, Flatten), a unit is dead when it is exactly 0.
    Returns numpy arrays; `json_stats` turns them into lists.
    """
    mean, std, low, high = (np.asarray(row, dtype=np.float32) for row in moments)
    zeros = np.asarray(zeros)
    dead = (high == low) if count > 1 else (high == 0)
    return {
        "mean": mean,
        "std": std,
        "min": low,
        "max": high,
        "sparsity": (zeros / count).astype(np.float32),
        "dead": np.flatnonzero(dead),
        "zeros": zeros,
        "count": count,
    }


def layer_summary(stats: dict[str, Any], top_k: int) -> dict[str, Any]:
    """Aggregate `stats_from_moments` into layer-wide numbers plus the top-k channels.

    mean/std/min/max/sparsity are over every value of the layer (std from the
    per-channel moments, which is exact because every channel has the same
    count); top_k lists channel indices by descending mean.
    """
    mean = stats["mean"].astype(np.float64)
    var = stats["std"].astype(np.float64) ** 2
    layer_mean = float(mean.mean())
    layer_std = float(np.sqrt(np.mean(var + (mean - layer_mean) ** 2)))
    order = np.argsort(-stats["mean"], kind="stable")
    return {
        "mean": layer_mean,
        "std": layer_std,
        "min": float(stats["min"].min()),
        "max": float(stats["max"].max()),
        "sparsity": float(stats["zeros"].sum() / (stats["count"] * stats["zeros"].size)),
        "dead_count": int(stats["dead"].size),
        "top_k": [int(i) for i in order[: max(0, top_k)]],
    }


def json_stats(stats: dict[str, Any]) -> dict[str, Any]:
    """Per-channel arrays -> JSON-safe lists: Python floats, None for NaN or infinity."""
    out: dict[str, Any] = {}
    for key in ("mean", "std", "min", "max", "sparsity"):
        values = np.asarray(stats[key], dtype=np.float64)
        finite = np.isfinite(values)
        listed = values.tolist()
        if not finite.all():
            listed = [v if ok else None for v, ok in zip(listed, finite.tolist(), strict=True)]
        out[key] = listed
    out["dead"] = np.asarray(stats["dead"]).astype(int).tolist()
    return out
