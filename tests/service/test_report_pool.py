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
    files = pool.render(_manifest())
    assert b"<html" in files["index.html"].lower()
    assert files["depth.svg"].startswith(b"<svg")


def test_a_killed_helper_costs_one_report_in_the_worker_and_is_replaced() -> None:
    import os
    import signal

    pool = ReportPool(processes=1)
    pool.start(timeout=60)
    try:
        first = pool._executor
        assert first is not None
        (helper,) = list(first._processes)  # the one spawned helper's pid
        os.kill(helper, signal.SIGKILL)
        files = pool.render(_manifest())  # its pool is broken: rendered here instead
        assert b"<html" in files["index.html"].lower()
        again = pool.render(_manifest())  # a new pool, a new helper
        assert b"<html" in again["index.html"].lower()
        assert pool._executor is not None and pool._executor is not first
        assert helper not in pool._executor._processes
    finally:
        if pool._executor is not None:
            pool._executor.shutdown(wait=False, cancel_futures=True)
