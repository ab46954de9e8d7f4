"""The one settings object. `os.environ` is read here and nowhere else.

S3 endpoint and credentials are deliberately absent: boto3 reads its own
standard variables (AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, ...).
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from producer.contract import QUEUE_GPU
from producer.errors import ConfigurationError

EMBEDDED_BROKER = "memory://"
# Shorter passwords are not masked in free text: they would blank common words.
MIN_MASKED_SECRET = 4
DEFAULT_STORAGE = "file://./actviz-results"


def _split(value: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in value.split(",") if p.strip())


def _bool(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


RESTORE_EVERY_S = 1  # how often a Redis consumer re-queues expired unacked messages
# The shortest redelivery (s) whose visibility timeout, a whole number of seconds, still
# spans two heartbeats: 4 s gives beats of 2/3 s and a 2 s timeout.
MIN_REDELIVER_AFTER = 4


@dataclass(frozen=True)
class Settings:
    broker_url: str = EMBEDDED_BROKER
    result_backend: str | None = None
    # With sentinel:// URLs (sentinel://h1:26379;sentinel://h2:26379): the name the
    # Sentinels monitor the primary under.
    sentinel_master: str = "mymaster"
    storage_url: str = DEFAULT_STORAGE
    # The S3 endpoint links are signed for, when a browser reaches the server at another
    # address than this process does (http://127.0.0.1:9000 for a compose stack's s3:9000).
    # Empty: the endpoint boto3 uses (AWS_ENDPOINT_URL_S3, or AWS S3).
    s3_public_endpoint: str = ""
    # URI prefixes a model may come from; "builtin:" is the shipped demo model.
    model_allow: tuple[str, ...] = ("builtin:",)
    # URI prefixes whose models may contain Lambda layers (arbitrary code).
    model_trusted: tuple[str, ...] = ()
    model_registry: str | None = None
    model_cache_dir: str = field(
        default_factory=lambda: str(Path.home() / ".cache" / "actviz" / "models")
    )
    cache_models: int = 4
    cache_bytes: int = 4 * 1024**3
    max_pixels: int = 50_000_000
    max_side: int = 1024
    # Most megapixels a worker process decodes at once (its jobs' images wait their turn);
    # an image larger than this decodes alone.
    decode_budget_mp: int = 100
    max_grid_side: int = 4096
    # Most MB of float32 activations one image may produce (its input and every selected
    # layer, at the size the model is fed); checked before its forward pass.
    max_image_activation_mb: int = 2048
    max_image_bytes: int = 32 * 1024**2
    queue: str = QUEUE_GPU
    queues: tuple[str, ...] = (QUEUE_GPU,)
    preload: tuple[str, ...] = ()
    concurrency: int = 1
    # Worker processes sharing each device: more than one when the host side of a job
    # (encoding, report, uploads) keeps one process from filling its accelerator.
    # 0: as many as the host's cores per GPU can feed (worker/main.py), 1 without a GPU.
    processes_per_device: int = 0
    # Worker processes sharing this host's cores, which size each one's encode threads
    # and report helpers (worker/runtime/cores.py); `actviz worker` sets it for the
    # processes it starts.
    host_processes: int = 1
    soft_time_limit: int = 300
    time_limit: int = 360
    result_expires: int = 7 * 24 * 3600
    max_retries: int = 5
    # A job whose worker processes died this many times while running it (not merely
    # holding it, worker/runtime/running.py) is failed with worker_lost, not run again.
    max_deliveries: int = 3
    # Seconds a quarantine process (worker/runtime/quarantine.py) may take to start (spawn,
    # the backend's import) before it is killed and another is started; when the second
    # does not start either, the job is retried later, as for a storage fault.
    quarantine_start_s: int = 60
    # Seconds within which the jobs a dead worker held are handed to another worker: a
    # live worker re-stamps what it holds every `heartbeat_s` (a sixth of this, at most
    # 10 s, worker/transport.py), and Redis re-queues what was not re-stamped for
    # `visibility_timeout` (this, less one heartbeat and one restore sweep), so a dead
    # worker's jobs come back within it and a live worker's long job never runs twice:
    # the timeout spans at least two beats, so one late beat hands nothing out again.
    # At least MIN_REDELIVER_AFTER; 0: derived from the hard time limit (2 x limit +
    # 60 s), for consumers that do not re-stamp.
    redeliver_after: int = 60
    # Seconds after its submission that a job no worker has started is looked for in the
    # queues and in what workers hold, then again at doubling intervals (at most 300 s);
    # one found nowhere twice in a row was lost between a worker's pop and its record of
    # it, and is sent again under its id (producer/job_registry.py). 0: no checks.
    reconcile_after: int = 60
    # Seconds a submit keeps trying while the broker is unreachable (a Redis restart, a
    # Sentinel failover) before it fails with broker_unavailable.
    submit_retry_s: int = 30
    # A job reports its stages (Job.state().stage) once it has run this long, then at most
    # once per this interval: a fast job skips them (each is a result-backend read and
    # write), a slow one shows its progress, each stage at most this late.
    progress_after_ms: int = 250
    # Measure each job stage's CPU (manifest cpu_ms, actviz_stage_cpu_seconds_total). Off by
    # default: a thread-CPU clock read is a system call made holding the interpreter lock.
    stage_cpu: bool = False
    # Send Celery's task events (received, started, succeeded...) from the start. Off: about
    # 3.5 ms of worker CPU a job on 2 cores (docs/benchmarks.md) that nobody reads without a
    # monitor; Flower turns them on in every worker it sees (enable_events), and so does
    # `celery control enable_events`.
    task_events: bool = False
    batch_size: int = 8
    batch_wait_ms: int = 15
    # Most MB of float32 activations (all selected layers) one forward pass may produce;
    # fewer images go into a pass whose images are larger. At least one image always runs.
    batch_max_mb: int = 1024
    metrics_port: int = 0
    log_json: bool = False
    # A worker that sees no GPU exits (status 2) with the reason instead of running on the
    # CPU; set in the GPU image. Each process of a multi-GPU worker checks its own device.
    require_gpu: bool = False
    log_level: str = "INFO"

    @property
    def embedded(self) -> bool:
        return self.broker_url.startswith("memory://")

    @property
    def backend_url(self) -> str:
        """Result backend; defaults to the broker (an in-memory cache when embedded)."""
        if self.result_backend:
            return self.result_backend
        return "cache+memory://" if self.embedded else self.broker_url

    def __post_init__(self) -> None:
        if self.redeliver_after != 0 and self.redeliver_after < MIN_REDELIVER_AFTER:
            raise ConfigurationError(
                f"ACTVIZ_REDELIVER_AFTER={self.redeliver_after}: use 0 or at least "
                f"{MIN_REDELIVER_AFTER} s (the visibility timeout must span two heartbeats, "
                "or a live worker's jobs could run twice)"
            )

    @property
    def heartbeat_s(self) -> float:
        """Seconds between a worker's re-stamps of the messages it holds: a sixth of
        `redeliver_after`, at most 10 (below 1 s only for the shortest, as tests use)."""
        return min(10.0, self.redeliver_after / 6.0) if self.redeliver_after > 0 else 15.0

    @property
    def visibility_timeout(self) -> int:
        """Redis re-queues an unacked message not re-stamped for this long: what is left of
        `redeliver_after` after one heartbeat and one restore sweep (RESTORE_EVERY_S), so
        a dead holder's message is back within `redeliver_after` of its death."""
        if self.redeliver_after > 0:
            return max(1, int(self.redeliver_after - self.heartbeat_s - RESTORE_EVERY_S))
        return self.time_limit * 2 + 60

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get("ACTVIZ_" + f.name.upper())
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = _parse(f.type, raw)
            except ValueError:
                raise ConfigurationError(
                    f"ACTVIZ_{f.name.upper()}={raw!r}: not a valid {f.type}"
                ) from None
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def with_overrides(self, **overrides: Any) -> Settings:
        """CLI flags override environment values; None means 'flag not given'."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def redacted(self) -> dict[str, Any]:
        """The effective configuration with passwords removed from URLs."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = redact_url(value) if isinstance(value, str) else value
        out["result_backend"] = redact_url(self.backend_url)
        return out

    def secrets(self) -> set[str]:
        """Passwords in the configured URLs; logs mask them wherever they appear."""
        return url_secrets(self.broker_url, self.backend_url, self.storage_url)


