"""A batch's progress in Redis: O(1) requests per look, whatever the batch's size."""

from __future__ import annotations

import uuid

import pytest
import redis as redis_lib
from redis.client import Pipeline

from producer.batches import finished_jobs, read_progress, record_end, record_start, record_total

TTL = 600


@pytest.fixture
def client(redis_url: str):  # noqa: ANN201
    connection = redis_lib.Redis.from_url(redis_url)
    yield connection
    connection.close()


def count_requests(monkeypatch) -> list[str]:  # noqa: ANN001
    """Every round trip to Redis: single commands and pipeline executions."""
    calls: list[str] = []
    single = redis_lib.Redis.execute_command
    pipelined = Pipeline.execute

    def command(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(str(args[0]))
        return single(self, *args, **kwargs)

    def execute(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        calls.append(f"pipeline of {len(self.command_stack)}")
        return pipelined(self, *args, **kwargs)

    monkeypatch.setattr(redis_lib.Redis, "execute_command", command)
    monkeypatch.setattr(Pipeline, "execute", execute)
    return calls


def test_a_look_costs_one_round_trip_whatever_the_batch_size(client, monkeypatch) -> None:  # noqa: ANN001
    batch = uuid.uuid4().hex
    total = 2_000
    ids = [uuid.uuid4().hex for _ in range(total)]
    record_total(client, batch, total, TTL)
    pipe = client.pipeline(transaction=False)
    started, done = f"actviz:batch:{batch}:started", f"actviz:batch:{batch}:done"
    pipe.sadd(started, *ids[:1500])
    pipe.rpush(done, *[f"{i}:{job}" for i, job in enumerate(ids[:1200])])
    pipe.hset(f"actviz:batch:{batch}", mapping={"succeeded": 1150, "failed": 50})
    pipe.execute()
    calls = count_requests(monkeypatch)
    first = read_progress(client, batch)
    assert calls == ["pipeline of 3"]  # counts, started, finished ids: one round trip
    assert (first.total, first.started, first.succeeded, first.failed) == (total, 1500, 1150, 50)
    assert (first.running, first.queued) == (300, 500)
    assert first.finished_ids == ids[:1200] and first.cursor == 1200
    again = read_progress(client, batch, first.cursor)  # nothing new: nothing re-read
    assert again.finished_ids == [] and again.cursor == 1200
    assert calls == ["pipeline of 3", "pipeline of 3"]
    assert read_progress(client, uuid.uuid4().hex) is None  # a batch nobody recorded


def test_each_end_is_counted_once_and_one_caller_sees_the_last(client) -> None:  # noqa: ANN001
    batch = uuid.uuid4().hex
    ids = [uuid.uuid4().hex for _ in range(4)]
    record_total(client, batch, 4, TTL)
    for job in ids:
        record_start(client, batch, job, TTL)
        record_start(client, batch, job, TTL)  # a redelivery starts it again
    counts = [record_end(client, batch, i, job, i != 2, TTL) for i, job in enumerate(ids)]
    assert counts == [1, 2, 3, 4]
    assert record_end(client, batch, 3, ids[3], True, TTL) == -1  # recorded already
    look = read_progress(client, batch)
    assert (look.started, look.succeeded, look.failed, look.running) == (4, 3, 1, 0)
    assert sorted(finished_jobs(client, batch)) == list(enumerate(ids))
    assert 0 < client.ttl(f"actviz:batch:{batch}") <= TTL


def test_the_last_end_marks_the_finalization_pending_in_the_same_step(client) -> None:  # noqa: ANN001
    """No state has the batch's last end recorded and its finalization not pending: a
    worker killed right after recording it left a census that was never written."""
    from producer.batches import pending_finalizations

    batch = uuid.uuid4().hex
    what = '{"census": 3}'
    assert record_end(client, batch, 0, "j0", True, TTL, 2, what) == 1
    assert batch not in pending_finalizations(client)  # not the last
    assert record_end(client, batch, 1, "j1", False, TTL, 2, what) == 2
    assert batch in pending_finalizations(client)
    assert client.get(f"actviz:batch:{batch}:finalize") == what.encode()
    assert 0 < client.ttl(f"actviz:batch:{batch}:finalize") <= TTL
    # The job delivered again (its worker died after recording it) changes nothing.
    assert record_end(client, batch, 1, "j1", True, TTL, 2, what) == -1
    look = read_progress(client, batch)
    assert (look.succeeded, look.failed) == (1, 1)
    client.srem("actviz:finalize:pending", batch)
    other = uuid.uuid4().hex  # without `finalize`, nothing is marked
    assert record_end(client, other, 0, "j0", True, TTL, 1) == 1
    assert other not in pending_finalizations(client)


@pytest.mark.parametrize("with_redis", [True, False])
def test_the_last_job_to_end_writes_the_gallery_once(client, tmp_path, with_redis) -> None:  # noqa: ANN001
    from producer.contract import FAILED, JobSpec, batch_key
    from producer.settings import Settings
    from producer.storage import FileStore
    from worker.jobs.batches import publish_batch, wait_for_galleries

    store = FileStore(tmp_path / "store")
    batch = uuid.uuid4().hex
    ids = [uuid.uuid4().hex for _ in range(3)]
    specs = [
        JobSpec(
            job_id=job,
            model="builtin:demo",
            image="file://x.png",
            batch_id=batch,
            batch_index=i,
            batch_total=3,
        )
        for i, job in enumerate(ids)
    ]
    redis = client if with_redis else None
    wrote = [publish_batch(s, store, FAILED, redis, Settings()) for s in (specs[2], specs[0])]
    assert wrote == [False, False] and not store.exists(batch_key(batch))
    assert publish_batch(specs[1], store, FAILED, redis, Settings()) is True
    wait_for_galleries(30)  # with Redis it is written after the job, on its own thread
    page = store.get(batch_key(batch)).decode()
    # Submission order, whatever the order the jobs ended in.
    assert page.index(ids[0]) < page.index(ids[1]) < page.index(ids[2])
    markers = store.list(f"batches/{batch}/jobs/")
    assert (markers == []) is with_redis  # Redis keeps the count; storage only without it
    # A job recorded again (a redelivery) does not render the gallery a second time.
    assert publish_batch(specs[1], store, FAILED, redis, Settings()) is (not with_redis)


def test_waiting_on_a_large_pending_batch_costs_o1_per_refresh(
    redis_url, tmp_path, monkeypatch
) -> None:  # noqa: ANN001
    """200 queued jobs, no worker: each refresh is one round trip, not 200."""
    import argparse

    from producer.cli import _wait_all
    from producer.client import Client
    from producer.settings import Settings

    settings = Settings(broker_url=redis_url, storage_url=(tmp_path / "store").as_uri())
    client = Client(settings=settings)
    images = [bytes([i % 256, i // 256]) + b"image" for i in range(200)]
    # Nothing consumes this queue: every job stays queued while we wait.
    jobs = client.submit_many("builtin:demo", images, queue="cpu")
    calls = count_requests(monkeypatch)
    args = argparse.Namespace(timeout=1.0, json=True)
    outcomes = _wait_all(jobs, [str(i) for i in range(200)], args)
    assert [o["status"] for o in outcomes] == ["timeout"] * 200
    looks = calls.count("pipeline of 3")
    assert 3 <= looks <= 8  # about one look per 0.2 s
    assert len(calls) <= looks + 2, calls[:20]  # and nothing per pending job


def test_a_stalled_batch_is_swept_ever_less_often(redis_url, tmp_path, monkeypatch) -> None:  # noqa: ANN001
    """Jobs that end without a recorded end are found by a sweep of the pending jobs,
    but only while the batch makes no progress, and less often each time it finds
    nothing: 2 s of a stalled 50-job batch are at most 3 sweeps, not one a refresh."""
    import argparse

    from producer import cli
    from producer.client import Client, Job
    from producer.settings import Settings

    settings = Settings(broker_url=redis_url, storage_url=(tmp_path / "store").as_uri())
    client = Client(settings=settings)
    images = [bytes([i]) + b"stalled" for i in range(50)]
    jobs = client.submit_many("builtin:demo", images, queue="cpu")  # nothing consumes it
    monkeypatch.setattr(cli, "SWEEP_EVERY_S", 0.25)
    asked: list[str] = []
    state = Job.state
    monkeypatch.setattr(Job, "state", lambda self, **kw: asked.append(self.id) or state(self, **kw))
    outcomes = cli._wait_all(
        jobs, [str(i) for i in range(50)], argparse.Namespace(timeout=2.0, json=True)
    )
    assert {o["status"] for o in outcomes} == {"timeout"}
    sweeps, rest = divmod(len(asked), 50)
    assert rest == 0 and 1 <= sweeps <= 3, len(asked)  # 0.25 s, then 0.5 s, then 1 s later


def test_a_finished_jobs_row_costs_one_backend_read_and_no_storage(
    redis_url, tmp_path, monkeypatch
) -> None:  # noqa: ANN001
    """The worker's result names the manifest and the job's files: the batch table links
    each report (its images signed on S3) without reading storage."""
    import argparse

    import redis as redis_lib

    from producer.batches import record_end
    from producer.cli import _wait_all
    from producer.client import Client
    from producer.contract import SUCCEEDED
    from producer.settings import Settings

    settings = Settings(broker_url=redis_url, storage_url=(tmp_path / "store").as_uri())
    client = Client(settings=settings)
    jobs = client.submit_many("builtin:demo", [b"a-done", b"b-done"], queue="cpu")
    connection = redis_lib.Redis.from_url(redis_url)
    for index, job in enumerate(jobs):
        result = {
            "job_id": job.id,
            "status": SUCCEEDED,
            "manifest": client.store.uri(f"jobs/{job.id}/manifest.json"),
            "files": ["depth.svg", "index.html", "input.png", "layers/01-conv1.png"],
        }
        client.app.backend.store_result(job.id, result, "SUCCESS")
        record_end(connection, jobs[0].batch_id, index, job.id, True, 600)
    touched: list[str] = []
    for name in ("get", "exists", "list", "head", "get_at_most"):
        method = getattr(client.store, name)
        monkeypatch.setattr(
            client.store, name, lambda *a, _m=method, _n=name: touched.append(_n) or _m(*a)
        )
    outcomes = _wait_all(jobs, ["a", "b"], argparse.Namespace(timeout=10.0, json=True))
    assert [o["status"] for o in outcomes] == [SUCCEEDED, SUCCEEDED]
    assert touched == []
    assert [o["report"] for o in outcomes] == [
        client.store.presign(f"jobs/{j.id}/index.html") for j in jobs
    ]


def test_a_large_batch_gallery_is_paged_and_each_page_reads_its_own_manifests(
    tmp_path, monkeypatch
) -> None:  # noqa: ANN001
    from producer.contract import batch_key
    from producer.storage import FileStore
    from worker.jobs import batches

    monkeypatch.setattr(batches, "PAGE_SIZE", 4)
    store = FileStore(tmp_path / "store")
    ids = [f"job{i:02d}" for i in range(10)]  # failed jobs: no manifests needed
    reads: list[str] = []
    get = store.get
    monkeypatch.setattr(store, "get", lambda key: reads.append(key) or get(key))
    batches.write_gallery("big", ids, store)
    pages = [store.get(batch_key("big", n)).decode() for n in (1, 2, 3)]
    assert not store.exists(batch_key("big", 4))
    for number, page in enumerate(pages, start=1):
        shown = [job for job in ids if job in page]
        assert shown == ids[(number - 1) * 4 : number * 4]
        assert f"page {number} of 3" in page
    assert 'href="page-2.html"' in pages[0] and 'href="index.html"' in pages[1]
    assert 'rel="next"' not in pages[2]
    manifests = [key for key in reads if key.endswith("manifest.json")]
    assert sorted(manifests) == sorted(f"jobs/{job}/manifest.json" for job in ids)  # once each


def test_the_gallery_is_written_after_the_last_job_not_inside_it(
    client, tmp_path, monkeypatch
) -> None:  # noqa: ANN001
    import threading

    from producer.contract import FAILED, JobSpec
    from producer.settings import Settings
    from producer.storage import FileStore
    from worker.jobs import batches

    release, written = threading.Event(), []
    monkeypatch.setattr(
        batches, "write_gallery", lambda *args: (release.wait(30), written.append(args[0]))
    )
    batch = uuid.uuid4().hex
    spec = JobSpec(
        job_id=uuid.uuid4().hex,
        model="builtin:demo",
        image="file://x.png",
        batch_id=batch,
        batch_index=0,
        batch_total=1,
    )
    store = FileStore(tmp_path / "store")
    # The last job's publish returns while its gallery is still being written...
    assert batches.publish_batch(spec, store, FAILED, client, Settings()) is True
    assert written == []
    release.set()
    batches.wait_for_galleries(30)
    assert written == [batch]  # ...and the gallery is then written, once


def test_a_batch_whose_finalizer_died_is_finalized_by_another_worker(client, tmp_path) -> None:  # noqa: ANN001
    """The worker that recorded a census's last end dies before writing census.json: its
    lease on the finalization expires and another worker's sweep writes it, once."""
    import json
    import time

    from producer.batches import claim_finalize, pending_finalizations
    from producer.contract import batch_key, census_key
    from producer.storage import FileStore
    from worker.jobs.batches import sweep_finalizations

    store = FileStore(tmp_path)
    batch = uuid.uuid4().hex
    record_total(client, batch, 2, 60)
    for index, job_id in enumerate(("j0", "j1")):
        record_end(client, batch, index, job_id, True, 60, 2, json.dumps({"census": 3}))
    assert claim_finalize(client, batch, "the-worker-that-dies", 1) is not None
    assert sweep_finalizations(store, client) == []  # its lease still holds
    assert not store.exists(census_key(batch))
    time.sleep(1.2)
    assert sweep_finalizations(store, client) == [batch]
    census = json.loads(store.get(census_key(batch)))
    assert census["images"] == 0 and census["failed"] == 2  # no manifests in this store
    assert store.exists(batch_key(batch)) and store.exists(census_key(batch, "census.html"))
    assert batch not in pending_finalizations(client)
    assert sweep_finalizations(store, client) == []  # finalized once
