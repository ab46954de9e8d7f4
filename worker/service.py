"""Health, readiness and Prometheus metrics of a worker, served on one port.

    GET /healthz  200 while the process runs (liveness: restart me if this fails)
    GET /readyz   503 until `set_ready(True)`, i.e. until preloaded models are warm
    GET /metrics  Prometheus text format of the process registry

The server runs in a daemon thread of the process that executes jobs, so the
metrics it serves are the ones the jobs record.
"""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

from worker.metrics import sample_gpu_memory, sample_threads

_ready = threading.Event()


def set_ready(ready: bool) -> None:
    """Flip /readyz: True once the worker can take jobs without a cold start."""
    if ready:
        _ready.set()
    else:
        _ready.clear()


class _Handler(BaseHTTPRequestHandler):
    server_version = "actviz"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        path = self.path.split("?", 1)[0]
        if path == "/healthz":
            self._reply(200, b"ok\n", "text/plain; charset=utf-8")
        elif path == "/readyz":
            if _ready.is_set():
                self._reply(200, b"ready\n", "text/plain; charset=utf-8")
            else:
                self._reply(503, b"warming up\n", "text/plain; charset=utf-8")
        elif path == "/metrics":
            sample_gpu_memory()
            sample_threads()
            self._reply(200, generate_latest(REGISTRY), CONTENT_TYPE_LATEST)
        else:
            self._reply(404, b"not found\n", "text/plain; charset=utf-8")

    def _reply(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        # Probes hit these endpoints every few seconds; access lines would drown the job logs.
        return


class HealthServer(ThreadingHTTPServer):
    daemon_threads = True
    # A restarted worker must rebind at once, not wait for TIME_WAIT to expire.
    allow_reuse_address = True

    @property
    def port(self) -> int:
        return int(self.server_address[1])

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice."""
        self.shutdown()
        self.server_close()


def start(port: int, host: str = "0.0.0.0") -> HealthServer:
    """Serve /healthz, /readyz and /metrics on `port` (0: a free port) in a daemon thread.

    Returns the running server; `server.port` is the bound port, `server.stop()` ends it.
    Raises OSError when the port is taken.
    """
    server = HealthServer((host, port), _Handler)
    thread = threading.Thread(target=server.serve_forever, name="actviz-health", daemon=True)
    thread.start()
    return server
