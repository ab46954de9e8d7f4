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


def test_manifest_bytes_refuses_nan():
    with pytest.raises(ValueError):
        manifest_bytes({"x": math.nan})
