"""The batch gallery: written by whichever worker finishes the last job of a batch.

Each finished job of a batch (succeeded or failed) leaves a marker
`batches/<id>/jobs/NNNN-<job_id>.json`, then lists the markers. The marker is
written before the listing, so the job that ends last always sees all of them
and renders `batches/<id>/index.html`; two jobs ending together may both
render it, with the same content.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from producer import contract
from producer.contract import JobSpec
from producer.storage import ObjectNotFound, Store

log = logging.getLogger(__name__)


def publish_batch(spec: JobSpec, store: Store, status: str) -> bool:
    """Record this job's end; render the gallery when the batch is complete.

    Returns True when this call wrote the gallery. Never raises: a gallery
    problem must not fail a job whose own results are already stored.
    """
    if not spec.batch_id or spec.batch_total <= 0:
        return False
    try:
        marker = contract.batch_member_key(spec.batch_id, spec.batch_index, spec.job_id)
        store.put(marker, json.dumps({"job_id": spec.job_id, "status": status}).encode())
        members = store.list(f"batches/{spec.batch_id}/jobs/")
        if len(members) < spec.batch_total:
            return False
        write_gallery(spec.batch_id, [_job_id_of(key) for key in members], store)
        return True
    except Exception:
        log.exception("could not publish the gallery of batch %s", spec.batch_id)
        return False


def write_gallery(batch_id: str, job_ids: list[str], store: Store) -> None:
    """Render batches/<id>/index.html from the jobs' manifests (None for a failed job)."""
    from worker.report.gallery import render_gallery

    jobs: list[tuple[str, dict[str, Any] | None]] = []
    for job_id in job_ids:
        try:
            manifest = json.loads(store.get(contract.manifest_key(job_id)))
        except ObjectNotFound:
            manifest = None
        jobs.append((job_id, manifest))
    store.put(contract.batch_key(batch_id), render_gallery(batch_id, jobs))
    log.info("batch %s complete: gallery of %d jobs written", batch_id, len(jobs))


def _job_id_of(marker_key: str) -> str:
    """'batches/b/jobs/0003-abc.json' -> 'abc'."""
    name = marker_key.rsplit("/", 1)[-1]
    return name.split("-", 1)[1].removesuffix(".json")
