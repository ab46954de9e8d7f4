"""Prometheus metrics of a worker process, one registry for the whole process."""

from __future__ import annotations

import sys

from prometheus_client import Counter, Gauge, Histogram

STAGE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

JOBS = Counter("actviz_jobs_total", "Jobs by final status and error code", ["status", "code"])
STAGE_SECONDS = Histogram(
    "actviz_stage_seconds",
    "Time spent per job stage",
    ["stage"],
    buckets=STAGE_BUCKETS,
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
    buckets=(1, 2, 4, 8, 16, 32, 64),
)
GPU_MEMORY = Gauge("actviz_gpu_memory_bytes", "Accelerator memory in use", ["device"])
GPU_MEMORY_PEAK = Gauge(
    "actviz_gpu_memory_peak_bytes", "Peak accelerator memory since process start", ["device"]
)


def sample_gpu_memory() -> int:
    """Set the GPU memory gauges from TensorFlow's allocator; returns devices sampled.

    Called on every /metrics scrape. A no-op (0) without a GPU or before the
    process has imported TensorFlow: sampling must never pull TF into a process
    that does not use it, nor fail a scrape.
    """
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return 0
    try:
        gpus = tf.config.list_logical_devices("GPU")
        for index in range(len(gpus)):
            device = f"GPU:{index}"
            info = tf.config.experimental.get_memory_info(device)
            GPU_MEMORY.labels(device=device).set(info["current"])
            GPU_MEMORY_PEAK.labels(device=device).set(info["peak"])
    except Exception:  # noqa: BLE001 (a scrape reports what it can)
        return 0
    return len(gpus)
