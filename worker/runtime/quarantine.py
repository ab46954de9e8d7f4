"""A process of its own for a job whose worker died while holding it.

A job delivered again was in the hands of a worker that died: maybe because
of this job (a model that crashes its forward pass, an image that exhausts
memory), maybe because of another job of the same pass. Run in the worker,
a job that kills its process would take every job of the process down
again, on every delivery. So a redelivered job runs in `Quarantine`: one
spawned helper process that runs such jobs one at a time, with the same
pipeline as the worker (a batch of one). If the helper dies, only the job it
was running fails, with `worker_lost`, at once; the worker and its other
jobs go on, and the next redelivered job gets a fresh helper.

The helper is spawned (never forked: TensorFlow and CUDA do not survive a
fork), keeps its own model cache while it lives, and dies with its worker
(PR_SET_PDEATHSIG on Linux). It says when it is ready (its backend imported,
its runtime built), and a job is sent only then: a helper that does not say
so within `Settings.quarantine_start_s`, or that dies first, is the world's
fault, not the job's. It is killed and another is started; when that one does
not start either, the job is retried later (HelperUnavailable), not failed.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import threading
import time
from typing import Any

from producer.contract import JobOptions
from producer.errors import (
    ActvizError,
    HelperUnavailable,
    Internal,
    TransientError,
    WorkerLost,
    error_from_dict,
)
from producer.settings import Settings

log = logging.getLogger(__name__)

# How often the waiting job thread wakes, so a soft time limit can interrupt it.
POLL_S = 0.1
# Helpers started for one job before it is retried later instead.
START_ATTEMPTS = 2
READY = "ready"
# What `_receive` returns instead of a message.
_ENDED, _LATE = object(), object()


class Quarantine:
    """Runs redelivered jobs, one at a time, in a spawned helper process."""

    def __init__(self, settings: Settings) -> None:
        # The helper runs one image per forward pass, in its main thread.
        self.settings = settings.with_overrides(batch_size=1, preload=())
        self._lock = threading.Lock()
        self._process: Any = None
        self._conn: Any = None

    def run(
        self, model_uri: str, image: bytes, options: JobOptions, kind: str = "activations"
    ) -> tuple[Any, str, dict]:
        """(Artifacts, model cache event, {stage: ms}) of one image's job of `kind`,
        computed in the helper.

        Raises the job's ActvizError; WorkerLost (worker_lost) when the helper
        died while running it; HelperUnavailable when no helper started;
        TransientError for a fault of the world.
        """
        with self._lock:
            try:
                self._start()
                self._conn.send((model_uri, image, options, kind))
                status, value = self._wait()
            except BaseException:
                # No helper started, the helper died, or a time limit or a shutdown
                # interrupted the wait: the helper may be starting or mid-job.
                self._stop()
                raise

        if status == "ok":
            return value
        if status == "transient":
            raise TransientError(value)
        raise error_from_dict(value)

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _start(self) -> None:
        """A helper that said it is ready; raises HelperUnavailable when none did."""
        if self._process is not None and self._process.is_alive():
            return
        self._stop()
        deadline_s = self.settings.quarantine_start_s
        context = multiprocessing.get_context("spawn")
        for attempt in range(1, START_ATTEMPTS + 1):
            parent, child = context.Pipe()
            process = context.Process(
                target=serve, args=(child, self.settings), name="actviz-quarantine", daemon=True
            )
            process.start()
            child.close()
            self._process, self._conn = process, parent
            log.info("started a quarantine process (pid %d) for redelivered jobs", process.pid)
            failure = self._ready(deadline_s)
            if failure is None:
                return
            log.warning(
                "the quarantine process (pid %d) %s; %s",
                process.pid,
                failure,
                "starting another" if attempt < START_ATTEMPTS else "the job is retried later",
            )
            self._stop()
        raise HelperUnavailable(
            f"no quarantine process started for this job ({START_ATTEMPTS} tried, "
            f"{deadline_s} s each: ACTVIZ_QUARANTINE_START_S)"
        )

    def _ready(self, deadline_s: float) -> str | None:
        """None once the helper says it is ready; else what went wrong."""
        message = self._receive(deadline_s)
        if message is _LATE:
            return f"did not start within {deadline_s} s"
        if message is _ENDED:
            return f"ended while starting ({_describe_exit(self._process.exitcode)})"
        if message != READY:
            return f"sent {message!r} before it was ready"
        log.info("the quarantine process (pid %d) is ready", self._process.pid)
        return None

    def _wait(self) -> tuple[str, Any]:
        """The helper's reply; raises WorkerLost (worker_lost) when it died first."""
        reply = self._receive()
        if reply is not _ENDED:
            return reply
        ending = _describe_exit(self._process.exitcode)
        log.warning("the quarantine process ended (%s) while running a job", ending)
        raise WorkerLost(
            "the job ended the process it ran in, alone, after its worker had died "
            f"with it ({ending}); it needs more memory or time than a worker has, "
            "or its model crashes on this input"
        )

    def _receive(self, deadline_s: float | None = None) -> Any:
        """The helper's next message; _ENDED when it died first (after what it sent
        before dying), _LATE when `deadline_s` passed first."""
        started = time.monotonic()
        while not self._conn.poll(POLL_S):
            if not self._process.is_alive():
                break
            if deadline_s is not None and time.monotonic() - started > deadline_s:
                return _LATE
        try:
            if self._conn.poll(0):
                return self._conn.recv()
        except (EOFError, OSError):
            pass
        self._process.join(5)
        return _ENDED

    def _stop(self) -> None:
        if self._process is not None:
            if self._process.is_alive():
                self._process.kill()
            self._process.join(5)
            self._conn.close()
        self._process = self._conn = None


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def serve(conn: Any, settings: Settings) -> None:
    """The helper's main loop: one job per message on `conn`, until the pipe closes."""
    _die_with_parent()
    # The helper shares its worker's accelerator: JAX must not claim most of it at start.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    from worker.runtime.cores import backend_threads
    from worker.runtime.native_logs import import_backend

    import_backend(backend_threads(settings))
    from worker.logs import configure_logging
    from worker.runtime import WorkerRuntime
    from worker.runtime.accelerator import configure_accelerator

    configure_logging(settings)
    configure_accelerator()
    runtime = WorkerRuntime(settings)
    conn.send(READY)
    while True:
        try:
            model_uri, image, options, kind = conn.recv()
        except (EOFError, OSError):
            return
        try:
            loaded, event, timings = runtime.load_model(model_uri)
            outcome = runtime.compute(kind, loaded, image, options)
            reply: tuple[str, Any] = ("ok", (outcome, event, timings))
        except ActvizError as exc:
            reply = ("error", exc.to_dict())
        except TransientError as exc:  # storage faults arrive classified (producer/storage.py)
            reply = ("transient", f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 (the parent fails the job as internal)
            log.exception("job failed unexpectedly in the quarantine process")
            reply = ("error", Internal(f"{type(exc).__name__}: {exc}").to_dict())
        conn.send(reply)


def _die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (the worker) dies."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass  # not Linux: the helper is a daemon process and ends with a clean exit
