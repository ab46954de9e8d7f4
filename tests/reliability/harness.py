"""What the reliability tests share: worker processes, a private Redis, an S3 proxy, checks.

- `Worker`: a real `actviz worker` subprocess; SIGKILL/SIGTERM it, read its RSS and log.
- `RedisServer`: a throwaway `redis-server` on its own port (AOF on, fsync always),
  optionally with a password and TLS, that a test may stop and start again.
- `TcpProxy`: a TCP forwarder in front of the S3 server; `down()` refuses and cuts
  every connection (the endpoint is gone), `up()` listens again on the same port.
- `complete_job(...)`: every object a manifest names exists.
- `FIGURES`: numbers the tests measured, written to docs/reliability.md on request.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import selectors
import signal
import socket
import subprocess
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import quote

import stack
from stack import ACTVIZ, BIN, WorkerProcess, free_port, wait_for  # noqa: F401 (re-exported to the tests)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# The credentials the reliability workers hold; no log line may ever contain them.
AWS_SECRET = "rel-aws-secret-6f1d0c9e7b"
# '@' and ':' as typed in the URL, '/' and ' ' escaped there: masking must not depend on them.
REDIS_PASSWORD = "rel-redis@pw:3a8e/51 x"
SECRETS = (AWS_SECRET, REDIS_PASSWORD, quote(REDIS_PASSWORD, safe="@:"), "rel-redis@pw")
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "rel-access-key",
    "AWS_SECRET_ACCESS_KEY": AWS_SECRET,
    "AWS_DEFAULT_REGION": "us-east-1",
}

# section -> {name: value}; filled by the tests, printed and written by conftest.py.
FIGURES: dict[str, dict[str, Any]] = {}
# Every worker log of the run, for the credential check.
WORKER_LOGS: list[Path] = []


def build_models(out: Path) -> dict[str, Path]:
    """'tiny': 2 small convs on 16x16; 'heavy': 6 wide convs, fully convolutional."""
    import keras

    keras.utils.set_random_seed(11)
    layers = keras.layers
    tiny = keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            layers.Conv2D(4, 3, activation="relu", name="conv_a"),
            layers.Conv2D(4, 3, activation="relu", name="conv_b"),
        ],
        name="tiny",
    )
    heavy = keras.Sequential(
        [keras.Input((None, None, 3))]
        + [
            layers.Conv2D(48, 3, padding="same", activation="relu", name=f"conv_{i}")
            for i in range(6)
        ],
        name="heavy",
    )
    paths = {"tiny": out / "tiny.keras", "heavy": out / "heavy.keras"}
    tiny.save(paths["tiny"])
    heavy.save(paths["heavy"])
    return paths


def record(section: str, name: str, value: Any) -> None:
    FIGURES.setdefault(section, {})[name] = value


def worker_env(
    broker_url: str, storage_url: str, model_allow: Iterable[str], **extra: str
) -> dict[str, str]:
    """Environment of a worker (and of producer subprocesses): ACTVIZ_* plus S3 and `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACTVIZ_", "AWS_"))}
    env.update(S3_ENV)
    if "AWS_ENDPOINT_URL_S3" in os.environ:  # the suite's S3 server (absent: a local store)
        env["AWS_ENDPOINT_URL_S3"] = os.environ["AWS_ENDPOINT_URL_S3"]
    env.update(
        TF_CPP_MIN_LOG_LEVEL="2",
        ACTVIZ_BROKER_URL=broker_url,
        ACTVIZ_STORAGE_URL=storage_url,
        ACTVIZ_MODEL_ALLOW=",".join(model_allow),
    )
    env.update(extra)
    return env


class Worker(WorkerProcess):
    """A running `actviz worker` process with its log in a file."""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def rss_kib(self) -> int:
        """VmRSS of the worker process in KiB, from /proc/<pid>/status."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS line")

    def family_rss_kib(self) -> int:
        """VmRSS of the worker plus its child processes (report helpers), in KiB."""
        total = 0
        for pid in [self.pid, *child_pids(self.pid)]:
            with contextlib.suppress(OSError, StopIteration):
                status = Path(f"/proc/{pid}/status").read_text().splitlines()
                total += int(next(ln for ln in status if ln.startswith("VmRSS:")).split()[1])
        return total

    def kill(self) -> None:
        """SIGKILL: the process ends at once, mid-job, acknowledging nothing."""
        if self.alive():
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM (warm shutdown) and wait; SIGKILL after `timeout` s."""
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid`, from /proc/<pid>/task/*/children."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found += [int(c) for c in (task / "children").read_text().split()]
    return found


def start_worker(
    env: dict[str, str], log: Path, *args: str, timeout: float = 120, wait: bool = True
) -> Worker:
    """Start `actviz worker ARGS`, appending to `log`; return once Celery logs that it is ready
    (`wait=False`: at once)."""
    WORKER_LOGS.append(log)
    return stack.start_worker(env, log, *args, timeout=timeout, append=True, kind=Worker, wait=wait)


# ---- a private Redis -------------------------------------------------------


class RedisServer:
    """`redis-server` on its own port and folder: AOF on, fsync on every write."""

    def __init__(self, folder: Path, password: str | None = None, tls: dict | None = None):
        self.folder = folder
        self.port = free_port()
        self.password = password
        self.tls = tls  # {"cert": path, "key": path, "ca": path}
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        # '@' and ':' stay as typed (kombu and redis-py take them so); the rest is escaped.
        auth = f":{quote(self.password, safe='@:')}@" if self.password else ""
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{auth}127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        cmd = ["redis-server", "--bind", "127.0.0.1", "--dir", str(self.folder)]
        cmd += ["--appendonly", "yes", "--appendfsync", "always", "--save", ""]
        if self.password:
            cmd += ["--requirepass", self.password]
        if self.tls:
            cmd += ["--port", "0", "--tls-port", str(self.port)]
            cmd += ["--tls-cert-file", self.tls["cert"], "--tls-key-file", self.tls["key"]]
            cmd += ["--tls-ca-cert-file", self.tls["ca"], "--tls-auth-clients", "no"]
        else:
            cmd += ["--port", str(self.port)]
        return cmd

    def start(self) -> None:
        log = (self.folder / "redis.log").open("ab")
        self.proc = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT)
        wait_for(self.ping, 20, f"redis-server on {self.port}")

    def client(self):  # noqa: ANN201
        import redis

        kwargs: dict[str, Any] = {}
        if self.tls:
            kwargs["ssl_ca_certs"] = self.tls["ca"]
        return redis.Redis.from_url(self.url, socket_timeout=2, **kwargs)

    def ping(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"redis-server exited {self.proc.returncode}")
        try:
            with contextlib.closing(self.client()) as conn:
                return bool(conn.ping())
        except Exception:
            return False

    def stop(self) -> None:
        """SIGTERM: Redis flushes the AOF and exits."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(20)


# ---- an S3 endpoint that can go away ----------------------------------------


class TcpProxy:
    """Forward 127.0.0.1:<port> to `target`; `down()` and `up()` model an outage.

    Down, the port refuses connections and every open connection is cut, as
    when the storage endpoint or the network path to it fails; the storage
    behind it keeps its objects, as a real S3 or MinIO with disks does.
    """

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.up()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def up(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def down(self) -> None:
        listener, self._listener = self._listener, None
        if listener is not None:
            with contextlib.suppress(OSError):
                listener.shutdown(socket.SHUT_RDWR)
            listener.close()
        with self._lock:
            conns, self._conns = self._conns, set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns.update((client, server))
            threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()

    def _pipe(self, a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while True:
                for key, _ in sel.select(timeout=1):
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)
        except (OSError, ValueError):
            return
        finally:
            sel.close()
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()
            with self._lock:
                self._conns.difference_update((a, b))


# ---- storage checks ----------------------------------------------------------


def keys_of(s3, bucket: str, prefix: str = "") -> list[str]:  # noqa: ANN001
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def named_files(manifest: Any) -> set[str]:
    """Every job-relative file a manifest names (PNG, NPZ, HTML), wherever it appears."""
    found: set[str] = set()
    if isinstance(manifest, dict):
        for value in manifest.values():
            found |= named_files(value)
    elif isinstance(manifest, list):
        for value in manifest:
            found |= named_files(value)
    elif (
        isinstance(manifest, str)
        and "://" not in manifest
        and manifest.endswith((".png", ".npz", ".html", ".json"))
    ):
        found.add(manifest)
    return found


def missing_objects(s3, bucket: str, job_prefix: str) -> list[str] | None:  # noqa: ANN001
    """None when no manifest exists yet; else the named objects that are missing."""
    try:
        body = s3.get_object(Bucket=bucket, Key=job_prefix + "manifest.json")["Body"].read()
    except s3.exceptions.NoSuchKey:
        return None
    present = {k[len(job_prefix) :] for k in keys_of(s3, bucket, job_prefix)}
    return sorted(named_files(json.loads(body)) - present)


def png(pixels: Any, **save: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format=save.pop("format", "PNG"), **save)
    return buf.getvalue()


def random_png(seed: int, height: int, width: int) -> bytes:
    import numpy as np

    rng = np.random.default_rng(seed)
    return png((rng.random((height, width, 3)) * 255).astype("uint8"))
