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
import uuid
from typing import Any

from producer import contract
from producer.batches import (
    claim_finalize,
    finish_finalize,
    finished_jobs,
    pending_finalizations,
    record_end,
    record_start,
    renew_finalize,
)
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
            # The last end marks the finalization pending in the same step: if this
            # worker dies before it is written, another takes it over
            # (`sweep_finalizations`).
            what = json.dumps({"census": census_top_k(spec)})
            finished = record_end(
                redis,
                spec.batch_id,
                spec.batch_index,
                spec.job_id,
                succeeded,
                ttl,
                total=spec.batch_total,
                finalize=what,
            )
            if finished != spec.batch_total:
                return False
            # After the job, not inside it: the last job's result is not held up by
            # the gallery (one page of PAGE_SIZE images at a time, whatever N is).
            finalize_later(spec.batch_id, store, redis)
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


LEASE_S = 30  # a finalizing worker renews its lease every third of this


def finalize_later(batch_id: str, store: Store, redis: Any) -> None:
    """Finalize the batch on a thread of its own. Not a daemon: a worker that is shut
    down waits for it; one that is killed leaves it pending for another worker."""

    def run() -> None:
        try:
            finalize_claimed(batch_id, store, redis)
        except Exception:
            log.exception("could not write the gallery or summary of batch %s", batch_id)

    thread = threading.Thread(target=run, name=f"actviz-gallery-{batch_id}")
    with _finalizers_lock:
        _finalizers[:] = [t for t in _finalizers if t.is_alive()]
        _finalizers.append(thread)
    thread.start()


def finalize_claimed(batch_id: str, store: Store, redis: Any) -> bool:
    """Take the batch's finalization lease and finalize it; False if another worker
    holds it or nothing is pending. The lease is renewed while the work runs."""
    owner = uuid.uuid4().hex
    what = claim_finalize(redis, batch_id, owner, LEASE_S)
    if what is None:
        return False
    census = json.loads(what).get("census")
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(LEASE_S / 3):
            renew_finalize(redis, batch_id, owner, LEASE_S)

    renewer = threading.Thread(target=renew, name=f"actviz-lease-{batch_id}", daemon=True)
    renewer.start()
    try:
        job_ids = [job_id for _, job_id in sorted(finished_jobs(redis, batch_id))]
        finalize(batch_id, job_ids, store, census)
    finally:
        stop.set()
    finish_finalize(redis, batch_id)
    return True


def sweep_finalizations(store: Store, redis: Any) -> list[str]:
    """Finalize every pending batch whose lease is free (its finalizer died); returns
    the batches this call finalized."""
    done = []
    for batch_id in pending_finalizations(redis):
        try:
            if finalize_claimed(batch_id, store, redis):
                log.warning("batch %s: its finalizer had stopped; finalized here", batch_id)
                done.append(batch_id)
        except Exception:
            log.exception("could not finalize batch %s", batch_id)
    return done


SWEEP_EVERY_S = 15


def start_sweeper(store: Store, redis: Any, every_s: float = SWEEP_EVERY_S) -> threading.Thread:
    """A daemon thread that runs `sweep_finalizations` every `every_s` seconds, the first
    time at once (a restarted worker takes over what it left)."""

    def loop() -> None:
        while True:
            try:
                sweep_finalizations(store, redis)
            except Exception as exc:  # noqa: BLE001 (Redis away: the next sweep tries again)
                log.warning("finalization sweep failed: %s", exc)
            threading.Event().wait(every_s)

    thread = threading.Thread(target=loop, name="actviz-finalize-sweep", daemon=True)
    thread.start()
    return thread


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
