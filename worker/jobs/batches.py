"""A batch's bookkeeping: its progress, and its gallery once its last job has ended.

With Redis (a real broker and result backend) each job of a batch records its
start and its end in the batch's progress (producer/batches.py): O(1) per job,
and the job whose end is the batch's last one starts the gallery on a thread
of its own, after its own result. Producers read that progress in O(1) per
refresh.

Without Redis (the embedded mode) each finished job leaves a marker
`batches/<id>/jobs/NNNN-<job_id>.json` in storage and lists the markers; the
marker is written before the listing, so the job that ends last always sees
all of them. Two jobs ending together may both render the gallery, with the
same content.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from producer import contract
from producer.batches import finished_jobs, record_end, record_start
from producer.contract import JobSpec
from producer.settings import Settings
from producer.storage import ObjectNotFound, Store

log = logging.getLogger(__name__)

PAGE_SIZE = 50  # images per gallery page


def start_batch_job(spec: JobSpec, redis: Any, settings: Settings) -> None:
    """Count this job as started in its batch's progress (Redis only); never raises."""
    if not spec.batch_id or spec.batch_total <= 0 or redis is None:
        return
    try:
        record_start(redis, spec.batch_id, spec.job_id, settings.result_expires)
    except Exception:
        log.warning("could not record the start of batch %s's job", spec.batch_id)


def publish_batch(
    spec: JobSpec,
    store: Store,
    status: str,
    redis: Any = None,
    settings: Settings | None = None,
) -> bool:
    """Record this job's end; render the gallery when the batch is complete.

    Returns True when this call wrote the gallery (with Redis: started writing
    it, on a thread of its own, see `finalize_later`). Never raises: a gallery
    problem must not fail a job whose own results are already stored.
    """
    if not spec.batch_id or spec.batch_total <= 0:
        return False
    try:
        if redis is not None:
            ttl = (settings or Settings()).result_expires
            succeeded = status == contract.SUCCEEDED
            finished = record_end(
                redis, spec.batch_id, spec.batch_index, spec.job_id, succeeded, ttl
            )
            if finished != spec.batch_total:
                return False
            job_ids = [job_id for _, job_id in sorted(finished_jobs(redis, spec.batch_id))]
            # After the job, not inside it: the last job's result is not held up by
            # the gallery (one page of PAGE_SIZE images at a time, whatever N is).
            finalize_later(spec.batch_id, job_ids, store, census_top_k(spec))
            return True
        marker = contract.batch_member_key(spec.batch_id, spec.batch_index, spec.job_id)
        store.put(marker, json.dumps({"job_id": spec.job_id, "status": status}).encode())
        members = store.list(f"batches/{spec.batch_id}/jobs/")
        if len(members) < spec.batch_total:
            return False
        finalize(spec.batch_id, [_job_id_of(key) for key in members], store, census_top_k(spec))
        return True
    except Exception:
        log.exception("could not publish the gallery of batch %s", spec.batch_id)
        return False


_finalizers: list[threading.Thread] = []
_finalizers_lock = threading.Lock()


def census_top_k(spec: JobSpec) -> int | None:
    """The census's top-k when the batch is a census (its jobs have `census`), else None;
    -1 for a batch of diff jobs (its summary is diff.json and diff.html)."""
    if spec.kind == contract.JobKind.DIFF:
        return -1
    return spec.options.top_k if spec.options.census else None


def finalize(batch_id: str, job_ids: list[str], store: Store, census: int | None) -> None:
    """The gallery, then a census's fold (census.json, census.html) or a diff batch's
    summary (diff.json, diff.html)."""
    write_gallery(batch_id, job_ids, store)
    if census == -1:
        from worker.jobs.diff_summary import write_diff_summary

        write_diff_summary(batch_id, job_ids, store)
    elif census is not None:
        from worker.jobs.census import write_census

        write_census(batch_id, job_ids, store, census)


def finalize_later(
    batch_id: str, job_ids: list[str], store: Store, census: int | None = None
) -> None:
    """Write the gallery (and a census's fold) on a thread of its own. Not a daemon:
    a worker that is shut down waits for it; one that is killed loses the gallery,
    never a job."""

    def run() -> None:
        try:
            finalize(batch_id, job_ids, store, census)
        except Exception:
            log.exception("could not write the gallery or census of batch %s", batch_id)

    thread = threading.Thread(target=run, name=f"actviz-gallery-{batch_id}")
    with _finalizers_lock:
        _finalizers[:] = [t for t in _finalizers if t.is_alive()]
        _finalizers.append(thread)
    thread.start()


def wait_for_galleries(timeout: float | None = None) -> None:
    """Block until the galleries being written have been (for tests and shutdown)."""
    with _finalizers_lock:
        running = list(_finalizers)
    for thread in running:
        thread.join(timeout)


def write_gallery(batch_id: str, job_ids: list[str], store: Store) -> None:
    """Render the gallery from the jobs' manifests (None for a failed job), PAGE_SIZE
    images a page: batches/<id>/index.html, page-2.html, ... Reads one page's
    manifests at a time, so its memory does not grow with the batch."""
    from worker.report.gallery import render_gallery

    pages = max(1, -(-len(job_ids) // PAGE_SIZE))
    for page in range(1, pages + 1):
        jobs: list[tuple[str, dict[str, Any] | None]] = []
        for job_id in job_ids[(page - 1) * PAGE_SIZE : page * PAGE_SIZE]:
            try:
                manifest = json.loads(store.get(contract.manifest_key(job_id)))
            except ObjectNotFound:
                manifest = None
            jobs.append((job_id, manifest))
        html = render_gallery(batch_id, jobs, page=page, pages=pages)
        store.put(contract.batch_key(batch_id, page), html)
    log.info("batch %s complete: gallery of %d jobs written", batch_id, len(job_ids))


def _job_id_of(marker_key: str) -> str:
    """'batches/b/jobs/0003-abc.json' -> 'abc'."""
    name = marker_key.rsplit("/", 1)[-1]
    return name.split("-", 1)[1].removesuffix(".json")
