"""The host reduction's compiled loops are cached on disk: a second process loads them.

Each process below is a real Python run against its own NUMBA_CACHE_DIR: the
first compiles the loops and writes numba's cache there, the second finds
them there and compiles none, and both reduce a layer to the same bytes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from worker.engine.host_kernels import _compiled

# One layer reduced two ways: the default grid (`fused`, which calls `moments` and
# `tile`) and a grid normalized by mean and std (`moments`, `tile`).
SCRIPT = """
import hashlib, json
import numpy as np
from producer.contract import JobOptions
from producer.settings import Settings
from worker.engine import host_kernels
from worker.engine.host_reduce import reduce_image
from worker.engine.reduce import LayerPlan, RenderKey

x = np.random.default_rng(0).normal(size=(12, 10, 6)).astype(np.float32)
plan = LayerPlan.of(x.shape, 512)
digest = hashlib.sha256()
for normalize in ("channel", "meanstd"):
    key = RenderKey.of(JobOptions(normalize=normalize), Settings())
    out = reduce_image(x, plan, key)
    for name in sorted(out):
        digest.update(name.encode() + np.ascontiguousarray(out[name]).tobytes())
loops = ("fused", "moments", "tile")
stats = {name: getattr(host_kernels, name).stats for name in loops}
print(json.dumps({
    "digest": digest.hexdigest(),
    "hits": {name: sum(s.cache_hits.values()) for name, s in stats.items()},
    "misses": {name: sum(s.cache_misses.values()) for name, s in stats.items()},
}))
"""


def reduce_in_a_process(cache: Path) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_second_process_loads_the_loops_from_the_cache_instead_of_compiling(
    tmp_path: Path,
) -> None:
    first = reduce_in_a_process(tmp_path)
    assert sum(first["misses"].values()) >= 3, first  # compiled here, then written
    assert sorted(p.suffix for p in tmp_path.rglob("*.nbi")) == [".nbi"] * 4  # _one_channel
    second = reduce_in_a_process(tmp_path)
    assert second["misses"] == dict.fromkeys(second["misses"], 0), second
    assert all(hits >= 1 for hits in second["hits"].values()), second
    assert second["digest"] == first["digest"]


def test_a_loop_with_nowhere_to_cache_compiles_in_memory() -> None:
    """Source numba cannot place a cache for (here: no file at all) still compiles."""
    namespace: dict = {}
    exec("def double(x):\n    return 2 * x\n", namespace)  # noqa: S102 (our own source)
    double = _compiled(namespace["double"])
    assert double(21) == 42
    assert double._cache.__class__.__name__ == "NullCache"
