"""Real-service helpers shared by the test packages: ports, waits, worker processes.

Test modules import these from `stack` (a uniquely named module), never from `conftest`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

BIN = Path(sys.executable).parent
ACTVIZ = BIN / "actviz"
REDIS_HOST = "127.0.0.1:6379"
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll `predicate` until it returns something truthy; return that, or raise TimeoutError."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what}: not after {timeout} s")
        time.sleep(interval)


def subprocess_env(**extra: str) -> dict[str, str]:
    """This process's environment (with the S3 variables) plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ACTVIZ_")}
    env.update(extra)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    return env


class WorkerProcess:
    """A running `actviz worker`; `log_text()` reads what it has logged so far."""

    def __init__(self, proc: subprocess.Popen, log: Path) -> None:
        self.proc = proc
        self.log = log

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for_log(self, text: str, timeout: float = 30) -> None:
        wait_for(lambda: text in self.log_text(), timeout, f"log line {text!r}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


W = TypeVar("W", bound=WorkerProcess)


def start_worker(
    env: dict[str, str],
    log: Path,
    *args: str,
    timeout: float = 90,
    append: bool = False,
    kind: type[W] = WorkerProcess,
) -> W:
    """Start `actviz worker ARGS` and wait until Celery says it is ready.

    `append`: add to `log` (a restarted worker) and wait for a ready line
    after what it already holds. `kind`: the WorkerProcess class to return.
    """
    with log.open("ab" if append else "wb") as out:
        start = out.tell()
        proc = subprocess.Popen(
            [str(ACTVIZ), "worker", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    worker = kind(proc, log)

    def ready() -> bool:
        if proc.poll() is not None:
            raise RuntimeError(f"actviz worker exited {proc.returncode}:\n{worker.log_text()}")
        with log.open("rb") as fh:
            fh.seek(start)
            return b" ready." in fh.read()

    try:
        wait_for(ready, timeout, "actviz worker", interval=0.2)
    except BaseException:
        worker.stop()
        raise
    return worker


def noise_png(seed: int, height: int = 40, width: int = 48) -> bytes:
    """A seeded random RGB PNG, as a user's image for a job."""
    import io

    import numpy as np
    from PIL import Image

    pixels = (np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()
