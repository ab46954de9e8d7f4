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
    wait: bool = True,
) -> W:
    """Start `actviz worker ARGS` and wait until Celery says it is ready.

    `append`: add to `log` (a restarted worker) and wait for a ready line
    after what it already holds. `kind`: the WorkerProcess class to return.
    `wait=False`: return at once, the worker still starting.
    """
    with log.open("ab" if append else "wb") as out:
        start = out.tell()
        proc = subprocess.Popen(
            [str(ACTVIZ), "worker", *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )
    worker = kind(proc, log)
    if not wait:
        return worker

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


class StrictS3:
    """A moto server of its own that enforces IAM: users, their policies and keys.

    moto lets the first `free_actions` (+ SLACK) requests through unauthenticated, for the
    set-up (`setup` below); `enforce()` then spends any left over, so IAM decides from there on.
    """

    # More free requests than the set-up needs: a readiness probe that times out on a
    # loaded machine may still have been counted; `enforce()` spends what is left.
    SLACK = 10

    def __init__(self, log: Path, free_actions: int) -> None:
        import urllib.error
        import urllib.request

        self.free_actions = free_actions + self.SLACK
        self.endpoint = f"http://127.0.0.1:{free_port()}"
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(self.free_actions)}
        port = self.endpoint.rsplit(":", 1)[1]
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", port],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

        def up() -> bool:
            try:
                urllib.request.urlopen(self.endpoint, timeout=1).close()
            except urllib.error.HTTPError:
                return True
            except OSError:
                return False
            return True

        wait_for(up, 30, "moto_server with IAM")
        self.setup = {"aws_access_key_id": "setup", "aws_secret_access_key": "setup"}

    def client(self, service: str, keys: dict[str, str] | None = None) -> Any:
        import boto3

        creds = self.setup if keys is None else {
            "aws_access_key_id": keys["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": keys["AWS_SECRET_ACCESS_KEY"],
        }  # fmt: skip
        return boto3.client(service, endpoint_url=self.endpoint, region_name="us-east-1", **creds)

    def user(self, name: str, *statements: dict) -> dict[str, str]:
        """A user with an inline policy of `statements`; its keys as AWS_* variables."""
        import json

        iam = self.client("iam")
        iam.create_user(UserName=name)
        policy = json.dumps({"Version": "2012-10-17", "Statement": list(statements)})
        iam.put_user_policy(UserName=name, PolicyName="p", PolicyDocument=policy)
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return {
            "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
            "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
        }

    def enforce(self, bucket: str, keys: dict[str, str]) -> None:
        """Spend the unauthenticated requests left, with a user `keys` that may not write."""
        s3 = self.client("s3", keys)
        for attempt in range(self.free_actions):
            try:
                s3.put_object(Bucket=bucket, Key=f"probe-{attempt}", Body=b"")
            except s3.exceptions.ClientError as exc:
                if exc.response["Error"]["Code"] == "AccessDenied":
                    return  # a free request would have got another answer (NoSuchBucket)
        raise AssertionError("the S3 server does not enforce IAM policies")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def allow(actions: list[str], *resources: str) -> dict:
    """An IAM statement allowing `actions` on the ARNs of `resources` (bucket or bucket/key)."""
    return {
        "Effect": "Allow",
        "Action": actions,
        "Resource": [f"arn:aws:s3:::{r}" for r in resources],
    }


def bucket_roles(server: StrictS3, bucket: str, prefix: str) -> dict[str, dict[str, str]]:
    """The stack's three S3 roles as IAM users (infra/README.md, "least privilege"): an
    administrator, a worker (reads models/, reads and writes PREFIX/) and a producer
    (reads and writes PREFIX/). Six of the server's free actions."""
    results = allow(["s3:GetObject", "s3:PutObject"], f"{bucket}/{prefix}/*")
    listing = allow(["s3:ListBucket"], bucket)
    return {
        "admin": server.user("admin", {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}),
        "worker": server.user(
            "worker", listing, results, allow(["s3:GetObject"], f"{bucket}/models/*")
        ),
        "producer": server.user("producer", listing, results),
    }


def setup_env(
    server: StrictS3, keys: dict[str, dict[str, str]], storage_url: str, **roles: str
) -> dict[str, str]:
    """The environment of `python -m producer.bucket_setup` against `server`; `roles` maps a
    role (worker, producer) to another user of `keys` whose keys it should present."""
    env = {
        "AWS_ENDPOINT_URL_S3": server.endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "ACTVIZ_STORAGE_URL": storage_url,
    }
    for role in ("admin", "worker", "producer"):
        user = keys[roles.get(role, role)]
        env[f"S3_{role.upper()}_ACCESS_KEY"] = user["AWS_ACCESS_KEY_ID"]
        env[f"S3_{role.upper()}_SECRET_KEY"] = user["AWS_SECRET_ACCESS_KEY"]
    return env
