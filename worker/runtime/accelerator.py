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
    """Turn on GPU memory growth (TensorFlow backend only); return the GPUs seen."""
    global _done
    import keras

    if keras.backend.backend() != "tensorflow":
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
