"""Report helper processes: a helper that cannot start never stalls the worker."""

from __future__ import annotations

from worker.runtime.report_pool import ReportPool


def _manifest() -> dict:
    return {
        "job_id": "pooltest",
        "model": {"uri": "file:///m.keras", "input_shape": [8, 8, 3]},
        "layers": [],
    }


def test_helpers_that_do_not_start_in_time_fall_back_to_rendering_in_the_worker() -> None:
    pool = ReportPool(processes=1)
    pool.start(timeout=0.001)  # far too short for a spawned process to import matplotlib
    files = pool.render(_manifest(), {})
    assert b"<html" in files["index.html"].lower()
    assert files["depth.svg"].startswith(b"<svg")
