"""Nothing lost in the pop-then-record window: the job registry and its reconciler.

kombu pops a message and records it as unacknowledged in a second step; a
worker killed between the two loses the job (kombu #305). The producer
registers every job before sending it (producer/job_registry.py); the
reconciler (worker/jobs/reconciler.py) sends again a registered job that no
queue and no worker holds, twice in a row.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import harness
import pytest

from producer import Client, Settings
from producer.broker import arguments_shown
from producer.contract import job_key
from producer.job_registry import RECONCILE_KEY, STARTED, mark_ended, mark_started
from worker.jobs.reconciler import LOCK_KEY, RECONFIRM_S, reconcile

pytestmark = pytest.mark.timeout(240)
AFTER = 60.0


@pytest.fixture
def redis(redis_url: str):  # noqa: ANN201
    import redis as redis_lib

    connection = redis_lib.Redis.from_url(redis_url)
    connection.flushdb()
    yield connection
    connection.close()


@pytest.fixture
def client(redis_url: str, tmp_path: Path) -> Client:
    return Client(settings=Settings(broker_url=redis_url, storage_url=tmp_path.as_uri()))


def task_id(raw: bytes) -> str:
    return json.loads(raw)["headers"]["id"]


def submit(client: Client, data: bytes) -> tuple[str, float]:
    before = time.time()
    job = client.submit("builtin:demo", data, queue="cpu")
    return job.id, before


def test_a_job_is_registered_with_its_message_and_a_check_before_it_is_sent(client, redis) -> None:  # noqa: ANN001
    job_id, before = submit(client, b"registered")
    entry = {k.decode(): v.decode() for k, v in redis.hgetall(job_key(job_id)).items()}
    assert entry["state"] == "queued" and entry["queue"] == "cpu"
    assert json.loads(entry["message"])["job_id"] == job_id
    assert len(entry["digest"]) == 64 and float(entry["submitted_at"]) >= before
    assert 0 < redis.ttl(job_key(job_id)) <= client.settings.result_expires
    assert redis.zscore(RECONCILE_KEY, job_id) == pytest.approx(before + AFTER, abs=5)
    assert [task_id(m) for m in redis.lrange("cpu", 0, -1)] == [job_id]
    # Monitors see the job's id, kind, model and image, not Celery's repr of the message.
    headers = json.loads(redis.lrange("cpu", 0, -1)[0])["headers"]
    assert headers["argsrepr"] == arguments_shown(json.loads(entry["message"]))
    assert job_id in headers["argsrepr"] and "builtin:demo" in headers["argsrepr"]
    assert headers["kwargsrepr"] == "{}"


def test_a_job_lost_between_pop_and_record_is_sent_again_once(client, redis) -> None:  # noqa: ANN001
    lost, t0 = submit(client, b"lost")
    waiting, _ = submit(client, b"waiting")
    held, _ = submit(client, b"held")
    # A worker pops `lost` and dies before recording it; another pops `held` and records
    # it as unacknowledged (what kombu's QoS.append writes); `waiting` stays queued.
    messages = {task_id(m): m for m in redis.lrange("cpu", 0, -1)}
    redis.lrem("cpu", 0, messages[lost])
    redis.lrem("cpu", 0, messages[held])
    record = json.dumps([json.loads(messages[held]), "cpu", "cpu"])
    redis.hset("unacked", "tag-1", record)
    redis.zadd("unacked_index", {"tag-1": t0})

    first = reconcile(client.app, redis, now=t0 + AFTER + 1, after=AFTER)
    assert (first.checked, first.present, first.absent, first.resent) == (3, 2, 1, [])
    assert redis.llen("cpu") == 1  # nothing sent on one look
    # Found again: checked after twice the wait; found nowhere: looked for once more soon.
    assert redis.zscore(RECONCILE_KEY, waiting) == pytest.approx(t0 + 3 * AFTER + 1, abs=1)
    assert redis.zscore(RECONCILE_KEY, lost) == pytest.approx(t0 + AFTER + 1 + RECONFIRM_S)

    second = reconcile(client.app, redis, now=t0 + AFTER + 1 + RECONFIRM_S, after=AFTER)
    assert second.resent == [lost] and second.checked == 1
    queued = [task_id(m) for m in redis.lrange("cpu", 0, -1)]
    assert sorted(queued) == sorted([waiting, lost])  # sent again under its own id, once
    resent = next(json.loads(m) for m in redis.lrange("cpu", 0, -1) if task_id(m) == lost)
    assert resent["headers"]["task"] == "actviz.extract"
    assert lost in resent["headers"]["argsrepr"]  # the job's summary, as its first send's
    assert redis.hget(job_key(lost), "resent") == b"1"
    # Its next look finds it queued: nothing more is sent.
    third = reconcile(client.app, redis, now=t0 + 3 * AFTER, after=AFTER)
    assert third.resent == [] and redis.llen("cpu") == 2


def test_an_ended_or_expired_job_is_no_longer_checked_and_a_started_one_is(client, redis) -> None:  # noqa: ANN001
    ended, t0 = submit(client, b"ended")
    expired, _ = submit(client, b"expired")
    running, _ = submit(client, b"running")
    lost, _ = submit(client, b"started-then-lost")
    messages = {task_id(m): m for m in redis.lrange("cpu", 0, -1)}
    redis.delete("cpu")  # none is queued any more
    for job_id in (running, lost):
        mark_started(redis, job_id)
    # `running` is held by a live worker; `lost`'s unacknowledged record is gone (a
    # failover that replicated the pop but not the record).
    redis.hset("unacked", "tag-9", json.dumps([json.loads(messages[running]), "cpu", "cpu"]))
    redis.zadd("unacked_index", {"tag-9": t0})
    # `lost` still has a record, but not its index entry: nothing would restore it.
    redis.hset("unacked", "tag-8", json.dumps([json.loads(messages[lost]), "cpu", "cpu"]))
    assert redis.hget(job_key(running), "state") == STARTED.encode()
    assert redis.hget(job_key(running), "message") is not None  # kept until it ends
    mark_ended(redis, ended, "succeeded")
    assert redis.hget(job_key(ended), "message") is None
    assert redis.zscore(RECONCILE_KEY, ended) is None
    redis.zadd(RECONCILE_KEY, {ended: t0})  # a stale check is dropped, not acted on
    redis.delete(job_key(expired))
    now = t0 + 10 * AFTER
    first = reconcile(client.app, redis, now=now, after=AFTER)
    assert (first.dropped, first.checked, first.present, first.absent) == (2, 2, 1, 1)
    second = reconcile(client.app, redis, now=now + RECONFIRM_S, after=AFTER)
    assert second.resent == [lost]
    assert [task_id(m) for m in redis.lrange("cpu", 0, -1)] == [lost]
    mark_started(redis, expired)  # an expired entry is not made again
    assert not redis.exists(job_key(expired))


def test_a_dead_consumer_makes_every_registered_job_looked_for_at_once(client, redis) -> None:  # noqa: ANN001
    """A consumer whose liveness key expired may have popped a message it never recorded:
    the next pass looks for every job not started, not only the due ones."""
    from worker.transport import CONSUMERS_KEY, consumer_key

    lost, t0 = submit(client, b"lost-by-the-dead")
    kept, _ = submit(client, b"still-queued")
    redis.lrem("cpu", 0, next(m for m in redis.lrange("cpu", 0, -1) if task_id(m) == lost))
    redis.sadd(CONSUMERS_KEY, "alive-host:1", "dead-host:2")
    redis.set(consumer_key("alive-host:1"), "1", ex=30)
    first = reconcile(client.app, redis, now=t0 + 1, after=AFTER)  # nothing due yet
    assert (first.checked, first.present, first.absent) == (2, 1, 1)
    assert redis.smembers(CONSUMERS_KEY) == {b"alive-host:1"}  # each death handled once
    second = reconcile(client.app, redis, now=t0 + 1 + RECONFIRM_S, after=AFTER)
    assert second.resent == [lost] and second.checked == 1
    assert sorted(task_id(m) for m in redis.lrange("cpu", 0, -1)) == sorted([kept, lost])


def test_one_worker_at_a_time_reconciles(client, redis) -> None:  # noqa: ANN001
    redis.set(LOCK_KEY, "another worker", ex=30)
    assert reconcile(client.app, redis, now=time.time() + 10 * AFTER, after=AFTER) is None


def test_a_worker_killed_between_pop_and_record_loses_no_job(
    redis_url: str, bucket: str, models: dict[str, str], tmp_path: Path
) -> None:
    """A real worker whose pop-then-record window is widened to 120 s takes the job and
    is SIGKILLed inside the window: the queue and the unacknowledged set are both
    empty. With default settings, a new worker's reconciler learns of the death when
    the dead worker's liveness key expires, finds the job nowhere, twice, and sends it
    again within a minute of the kill; it then succeeds once."""
    import redis as redis_lib

    env = harness.worker_env(
        redis_url,
        f"s3://{bucket}/results",
        [f"s3://{bucket}/models/"],
        ACTVIZ_MODEL_CACHE_DIR=str(tmp_path / "cache"),
    )
    connection = redis_lib.Redis.from_url(redis_url)
    client = Client(settings=Settings.from_env(environ=env))
    slow = harness.start_worker({**env, "ACTVIZ_TEST_POP_DELAY_S": "120"}, tmp_path / "w1.log")
    try:
        job = client.submit(models["tiny"], harness.random_png(1, 16, 16))
        harness.wait_for(lambda: connection.llen("gpu") == 0, 60, "the worker to pop the job")
        time.sleep(0.5)
        assert connection.hlen("unacked") == 0  # popped, recorded nowhere
        slow.kill()
    finally:
        slow.kill()
    killed_at = time.monotonic()
    worker = harness.start_worker(env, tmp_path / "w2.log")
    try:
        result = job.wait(timeout=120)
        back_s = time.monotonic() - killed_at
    finally:
        worker.stop()
    assert result.layers == ["conv_a", "conv_b"]
    assert connection.hget(job_key(job.id), "resent") == b"1"
    assert back_s < 60 + 30  # sent again within a minute; the rest is the run itself
    assert "sent 1 lost job(s) again" in (tmp_path / "w2.log").read_text()
    harness.record(
        "Lost in the pop-then-record window",
        "job back and done after the kill (s)",
        round(back_s, 1),
    )
