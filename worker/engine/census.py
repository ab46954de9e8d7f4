"""A census: per-channel statistics of one model's layers over a whole dataset.

Every image of a census is an ordinary activations job (with `census=True`,
so its manifest also carries each channel's exact zero count, its peak
position, and each layer's receptive-field radius). `Census` folds those
manifests one at a time into mergeable state, so memory depends on the model
and `top_k`, never on the number of images:

- count, mean and M2 per channel, merged with Chan et al.'s pairwise formula
  (what a job gives is its channel's mean and population std over its H x W
  positions; M2 = std^2 x H x W);
- min and max; the count of zeros (for sparsity) and the number of images in
  which the channel is dead (constant over the image);
- a bounded top-k per channel: the k images where the channel's maximum is
  highest, with the crop of the input around the peak (the receptive field).

`add(job_id, manifest)` counts a job once (a job delivered twice writes one
manifest, keyed by its id; adding an id again changes nothing); `merge(other)`
joins two partial folds over disjoint jobs, so a census can be folded in
parts, by several processes, and resumed from the parts already written.
`to_dict()`/`from_dict()` are the JSON form (census.json and its parts).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from worker.engine.receptive import crop_box

CENSUS_VERSION = 1


@dataclass(frozen=True)
class _Top:
    """One of a channel's top images; orders worst first (lower value, then larger id)."""

    value: float
    job_id: str
    crop: list[int] | None

    def __lt__(self, other: _Top) -> bool:
        if self.value != other.value:
            return self.value < other.value
        return self.job_id > other.job_id


@dataclass
class LayerCensus:
    """One layer's per-channel state over the images folded so far."""

    name: str
    index: int
    class_name: str
    shape: list[int]
    receptive_radius: int | None
    images: int = 0
    count: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    mean: np.ndarray = field(default_factory=lambda: np.zeros(0))
    m2: np.ndarray = field(default_factory=lambda: np.zeros(0))
    low: np.ndarray = field(default_factory=lambda: np.zeros(0))
    high: np.ndarray = field(default_factory=lambda: np.zeros(0))
    zeros: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    dead: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    # Per channel: a min-heap of its best images so far, at most top_k long.
    top: list[list[_Top]] = field(default_factory=list)

    @classmethod
    def empty(cls, entry: dict[str, Any], channels: int) -> LayerCensus:
        return cls(
            name=str(entry["name"]),
            index=int(entry.get("index", 0)),
            class_name=str(entry.get("class_name", "")),
            shape=[int(d) for d in entry.get("output_shape") or []],
            receptive_radius=entry.get("receptive_radius"),
            count=np.zeros(channels, np.int64),
            mean=np.zeros(channels),
            m2=np.zeros(channels),
            low=np.full(channels, np.inf),
            high=np.full(channels, -np.inf),
            zeros=np.zeros(channels, np.int64),
            dead=np.zeros(channels, np.int64),
            top=[[] for _ in range(channels)],
        )

    def merge_moments(
        self,
        images: int,
        count: np.ndarray,
        mean: np.ndarray,
        m2: np.ndarray,
        low: np.ndarray,
        high: np.ndarray,
        zeros: np.ndarray,
        dead: np.ndarray,
    ) -> None:
        """Chan et al.: two (count, mean, M2) summaries of disjoint data -> one."""
        total = self.count + count
        safe = np.where(total > 0, total, 1)
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / safe)
        self.m2 = self.m2 + m2 + delta**2 * (self.count * count / safe)
        self.count = total
        self.low = np.minimum(self.low, low)
        self.high = np.maximum(self.high, high)
        self.zeros = self.zeros + zeros
        self.dead = self.dead + dead
        self.images += images

    def offer(
        self, channel: int, value: float, job_id: str, crop: list[int] | None, k: int
    ) -> None:
        """Keep (value, job_id, crop) if it is among the channel's k best so far: higher
        values first, then smaller job ids (so the result does not depend on the order
        in which jobs are folded or parts merged)."""
        heap = self.top[channel]
        item = _Top(value, job_id, crop)
        if len(heap) < k:
            heapq.heappush(heap, item)
        elif heap[0] < item:
            heapq.heapreplace(heap, item)

    def summary(self) -> dict[str, Any]:
        """Per-channel results, JSON-ready (see Census.to_dict)."""
        std = np.sqrt(self.m2 / np.where(self.count > 0, self.count, 1))
        sparsity = self.zeros / np.where(self.count > 0, self.count, 1)
        dead_fraction = self.dead / max(1, self.images)
        fires = 1.0 - sparsity
        return {
            "count": self.count.tolist(),
            "mean": self.mean.tolist(),
            "std": std.tolist(),
            "min": _finite(self.low),
            "max": _finite(self.high),
            "sparsity": sparsity.tolist(),
            "dead_fraction": dead_fraction.tolist(),
            "dead_everywhere": np.flatnonzero(self.dead == self.images).tolist()
            if self.images
            else [],
            # Channels by how often they fire (the share of positions above zero), most first.
            "by_firing": np.argsort(-fires, kind="stable").tolist(),
        }


def _finite(values: np.ndarray) -> list[float | None]:
    return [float(v) if np.isfinite(v) else None for v in values]


