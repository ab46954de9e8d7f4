"""A worker's long-lived objects, kept out of the cyclic garbage collector's full passes.

A worker process holds hundreds of thousands of objects that live as long as
it does: TensorFlow's and Keras's modules, its warm models' layers and traced
programs. CPython's full collection walks every tracked object, holding the
interpreter lock: on a loaded 2-core worker with the classic CNN, 475,000
objects and 230 ms a pass, which stalls the forward pass and every render
thread, a few times per thousand jobs.

`tune()` makes young collections rarer: CPython's 700 net new containers ran
one every two jobs or so, each promoting the objects of the jobs in flight
towards the full passes. `settle()` collects once and then freezes what is
left (`gc.freeze()`), so later passes walk only the objects made since: a
job's, mostly, which reference counting frees anyway. It runs after a model
is loaded and after the preloaded models are warm, the moments a worker's
long-lived heap grows.

A frozen object is never collected, so `thaw()` unfreezes everything before
long-lived objects are dropped (a model evicted from the warm cache); the
next `settle()` freezes what is still alive. The embedded mode, which runs in
a user's own process, neither settles nor freezes.
"""

from __future__ import annotations

import gc
import logging
import threading
import time

log = logging.getLogger(__name__)

_lock = threading.Lock()

# Net new containers (dicts, lists, objects) between young collections; CPython's is 700.
YOUNG_THRESHOLD = 10_000


def tune() -> None:
    """A worker process's collector: young collections every YOUNG_THRESHOLD containers."""
    gc.set_threshold(YOUNG_THRESHOLD, *gc.get_threshold()[1:])


def settle() -> None:
    """Collect, then freeze every object still alive into the permanent generation."""
    with _lock:
        started = time.perf_counter()
        gc.collect()
        gc.freeze()
        log.debug(
            "heap settled: %d objects frozen in %.0f ms",
            gc.get_freeze_count(),
            (time.perf_counter() - started) * 1000,
        )


def thaw() -> None:
    """Unfreeze every object, so that a full collection can free what was dropped."""
    with _lock:
        gc.unfreeze()
