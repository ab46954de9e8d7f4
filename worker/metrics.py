"""Prometheus metrics of a worker process, one registry for the whole process."""

from __future__ import annotations

import os
import re
import sys
import threading
from pathlib import Path

from prometheus_client import Counter, Gauge, Histogram

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

JOBS = Counter("actviz_jobs_total", "Jobs by final status and error code", ["status", "code"])
MESSAGES_REFUSED = Counter(
    "actviz_messages_refused_total",
    "Queue messages refused before reaching a job, kept on actviz:dead-letters",
    ["reason"],
)
STAGE_SECONDS = Histogram(
    "actviz_stage_seconds",
    "Time spent per job stage",
    ["stage"],
    buckets=STAGE_BUCKETS,
)
STAGE_CPU = Counter(
    "actviz_stage_cpu_seconds",
    "CPU seconds of the threads doing each job stage (fetch, preprocess, engine, encode, "
    "report, upload); the rest of a worker's CPU is the queue and bookkeeping",
    ["stage"],
)
QUEUE_WAIT = Histogram(
    "actviz_queue_wait_seconds", "Enqueue to start of work", buckets=STAGE_BUCKETS
)
CACHE_EVENTS = Counter(
    "actviz_model_cache_events_total", "Model cache hits, misses and evictions", ["event"]
)
CACHE_BYTES = Gauge("actviz_model_cache_bytes", "Bytes held by the warm model cache")
CACHE_MODELS = Gauge("actviz_model_cache_models", "Models held by the warm model cache")
BATCH_IMAGES = Histogram(
    "actviz_forward_batch_images",
    "Images per forward pass",
    # Every size to 8 (how full a default batch runs), then coarser.
    buckets=(1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 24, 32, 48, 64),
)
ACTIVATION_BYTES = Histogram(
    "actviz_batch_activation_bytes",
    "Bytes of activations one forward pass holds (all selected layers, all images)",
    buckets=(2**20, 2**22, 2**24, 2**26, 2**28, 2**30, 2**32),
)
D2H_BYTES = Histogram(
    "actviz_batch_d2h_bytes",
    "Bytes one forward pass copied from the device to the host (grids, statistics)",
    buckets=(2**14, 2**16, 2**18, 2**20, 2**22, 2**24, 2**26, 2**28),
)
HELD = Gauge(
    "actviz_jobs_held",
    "Jobs this worker process holds unacknowledged: running, reserved or waiting in a "
    "batch (updated by the visibility heartbeat); what the queue lists no longer show",
)
RECONCILED = Counter(
    "actviz_jobs_resent_total",
    "Registered jobs found in no queue and held by no worker, twice, and sent again "
    "(worker/jobs/reconciler.py)",
)
NATIVE_THREAD_CPU = Gauge(
    "actviz_native_thread_cpu_seconds",
    "CPU seconds of this process's live threads that Python did not start: the backend's "
    "own pools (TensorFlow's intra- and inter-op threads run the forward pass on a CPU; "
    "XLA's and the device runtime's on an accelerator). Linux only; read at each scrape",
)
THREAD_CPU = Gauge(
    "actviz_thread_cpu_seconds",
    "CPU seconds of this process's live threads by kind: Python's by name without its "
    "number (actviz-render, ThreadPoolExecutor-0 the jobs' pool, MainThread Celery's "
    "consumer, Timer, actviz-forward, ...), `native` those Python did not start. Linux "
    "only; read at each scrape",
    ["threads"],
)
GPU_MEMORY = Gauge("actviz_gpu_memory_bytes", "Accelerator memory in use", ["device"])
GPU_MEMORY_PEAK = Gauge(
    "actviz_gpu_memory_peak_bytes", "Peak accelerator memory since process start", ["device"]
)


def sample_gpu_memory() -> int:
    """Set the GPU memory gauges from the loaded framework's allocator; returns devices sampled.

    Called on every /metrics scrape. Reads TensorFlow and/or JAX, whichever the
    process has already imported (Keras 3 runs on either). A no-op (0) without
    a GPU: sampling must never import a framework into a process that does not
    use it, nor fail a scrape.
    """
    sampled = 0
    for read in (_tensorflow_memory, _jax_memory):
        try:
            usage = read()
        except Exception:  # noqa: BLE001 (a scrape reports what it can)
            continue
        for device, (current, peak) in usage.items():
            GPU_MEMORY.labels(device=device).set(current)
            GPU_MEMORY_PEAK.labels(device=device).set(peak)
            sampled += 1
    return sampled


def _tensorflow_memory() -> dict[str, tuple[int, int]]:
    """{"GPU:0": (bytes in use, peak bytes)} from TensorFlow's BFC allocator."""
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return {}
    usage = {}
    for index in range(len(tf.config.list_logical_devices("GPU"))):
        info = tf.config.experimental.get_memory_info(f"GPU:{index}")
        usage[f"GPU:{index}"] = (int(info["current"]), int(info["peak"]))
    return usage


def _jax_memory() -> dict[str, tuple[int, int]]:
    """{"GPU:0": (bytes in use, peak bytes)} from each JAX GPU device's memory_stats()."""
    jax = sys.modules.get("jax")
    if jax is None:
        return {}
    usage = {}
    for device in jax.local_devices():
        stats = device.memory_stats() if device.platform == "gpu" else None
        if stats:
            peak = stats.get("peak_bytes_in_use", stats["bytes_in_use"])
            usage[f"GPU:{device.id}"] = (int(stats["bytes_in_use"]), int(peak))
    return usage


def thread_kind(name: str) -> str:
    """A Python thread's name without its number: 'actviz-render_1' -> 'actviz-render',
    'ThreadPoolExecutor-0_3' -> 'ThreadPoolExecutor-0', 'Thread-5 (run)' -> 'Thread'."""
    return _THREAD_NUMBER.sub("", _THREAD_TARGET.sub("", name)) or name


_THREAD_TARGET = re.compile(r" \(.*\)$")
_THREAD_NUMBER = re.compile(r"[-_]?\d+$")
_kinds_seen: set[str] = set()


def sample_threads() -> float:
    """Set THREAD_CPU and NATIVE_THREAD_CPU from /proc/self/task; returns the native CPU
    (0.0 where /proc is absent).

    A thread is Python's when `threading` knows its native id; every other live
    thread of the process was started by native code. Called on every /metrics
    scrape. A thread that exits takes its CPU out of the gauges (a kind with no live
    thread reads 0). A Python thread sampled in the instant between leaving
    `threading`'s list and its exit from the kernel counts as native in that one sample.
    """
    python = {t.native_id: thread_kind(t.name) for t in threading.enumerate()}
    ticks = os.sysconf("SC_CLK_TCK")
    seconds = dict.fromkeys(_kinds_seen | {"native"}, 0.0)
    for stat in Path("/proc/self/task").glob("*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended between the listing and the read
            continue
        kind = python.get(int(stat.parent.name), "native")
        seconds[kind] = seconds.get(kind, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    for kind, spent in seconds.items():
        THREAD_CPU.labels(threads=kind).set(spent)
    _kinds_seen.update(seconds)
    NATIVE_THREAD_CPU.set(seconds["native"])
    return seconds["native"]
