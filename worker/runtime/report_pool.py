"""Job reports rendered in separate processes, off the batching worker's GIL.

A job's report (worker/report/job.py: the HTML page and its depth
chart) is pure-Python work (mostly the template) on every job. In the worker
process it holds the interpreter lock, so it serializes with everything else
that needs Python (Celery, boto3, the forward thread) and caps a batching
worker long before its cores or its accelerator are busy. A few spawned
processes (never forked from a process that holds TensorFlow or CUDA state)
render reports instead: the job sends its manifest (pickled through a pipe;
the page links its images, so no image crosses) and gets index.html and
depth.svg back.

Only batching workers with a share of 4 cores or more use it
(worker/runtime/cores.py `report_helpers`): with batch size 1 the job would
wait for its report anyway, and on fewer cores the cores, not the lock, are
what a job waits for, and the pipe costs more than it frees.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from worker.runtime.batcher import wait_result

log = logging.getLogger(__name__)

# Spawning a helper and importing the report takes a second or two; far longer means stuck.
START_TIMEOUT_S = 60.0


def render_in_process(manifest: dict[str, Any]) -> dict[str, bytes]:
    """worker.report.render_report, importable by name in a spawned process."""
    from worker import report

    return report.render_report(manifest)


def _watch_parent(parent: int) -> None:
    """Runs in each helper: end it when the worker is gone (even after SIGKILL)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="actviz-parent-watch", daemon=True).start()


def _ready() -> bool:
    from worker import report  # noqa: F401 (import the report and Jinja once, now)

    return True


class ReportPool:
    """`render(manifest)` -> {"index.html": ..., "depth.svg": ...} in a helper process."""

    def __init__(self, processes: int) -> None:
        # worker/runtime/cores.py sizes it: each helper is an interpreter of its own.
        self.processes = max(1, processes)
        self._executor: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self._disabled = False

    def _pool(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._executor is None:
                self._executor = ProcessPoolExecutor(
                    self.processes,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_watch_parent,
                    initargs=(os.getpid(),),
                )
            return self._executor

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start the processes and import the report in each (a second or two), before jobs.

        A helper that does not come up within `timeout` must not keep the worker
        from serving: reports are then rendered in the worker itself.
        """
        pool = self._pool()
        try:
            for future in [pool.submit(_ready) for _ in range(self.processes)]:
                future.result(timeout=timeout)
        except (FuturesTimeout, BrokenProcessPool) as exc:
            log.warning(
                "report processes did not start (%s); reports render in the worker",
                type(exc).__name__,
            )
            self._disabled = True
            pool.shutdown(wait=False, cancel_futures=True)

    def render(self, manifest: dict[str, Any]) -> dict[str, bytes]:
        """The report files of one job; rendered here if the helper process died."""
        if self._disabled:
            return render_in_process(manifest)
        pool = self._pool()
        try:
            return wait_result(pool.submit(render_in_process, manifest))
        except BrokenProcessPool:
            log.warning("a report process stopped; rendering this report in the worker")
            with self._lock:
                if self._executor is pool:
                    self._executor = None
            return render_in_process(manifest)
