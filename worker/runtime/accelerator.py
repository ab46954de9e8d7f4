"""Accelerator set-up, done once in the process that runs jobs, before any model loads.

TensorFlow grabs all GPU memory at first use unless memory growth is on; with
growth on, the warm-model cache and other processes on the card can coexist.
Nothing here runs in a parent that forks: the worker uses the solo pool.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

_done = False


def configure_accelerator() -> list[str]:
    """Turn on GPU memory growth (TensorFlow backend only); return the GPUs the backend sees."""
    global _done
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        names = [str(d) for d in jax.devices() if d.platform != "cpu"]
        log.info("accelerators: %s", ", ".join(names) or "none (CPU)")
        return names
    if backend == "torch":
        import torch

        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        names = [torch.cuda.get_device_name(i) for i in range(count)]
        log.info("accelerators: %s", ", ".join(names) or "none (CPU)")
        return names
    if backend != "tensorflow":
        return []
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if not _done:
        for gpu in gpus:
            try:
                tf.config.experimental.set_memory_growth(gpu, True)
            except RuntimeError:
                # The runtime already initialised this GPU; growth can no longer change.
                log.warning("GPU %s was initialised before memory growth could be set", gpu.name)
        _done = True
    names = [gpu.name for gpu in gpus]
    log.info("accelerators: %s", ", ".join(names) or "none (CPU)")
    return names
