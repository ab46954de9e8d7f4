"""The embedded mode: a worker thread inside the producer's own process.

With no configuration, `Client` uses the in-process `memory://` broker and
calls `start_embedded_worker`, which runs the same Celery task a real worker
runs, on a solo pool in a daemon thread. Jobs therefore behave the same on a
laptop as in the cluster, minus the durability of Redis: queued jobs die
with the process.
"""

from __future__ import annotations

import logging
import threading

from celery import Celery
from celery.utils.nodenames import anon_nodename
from celery.worker import WorkController

from producer.contract import QUEUES
from producer.settings import Settings

log = logging.getLogger(__name__)

_lock = threading.Lock()
_running: dict[str, Celery] = {}


class _ThreadWorker(WorkController):
    """A WorkController that says when its consumer is ready."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self.ready = threading.Event()
        super().__init__(*args, **kwargs)

    def on_consumer_ready(self, consumer: object) -> None:
        self.ready.set()


def _run(app: Celery, worker: WorkController) -> None:
    # Celery resolves some task attributes through the thread's current app.
    app.set_current()
    worker.start()


def start_embedded_worker(settings: Settings, timeout: float = 60.0) -> Celery:
    """Start (once per process and storage) a worker thread; return its app.

    The producer must send with the returned app: the in-memory broker and
    result cache are only shared within this process.
    """
    if not settings.embedded:
        raise ValueError("the embedded worker runs only on the memory:// broker")
    key = settings.storage_url
    with _lock:
        if key in _running:
            return _running[key]
        from worker.runtime.cores import backend_threads
        from worker.runtime.native_logs import import_backend

        import_backend(backend_threads(settings))
        from worker.app import create_app
        from worker.runtime.accelerator import configure_accelerator

        configure_accelerator()
        app = create_app(settings)
        app.finalize()
        worker = _ThreadWorker(
            app=app,
            hostname=anon_nodename(hostname=None, prefix="actviz-embedded"),
            pool="solo",
            concurrency=1,
            queues=list(QUEUES),
            loglevel=settings.log_level,
            ready_callback=None,
            without_heartbeat=True,
            without_mingle=True,
            without_gossip=True,
        )
        thread = threading.Thread(
            target=_run, args=(app, worker), name="actviz-embedded", daemon=True
        )
        thread.start()
        if not worker.ready.wait(timeout):
            raise RuntimeError("the embedded worker did not start")
        _running[key] = app
        return app
