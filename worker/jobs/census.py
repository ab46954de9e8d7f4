"""A census's fold: its jobs' manifests -> batches/<id>/census.json and census.html.

Run once a census batch's last job has ended, where the gallery is written
(worker/jobs/batches.py). The jobs are folded PART_SIZE at a time into a
partial `Census` (worker/engine/census.py), each written to
`batches/<id>/census/part-NNNN.json` before the next is read, then merged:
memory holds one manifest and the mergeable state, whatever the batch's size.
A part already written for the same jobs is read instead of folded again, so
a fold that stopped (its worker killed) resumes where it was, and a census
submitted again with the same batch id (producer.client.Client.census with
`batch_id`) skips both its finished jobs and its finished parts.
"""

from __future__ import annotations

import json
import logging

from producer import contract
from producer.storage import ObjectNotFound, Store
from worker.engine.census import Census

log = logging.getLogger(__name__)

PART_SIZE = 500  # jobs per partial fold


def write_census(batch_id: str, job_ids: list[str], store: Store, top_k: int) -> Census:
    """Fold, write census.json and census.html; returns the census."""
    from worker.report.census import render_census

    total = Census(top_k)
    for number, start in enumerate(range(0, len(job_ids), PART_SIZE), start=1):
        chunk = job_ids[start : start + PART_SIZE]
        key = contract.census_part_key(batch_id, number)
        part = _read_part(store, key, chunk)
        if part is None:
            part = fold(chunk, store, top_k)
            body = {**part.to_dict(), "chunk": chunk}
            store.put(key, json.dumps(body, separators=(",", ":")).encode())
        total.merge(part)
    result = total.to_dict(with_jobs=False)
    result["batch_id"] = batch_id
    store.put(contract.census_key(batch_id), json.dumps(result, separators=(",", ":")).encode())
    store.put(contract.census_key(batch_id, "census.html"), render_census(result))
    log.info("census %s written: %d images, %d failed", batch_id, len(total), total.failed)
    return total


def fold(job_ids: list[str], store: Store, top_k: int) -> Census:
    """A Census of `job_ids`' manifests, read one at a time; a job without one counts as failed."""
    census = Census(top_k)
    for job_id in job_ids:
        try:
            manifest = json.loads(store.get(contract.manifest_key(job_id)))
        except ObjectNotFound:
            census.failed += 1
            continue
        census.add(job_id, manifest)
    return census


def _read_part(store: Store, key: str, chunk: list[str]) -> Census | None:
    try:
        data = json.loads(store.get(key))
    except (ObjectNotFound, ValueError):
        return None
    if data.get("chunk") != chunk:
        return None
    return Census.from_dict(data)
