"""Warm models: an in-process LRU of loaded models, bounded by count and bytes.

A loaded model keeps its compiled extractors, so the second job of a model
skips both the load and the graph tracing. Hits, misses and evictions go to
the Prometheus counters and to `ModelCache.counts` (reported with each job).
"""

from __future__ import annotations

import gc
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from worker.metrics import CACHE_BYTES, CACHE_EVENTS, CACHE_MODELS
from worker.runtime import heap

log = logging.getLogger(__name__)

HIT, MISS, EVICTION = "hit", "miss", "eviction"


class ModelCache:
    """LRU of loaded models keyed by 'uri#version'; thread-safe.

    max_models: most models held; max_bytes: most summed `.nbytes`. The model
    just loaded is always kept, even when it alone is over `max_bytes`.
    """

    def __init__(self, max_models: int, max_bytes: int) -> None:
        self.max_models = max(1, max_models)
        self.max_bytes = max_bytes
        self._models: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.RLock()
        # One lock per key being loaded: a cold load holds its key, never the cache.
        self._loading: dict[str, threading.Lock] = {}
        self.counts = {HIT: 0, MISS: 0, EVICTION: 0}

    def __len__(self) -> int:
        return len(self._models)

    def __contains__(self, key: str) -> bool:
        return key in self._models

    @property
    def nbytes(self) -> int:
        return sum(int(getattr(m, "nbytes", 0) or 0) for m in self._models.values())

    def get_or_load(self, key: str, load: Callable[[], Any]) -> tuple[Any, str]:
        """The cached model for `key`, else `load()` it and keep it.

        Returns (model, 'hit' | 'miss'). Errors from `load` propagate and
        nothing is cached. `load` runs without the cache's lock: hits on other
        models go on while a cold one loads; callers of the same key wait for
        that one load and then hit.
        """
        with self._lock:
            model = self._hit(key)
            if model is not None:
                return model, HIT
            loading = self._loading.setdefault(key, threading.Lock())
        with loading:
            with self._lock:
                model = self._hit(key)  # loaded by the thread this one waited for
                if model is not None:
                    return model, HIT
            try:
                model = load()
            finally:
                with self._lock:
                    self._loading.pop(key, None)
            with self._lock:
                self._count(MISS)
                self._models[key] = model
                self._evict(keep=key)
                self._publish()
            return model, MISS

    def _hit(self, key: str) -> Any:
        model = self._models.get(key)
        if model is not None:
            self._models.move_to_end(key)
            self._count(HIT)
        return model

    def stats(self) -> dict[str, int]:
        """hits, misses, evictions so far, and what the cache holds now."""
        return {
            "hits": self.counts[HIT],
            "misses": self.counts[MISS],
            "evictions": self.counts[EVICTION],
            "models": len(self._models),
            "bytes": self.nbytes,
        }

    def _count(self, event: str) -> None:
        self.counts[event] += 1
        CACHE_EVENTS.labels(event=event).inc()

    def _evict(self, keep: str) -> None:
        evicted = False
        while len(self._models) > 1 and (
            len(self._models) > self.max_models or self.nbytes > self.max_bytes
        ):
            oldest = next(k for k in self._models if k != keep)
            del self._models[oldest]
            self._count(EVICTION)
            log.info("evicted model %s from the warm cache", oldest)
            evicted = True
        if evicted:
            # Keras graphs hold reference cycles; free the evicted weights now, not later
            # (thawed first: a settled worker froze them, worker/runtime/heap.py).
            heap.thaw()
            gc.collect()

    def _publish(self) -> None:
        CACHE_MODELS.set(len(self._models))
        CACHE_BYTES.set(self.nbytes)