def child_environ(**extra: str) -> dict[str, str]:
    """This process's environment plus `extra`, for a child process (e.g. a pinned worker)."""
    return {**os.environ, **extra}


def _parse(type_name: Any, raw: str) -> Any:
    t = str(type_name)
    if t.startswith("tuple"):
        return _split(raw)
    if t == "int":
        return int(raw)
    if t == "bool":
        return _bool(raw)
    return raw


# Scheme, then the authority up to the first '/', '?' or '#'. A password may hold
# '@' and ':' unescaped (kombu and redis-py split the authority at its last '@').
_AUTHORITY = re.compile(r"^([a-z][a-z0-9+.-]*://)([^/?#]*)", re.IGNORECASE | re.DOTALL)


def _userinfo(url: str) -> tuple[str, str, str, str] | None:
    """(scheme://, userinfo, host, rest) of a URL with credentials, else None."""
    match = _AUTHORITY.match(url)
    if match is None or "@" not in match.group(2):
        return None
    userinfo, _, host = match.group(2).rpartition("@")
    return match.group(1), userinfo, host, url[match.end() :]


def redact_url(url: str) -> str:
    """'redis://:secret@host:6379/0' -> 'redis://***@host:6379/0'.

    Everything before the authority's last '@' is removed, whatever it holds.
    """
    parts = _userinfo(url)
    if parts is None:
        return url
    scheme, _, host, rest = parts
    return f"{scheme}***@{host}{rest}"


def url_secrets(*urls: str | None) -> set[str]:
    """The passwords in `urls`, as written and percent-decoded, for masking in logs."""
    found = set()
    for url in filter(None, urls):
        parts = _userinfo(url)
        if parts is None:
            continue
        userinfo = parts[1]
        password = userinfo.partition(":")[2] or userinfo
        found.update({password, unquote(password)})
    return {secret for secret in found if len(secret) >= MIN_MASKED_SECRET}