class Census:
    """Mergeable per-channel state of a census; see the module doc."""

    def __init__(self, top_k: int = 9) -> None:
        self.top_k = int(top_k)
        self.layers: dict[str, LayerCensus] = {}
        self.jobs: set[str] = set()
        self.failed = 0
        self.model: dict[str, Any] | None = None

    def __len__(self) -> int:
        return len(self.jobs)

    def add(self, job_id: str, manifest: dict[str, Any]) -> bool:
        """Fold one job's manifest; False (and no change) for a job already counted."""
        if job_id in self.jobs:
            return False
        self.jobs.add(job_id)
        self.model = self.model or {
            k: (manifest.get("model") or {}).get(k) for k in ("uri", "sha256", "name")
        }
        size = (manifest.get("preprocessing") or {}).get("size") or [0, 0]
        for entry in manifest.get("layers") or []:
            stats = entry.get("stats") or {}
            if not stats.get("mean"):
                continue
            mean = np.asarray(stats["mean"], dtype=np.float64)
            channels = mean.size
            shape = [int(d) for d in entry.get("output_shape") or []]
            positions = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            layer = self.layers.get(entry["name"])
            if layer is None:
                layer = self.layers[entry["name"]] = LayerCensus.empty(entry, channels)
            std = np.asarray(stats["std"], dtype=np.float64)
            zeros = np.asarray(
                stats.get("zeros") or np.rint(np.asarray(stats["sparsity"]) * positions),
                dtype=np.int64,
            )
            dead = np.zeros(channels, np.int64)
            dead[np.asarray(stats.get("dead") or [], dtype=int)] = 1
            count = np.full(channels, positions, np.int64)
            high = np.asarray(_numbers(stats["max"]), dtype=np.float64)
            layer.merge_moments(
                1,
                count,
                mean,
                std**2 * positions,
                np.asarray(_numbers(stats["min"]), dtype=np.float64),
                high,
                zeros,
                dead,
            )
            peaks = stats.get("peak") or []
            for c in range(channels):
                crop = None
                if c < len(peaks):
                    crop = crop_box(peaks[c], shape, size, entry.get("receptive_radius"))
                layer.offer(c, float(high[c]), job_id, crop, self.top_k)
        return True

    def merge(self, other: Census) -> None:
        """Join `other`, a fold over jobs disjoint from this one's (ValueError otherwise)."""
        shared = self.jobs & other.jobs
        if shared:
            raise ValueError(f"censuses overlap in {len(shared)} jobs; merge disjoint folds")
        self.jobs |= other.jobs
        self.failed += other.failed
        self.model = self.model or other.model
        for name, theirs in other.layers.items():
            mine = self.layers.get(name)
            if mine is None:
                self.layers[name] = theirs
                continue
            mine.merge_moments(
                theirs.images,
                theirs.count,
                theirs.mean,
                theirs.m2,
                theirs.low,
                theirs.high,
                theirs.zeros,
                theirs.dead,
            )
            for c, heap in enumerate(theirs.top):
                for item in heap:
                    mine.offer(c, item.value, item.job_id, item.crop, self.top_k)

    def to_dict(self, *, with_jobs: bool = True) -> dict[str, Any]:
        """The JSON form: per layer, the state and the per-channel results.

        `with_jobs`: list the job ids (parts keep them, to be merged and resumed;
        census.json gives only their number).
        """
        layers = []
        for layer in sorted(self.layers.values(), key=lambda item: item.index):
            top = [sorted(heap, reverse=True) for heap in layer.top]
            layers.append(
                {
                    "name": layer.name,
                    "index": layer.index,
                    "class_name": layer.class_name,
                    "output_shape": layer.shape,
                    "receptive_radius": layer.receptive_radius,
                    "images": layer.images,
                    **layer.summary(),
                    "m2": layer.m2.tolist(),
                    "zeros": layer.zeros.tolist(),
                    "dead_images": layer.dead.tolist(),
                    "top": [
                        [{"job_id": t.job_id, "value": t.value, "crop": t.crop} for t in heap]
                        for heap in top
                    ],
                }
            )
        out: dict[str, Any] = {
            "version": CENSUS_VERSION,
            "images": len(self.jobs),
            "failed": self.failed,
            "top_k": self.top_k,
            "model": self.model,
            "layers": layers,
        }
        if with_jobs:
            out["jobs"] = sorted(self.jobs)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Census:
        """A census (or a part) back from `to_dict(with_jobs=True)`."""
        census = cls(int(data.get("top_k", 9)))
        census.jobs = set(data.get("jobs") or [])
        census.failed = int(data.get("failed", 0))
        census.model = data.get("model")
        for entry in data.get("layers") or []:
            channels = len(entry["mean"])
            layer = LayerCensus.empty(entry, channels)
            layer.images = int(entry["images"])
            layer.count = np.asarray(entry["count"], np.int64)
            layer.mean = np.asarray(entry["mean"], np.float64)
            layer.m2 = np.asarray(entry["m2"], np.float64)
            layer.low = np.asarray(_numbers(entry["min"], np.inf), np.float64)
            layer.high = np.asarray(_numbers(entry["max"], -np.inf), np.float64)
            layer.zeros = np.asarray(entry["zeros"], np.int64)
            layer.dead = np.asarray(entry["dead_images"], np.int64)
            layer.top = [
                [_Top(float(t["value"]), str(t["job_id"]), t.get("crop")) for t in heap]
                for heap in entry["top"]
            ]
            for heap in layer.top:
                heapq.heapify(heap)
            census.layers[layer.name] = layer
        return census


def _numbers(values: list[Any], missing: float = np.nan) -> list[float]:
    return [missing if v is None else float(v) for v in values]
