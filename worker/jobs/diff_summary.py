"""A batch of diff jobs, summed up: batches/<id>/diff.json and diff.html.

Written once the batch's last job has ended, where the gallery is
(worker/jobs/batches.py). Reads one job's manifest at a time and keeps per
layer the sums it averages: the relative L2 distance (mean and max over the
images), the mean channel correlation, and the sparsity and mean of A and B.
The first divergent layer is the first whose mean distance reaches the jobs'
threshold.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from producer import contract
from producer.storage import ObjectNotFound, Store

log = logging.getLogger(__name__)

AVERAGED = ("relative_l2", "mean_correlation", "sparsity_a", "sparsity_b", "mean_a", "mean_b")


def write_diff_summary(batch_id: str, job_ids: list[str], store: Store) -> dict[str, Any]:
    from worker.report.diff import render_diff_summary

    layers: dict[str, dict[str, Any]] = {}
    done: list[str] = []
    first_diff: dict[str, Any] = {}
    unmatched: list[dict[str, Any]] = []
    for job_id in job_ids:
        try:
            manifest = json.loads(store.get(contract.manifest_key(job_id)))
        except ObjectNotFound:
            continue
        diff = manifest.get("diff") or {}
        done.append(job_id)
        if not first_diff:
            first_diff = {
                "model": {k: (manifest.get("model") or {}).get(k) for k in ("uri", "name")},
                "against": diff.get("against"),
                "match": diff.get("match"),
                "threshold": diff.get("threshold"),
            }
            unmatched = diff.get("unmatched") or []
        for entry in diff.get("layers") or []:
            layer = layers.setdefault(
                entry["name"],
                {
                    "name": entry["name"],
                    "partner": entry.get("partner"),
                    "output_shape": entry.get("output_shape"),
                    "images": 0,
                    "relative_l2_max": 0.0,
                    **{key: 0.0 for key in AVERAGED},
                },
            )
            layer["images"] += 1
            layer["relative_l2_max"] = max(layer["relative_l2_max"], entry["relative_l2"])
            for key in AVERAGED:
                layer[key] += float(entry.get(key) or 0.0)
    for layer in layers.values():
        for key in AVERAGED:
            layer[key] /= max(1, layer["images"])
    threshold = float(first_diff.get("threshold") or 0.0)
    ordered = list(layers.values())
    first = next((lay["name"] for lay in ordered if lay["relative_l2"] >= threshold), None)
    summary = {
        "batch_id": batch_id,
        "images": len(done),
        "failed": len(job_ids) - len(done),
        **first_diff,
        "first_divergent": first,
        "layers": ordered,
        "unmatched": unmatched,
        "jobs": done,
    }
    store.put(
        contract.census_key(batch_id, "diff.json"),
        json.dumps(summary, separators=(",", ":")).encode(),
    )
    store.put(contract.census_key(batch_id, "diff.html"), render_diff_summary(summary))
    log.info("diff %s written: %d images, first divergent %s", batch_id, len(done), first)
    return summary
