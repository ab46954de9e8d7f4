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
