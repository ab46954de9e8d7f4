"""The quarantine process: a helper that dies or stalls while starting is not the job's fault.

Real spawned helpers, a real saved model: a helper killed before it says it is
ready is replaced and the job runs in the next one; helpers that never say so
(stopped with SIGSTOP) are killed at the deadline, and the job gets
HelperUnavailable, which the task retries like a storage fault.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from producer.contract import JobOptions
from producer.errors import HelperUnavailable, transient_errors
from producer.settings import Settings
from worker.runtime.quarantine import START_ATTEMPTS, Quarantine

pytestmark = pytest.mark.timeout(180)


def _quarantine(tmp_path: Path, models: dict[str, Path], start_s: int) -> Quarantine:
    settings = Settings(
        storage_url=tmp_path.as_uri(),
        model_allow=(models["seq"].parent.as_uri() + "/",),
        quarantine_start_s=start_s,
    )
    return Quarantine(settings)


def _run_in_thread(quarantine: Quarantine, model: Path, image: bytes) -> dict[str, Any]:
    """Starts the job in a thread; the dict gets its 'outcome' or its 'error'."""
    result: dict[str, Any] = {}

    def job() -> None:
        try:
            result["outcome"] = quarantine.run(model.as_uri(), image, JobOptions(), "activations")
        except BaseException as exc:  # noqa: BLE001 (the test reads it)
            result["error"] = exc

    result["thread"] = threading.Thread(target=job, daemon=True)
    result["thread"].start()
    return result


def _helpers_started(quarantine: Quarantine, seen: list[Any], count: int) -> None:
    """Wait until `count` helper processes have been started, noting each one once."""
    deadline = time.monotonic() + 60
    while len(seen) < count:
        assert time.monotonic() < deadline, f"{len(seen)} helpers started, not {count}"
        process = quarantine._process
        if process is not None and process.pid is not None and process not in seen:
            seen.append(process)
        time.sleep(0.005)


def test_a_helper_killed_while_starting_is_replaced_and_the_job_runs_in_the_next(
    tmp_path: Path, saved_models: dict[str, Path], png_bytes: bytes
) -> None:
    quarantine = _quarantine(tmp_path, saved_models, start_s=120)
    try:
        result = _run_in_thread(quarantine, saved_models["seq"], png_bytes)
        seen: list[Any] = []
        _helpers_started(quarantine, seen, 1)
        # Spawning and importing the backend take seconds: it has not said it is ready.
        os.kill(seen[0].pid, signal.SIGKILL)
        result["thread"].join(150)
        assert not result["thread"].is_alive()
        assert "error" not in result, result.get("error")
        artifacts, event, _ = result["outcome"]
        assert event == "miss"
        assert [layer["name"] for layer in artifacts.manifest["layers"]]
        assert quarantine._process is not seen[0] and quarantine._process.is_alive()
        assert seen[0].exitcode == -signal.SIGKILL
    finally:
        quarantine.close()
    assert quarantine._process is None


def test_helpers_that_never_get_ready_are_killed_and_the_job_is_retried_later(
    tmp_path: Path, saved_models: dict[str, Path], png_bytes: bytes
) -> None:
    start_s = 3
    quarantine = _quarantine(tmp_path, saved_models, start_s=start_s)
    result = _run_in_thread(quarantine, saved_models["seq"], png_bytes)
    seen: list[Any] = []
    for count in range(1, START_ATTEMPTS + 1):
        _helpers_started(quarantine, seen, count)
        os.kill(seen[-1].pid, signal.SIGSTOP)  # alive, and silent
    result["thread"].join(60)
    assert not result["thread"].is_alive()
    error = result.get("error")
    assert isinstance(error, HelperUnavailable), error
    assert isinstance(error, transient_errors())  # the task retries it with backoff
    assert f"{START_ATTEMPTS} tried, {start_s} s each" in str(error)
    assert "ACTVIZ_QUARANTINE_START_S" in str(error)
    for process in seen:  # each was killed at its deadline, not left stopped
        assert not process.is_alive()
        assert process.exitcode == -signal.SIGKILL
    assert quarantine._process is None
