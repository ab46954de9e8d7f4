"""`actviz worker`: one Celery worker process per accelerator.

Why solo pools in separate processes rather than prefork or threads:
TensorFlow/CUDA must not be initialised in a process that later forks (the
children inherit a broken CUDA context), and one TF runtime per GPU keeps a
card's memory and the warm models in one place. So a worker is a single
process running jobs in its main thread (`--pool solo`). `--concurrency N`
starts N such processes, child i pinned to GPU i with CUDA_VISIBLE_DEVICES=i
(on a CPU-only host they simply share the cores). `--per-device K`
(ACTVIZ_PROCESSES_PER_DEVICE) starts K processes per GPU instead, for when one
process's host-side work (grids, statistics, report, uploads) leaves its card
idle; they then share the card's memory (TensorFlow grows its memory as it
needs it; JAX is told not to preallocate). On Kubernetes prefer one pod per
GPU with concurrency 1.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

from producer.errors import ActvizError
from producer.registry import load_registry, resolve_model
from producer.settings import Settings, child_environ, redact_url
from worker.runtime.cores import backend_threads, render_threads, report_helpers, usable_cores

log = logging.getLogger("actviz.worker")

EXIT_CONFIG = 2
EXIT_PRELOAD = 3
# Worker processes sharing a GPU, per host core of its share. A process's Python
# (Celery, the job threads, manifests) holds one interpreter lock; its PNG encoding
# and report helpers use more cores. Measured on an H200 node with 16 cores
# (docs/benchmarks.md): 12 processes served the classic CNN at 89 jobs/s, 8 at 68-77
# on the same node (98 on another), 4 at 52.
PROCESSES_PER_CORE = 0.75
MAX_PER_DEVICE = 16

EMBEDDED_REFUSAL = (
    "actviz worker needs a shared broker: set ACTVIZ_BROKER_URL=redis://host:6379/0. "
    "The memory:// broker exists only inside one process; without configuration "
    "`actviz submit` runs its own in-process worker instead."
)


def run_worker(settings: Settings, node_name: str | None = None) -> int:
    """Run a worker until it is stopped; returns the exit status."""
    if settings.embedded:
        print(EMBEDDED_REFUSAL, file=sys.stderr)
        return EXIT_CONFIG
    gpus = visible_gpus(dict(os.environ))
    refusal = gpu_refusal(settings, gpus)
    if refusal:
        print(f"actviz worker: {refusal}", file=sys.stderr)
        return EXIT_CONFIG
    if settings.processes_per_device <= 0:
        cores = usable_cores()
        per_device = default_per_device(cores, gpus, max(1, settings.concurrency))
        settings = dataclasses.replace(settings, processes_per_device=per_device)
        print(
            f"actviz worker: {gpus} GPU(s) visible, {cores} cores: {per_device} process(es) "
            "per device (--per-device / ACTVIZ_PROCESSES_PER_DEVICE to choose)",
            file=sys.stderr,
        )
    processes = max(1, settings.concurrency) * max(1, settings.processes_per_device)
    if processes > 1:
        shared = dataclasses.replace(settings, host_processes=processes)
        print(
            f"actviz worker: {processes} processes on {usable_cores()} cores, each encoding "
            f"on {render_threads(shared)} threads with {report_helpers(shared)} report "
            "helper(s)",
            file=sys.stderr,
        )
    if processes > 1:
        return run_pinned_children(settings)
    return run_one(settings, node_name)


def run_one(settings: Settings, node_name: str | None) -> int:
    from worker.runtime.native_logs import backend_pools, import_backend

    import_backend(backend_threads(settings))
    from celery.signals import worker_ready, worker_shutting_down

    from worker.app import create_app
    from worker.logs import configure_logging
    from worker.runtime import heap
    from worker.runtime.accelerator import configure_accelerator
    from worker.runtime.pool import pool_for

    configure_logging(settings)
    # botocore narrates every client it builds at INFO; keep job logs readable.
    logging.getLogger("botocore").setLevel(logging.WARNING)
    log.info(
        "worker: broker %s, storage %s, queues %s",
        redact_url(settings.broker_url),
        redact_url(settings.storage_url),
        ",".join(settings.queues),
    )
    accelerators = configure_accelerator()
    pools = backend_pools()
    if pools is not None:  # 0: TensorFlow's choice (TF_NUM_*_THREADS, else every core)
        intra, inter = (str(count) if count else "default" for count in pools)
        log.info("TensorFlow's pools: %s thread(s) for each op, %s op(s) at a time", intra, inter)
    pinned = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if not accelerators and settings.require_gpu:
        log.error(
            "ACTVIZ_REQUIRE_GPU is set and the %s backend sees no GPU (CUDA_VISIBLE_DEVICES=%r): "
            "exiting rather than running on the CPU",
            _backend(),
            pinned,
        )
        return EXIT_CONFIG
    if (
        not accelerators
        and pinned
        and not pinned.startswith("-")
        and visible_gpus(dict(os.environ))
    ):
        log.warning(
            "pinned to GPU %s, but the %s backend sees no GPU: this process runs on the CPU "
            "(set ACTVIZ_REQUIRE_GPU to make it exit instead)",
            pinned,
            _backend(),
        )
    heap.tune()
    app = create_app(settings)
    start_sweepers(app, settings)
    service = start_service(settings.metrics_port)
    try:
        registry = load_registry(settings.model_registry)
        app.actviz.preload(
            [resolve_model(m, registry) for m in settings.preload],
            every_pass_size=bool(accelerators),
        )
    except ActvizError as exc:
        print(f"actviz worker: cannot preload: {exc}", file=sys.stderr)
        return EXIT_PRELOAD
    if service is not None:
        # Ready only once the preloaded models are warm and the consumer listens.
        worker_ready.connect(lambda **_: service.set_ready(True), weak=False)
        worker_shutting_down.connect(lambda **_: service.set_ready(False), weak=False)
    argv = [
        "worker",
        # The pool is worker_pool in worker/app.py: solo, or threads when batching.
        f"--concurrency={pool_for(settings)[1]}",
        f"--queues={','.join(settings.queues)}",
        f"--loglevel={settings.log_level}",
        f"--hostname={node_name or 'actviz@%h'}",
        # Gossip and mingle listen to other workers' messages on the broker (election
        # requests that send tasks, revoked ids to merge); actviz needs neither.
        "--without-gossip",
        "--without-mingle",
    ]
    app.worker_main(argv)
    return 0


def start_service(port: int) -> Any:
    """Start the health/metrics server when configured; returns its module or None."""
    if port <= 0:
        return None
    from worker import service

    service.start(port)
    log.info("health and metrics on :%d", port)
    return service


def start_sweepers(app: Any, settings: Settings) -> None:
    """Redis only: batches whose finalizing worker died are taken over
    (worker/jobs/batches.py), and registered jobs that no queue or worker holds are sent
    again (worker/jobs/reconciler.py)."""
    from celery.backends.redis import RedisBackend

    from worker.jobs.batches import start_sweeper
    from worker.jobs.deliveries import counter_ttl
    from worker.jobs.reconciler import start_reconciler

    if isinstance(app.backend, RedisBackend):
        start_sweeper(app.actviz.store, app.backend.client)
        if settings.reconcile_after > 0:
            start_reconciler(
                app, app.backend.client, settings.reconcile_after, counter_ttl(settings)
            )


def _backend() -> str:
    import keras

    return keras.backend.backend()


def visible_gpus(environ: dict[str, str]) -> int:
    """NVIDIA GPUs this process may use, without initializing CUDA: CUDA_VISIBLE_DEVICES
    when set, else the /dev/nvidiaN device files."""
    chosen = environ.get("CUDA_VISIBLE_DEVICES")
    if chosen is not None:
        ids = [part.strip() for part in chosen.split(",") if part.strip()]
        return 0 if not ids or ids[0].startswith("-") else len(ids)
    return sum(1 for path in Path("/dev").glob("nvidia[0-9]*") if path.name[6:].isdigit())


def default_per_device(cores: int, gpus: int, devices: int) -> int:
    """Worker processes per device the host's cores can feed: PROCESSES_PER_CORE per
    core of each device's share, 1 to MAX_PER_DEVICE; 1 without a GPU (the processes
    would only share the same cores)."""
    if gpus <= 0:
        return 1
    share = cores // max(1, min(gpus, devices))
    return max(1, min(MAX_PER_DEVICE, int(share * PROCESSES_PER_CORE)))


def gpu_refusal(settings: Settings, gpus: int) -> str | None:
    """Why this worker must not start on the devices it sees, or None.

    With ACTVIZ_REQUIRE_GPU, a worker that sees no GPU; and a multi-GPU worker
    (--concurrency N) that sees fewer than N GPUs but some, whose extra processes
    would otherwise run on the CPU without anyone asking for it.
    """
    devices = max(1, settings.concurrency)
    environ = os.environ.get("CUDA_VISIBLE_DEVICES")
    seen = f"CUDA_VISIBLE_DEVICES={environ!r}" if environ is not None else "/dev/nvidia*"
    if settings.require_gpu and gpus == 0:
        return (
            f"ACTVIZ_REQUIRE_GPU is set and this worker sees no GPU ({seen}): give the "
            "container a GPU (docker run --gpus, compose device reservations, the NVIDIA "
            "runtime class on Kubernetes), or unset ACTVIZ_REQUIRE_GPU to run on the CPU"
        )
    if 0 < gpus < devices:
        return (
            f"--concurrency {devices} (ACTVIZ_CONCURRENCY) asks for one process per GPU on "
            f"{devices} GPUs, and this worker sees {gpus} ({seen}); lower it to {gpus}, or "
            "use --per-device for several processes on one GPU"
        )
    return None


def device_ids(environ: dict[str, str]) -> list[str]:
    """The GPU ids this process may use, as CUDA_VISIBLE_DEVICES names them (index or
    UUID); '0', '1', ... from the /dev/nvidiaN files when it is not set."""
    chosen = environ.get("CUDA_VISIBLE_DEVICES")
    if chosen is not None:
        return [part.strip() for part in chosen.split(",") if part.strip()]
    return [str(i) for i in range(visible_gpus(environ))]


def child_command(settings: Settings, index: int) -> list[str]:
    cmd = [sys.executable, "-m", "producer.cli", "worker", "--concurrency", "1"]
    cmd += ["--queues", ",".join(settings.queues), "--name", f"actviz{index}@%h"]
    for model in settings.preload:
        cmd += ["--preload", model]
    return cmd


def child_plan(settings: Settings, environ: dict[str, str]) -> list[dict[str, str]]:
    """The extra environment of each child: its device, metrics port, storage and broker.

    `settings.concurrency` devices x `settings.processes_per_device` processes;
    child i runs on device i // processes_per_device. `environ` is the
    parent's environment, to respect what the operator set.
    """
    per_device = max(1, settings.processes_per_device)
    # Child i gets the (i // per_device)-th device this worker sees, by the name the
    # runtime gave it: a container given GPU 3 (or a GPU UUID) pins its child to it.
    ids = device_ids(environ)
    plan = []
    total = max(1, settings.concurrency) * per_device
    for index in range(total):
        device = index // per_device
        env = {
            "CUDA_VISIBLE_DEVICES": ids[device] if device < len(ids) else str(device),
            "ACTVIZ_BROKER_URL": settings.broker_url,
            "ACTVIZ_STORAGE_URL": settings.storage_url,
            "ACTVIZ_METRICS_PORT": str(
                settings.metrics_port + index if settings.metrics_port else 0
            ),
            "ACTVIZ_PROCESSES_PER_DEVICE": "1",
            # Its pools are sized to its share of the cores (worker/runtime/cores.py).
            "ACTVIZ_HOST_PROCESSES": str(total),
        }
        if per_device > 1 and "XLA_PYTHON_CLIENT_PREALLOCATE" not in environ:
            # JAX takes 75% of a card at start-up by default; processes sharing it cannot.
            env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
        plan.append(env)
    return plan


def run_pinned_children(settings: Settings) -> int:
    """Start the solo workers of `child_plan`; wait for all."""
    children = []
    for index, extra in enumerate(child_plan(settings, dict(os.environ))):
        children.append(
            subprocess.Popen(child_command(settings, index), env=child_environ(**extra))
        )

    def forward(signum: int, frame: object) -> None:
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    return max(child.wait() for child in children)
