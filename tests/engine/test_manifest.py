"""The manifest is strict JSON: no NaN, no numpy types."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from worker.engine.manifest import json_safe, manifest_bytes


def test_json_safe_turns_non_finite_floats_into_null_and_numpy_into_python():
    raw = {
        "a": np.float32("nan"),
        "b": [1.5, float("inf"), np.float64(-np.inf)],
        "c": np.arange(3, dtype=np.int64),
        "d": (np.int32(4), np.float32(0.25)),
    }
    safe = json_safe(raw)
    assert safe == {"a": None, "b": [1.5, None, None], "c": [0, 1, 2], "d": [4, 0.25]}
    assert type(safe["d"][0]) is int and type(safe["d"][1]) is float
    assert json.loads(manifest_bytes(safe)) == safe


def test_manifest_bytes_is_strict_json_whatever_it_is_given():
    # A NaN or infinity that escaped json_safe is null: a reader never sees NaN.
    written = manifest_bytes({"x": math.nan, "y": [np.float32(0.5), math.inf], "z": np.arange(2)})
    assert json.loads(written) == {"x": None, "y": [0.5, None], "z": [0, 1]}
    assert b"NaN" not in written and b"Infinity" not in written


def test_manifest_bytes_refuses_what_json_cannot_hold():
    with pytest.raises(TypeError):
        manifest_bytes({"x": object()})


def test_channel_statistics_are_lists_with_null_where_a_value_is_not_finite():
    """A channel whose maps overflowed (inf) or hold NaN: its numbers become null,
    the other channels' stay, and the layer's summary still comes out."""
    from worker.engine.stats import json_stats, layer_summary, stats_from_moments

    moments = np.array(
        [[1.0, np.nan, 3.0], [0.5, 0.5, np.inf], [0.0, 0.0, 1.0], [2.0, 2.0, 1.0]], np.float32
    )
    stats = stats_from_moments(moments, np.array([0, 1, 4]), count=4)
    out = json_stats(stats)
    assert out["mean"] == [1.0, None, 3.0] and out["std"] == [0.5, 0.5, None]
    assert out["min"] == [0.0, 0.0, 1.0] and out["sparsity"] == [0.0, 0.25, 1.0]
    assert out["dead"] == [2]  # its min equals its max
    json.dumps(out, allow_nan=False)
    summary = layer_summary(stats, top_k=2)
    assert summary["min"] == 0.0 and summary["max"] == 2.0 and summary["sparsity"] == 5 / 12
    assert summary["dead_count"] == 1 and summary["top_k"] == [2, 0]  # NaN sorts last
    assert math.isnan(summary["mean"])
