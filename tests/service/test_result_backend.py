"""The worker's result backend against a real Redis: one round trip a state, Celery's format."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator

import pytest
import redis
from celery import Celery
from celery.app.backends import by_url
from celery.app.task import Context

from producer.broker import celery_config
from producer.settings import Settings
from worker.result_backend import (
    OneTripRedisBackend,
    OneTripSentinelBackend,
    worker_backend_url,
)

REDIS_DB = 4


@pytest.fixture
def apps(redis_url: str) -> Iterator[tuple[Celery, Celery]]:
    """(a worker's app, a producer's app) on one Redis database."""
    config = celery_config(Settings(broker_url=redis_url))
    worker = Celery("result-backend-worker", set_as_current=False)
    worker.conf.update(config, result_backend=worker_backend_url(redis_url))
    producer = Celery("result-backend-producer", set_as_current=False)
    producer.conf.update(config)
    yield worker, producer
    worker.close()
    producer.close()


def request_for(task_id: str) -> Context:
    """A worker's request for a job (result_extended stores its name and arguments)."""
    message = {"job_id": task_id, "model": "builtin:demo", "image": "s3://b/i.png"}
    return Context(
        id=task_id,
        task="actviz.extract",
        args=[message],
        kwargs={},
        hostname="celery@node",
        delivery_info={"routing_key": "gpu", "exchange": "gpu"},
        retries=0,
    )


def calls(client: redis.Redis) -> dict[str, int]:
    return {
        name.removeprefix("cmdstat_"): stats["calls"]
        for name, stats in client.info("commandstats").items()
    }


def messages(pubsub: redis.client.PubSub) -> list[dict]:
    """The state messages published on the channel the pubsub listens to, so far."""
    out, deadline = [], time.monotonic() + 0.5
    while time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.05)
        if message and message["type"] == "message":
            out.append(json.loads(message["data"]))
    return out


def test_a_state_is_one_script_call_that_producers_read_as_celerys_own(
    apps: tuple[Celery, Celery],
) -> None:
    worker, producer = apps
    backend = worker.backend
    assert isinstance(backend, OneTripRedisBackend)
    task_id = uuid.uuid4().hex
    key = backend.get_key_for_task(task_id)
    client = backend.client
    pubsub = client.pubsub()
    pubsub.subscribe(key)
    before = calls(client)
    backend.store_result(task_id, {"stage": "forward"}, "STARTED", request=request_for(task_id))
    backend.store_result(task_id, {"job_id": task_id}, "SUCCESS", request=request_for(task_id))
    after = calls(client)
    spent = {name: n - before.get(name, 0) for name, n in after.items()}
    # Two states: two script calls (the first loads it), no transaction, no GET of its own.
    assert spent.get("evalsha", 0) + spent.get("eval", 0) == 2 + spent.get("script|load", 0)
    assert spent.get("multi", 0) == 0 and spent.get("exec", 0) == 0
    assert spent.get("get", 0) == 2 and spent.get("setex", 0) == 2  # inside the script
    assert [m["status"] for m in messages(pubsub)] == ["STARTED", "SUCCESS"]
    result = producer.AsyncResult(task_id)
    assert result.state == "SUCCESS" and result.result == {"job_id": task_id}
    assert result.name == "actviz.extract" and result.args[0]["job_id"] == task_id
    assert 0 < client.ttl(key) <= worker.conf.result_expires


def test_a_stored_success_is_never_overwritten_nor_announced_again(
    apps: tuple[Celery, Celery],
) -> None:
    worker, producer = apps
    backend = worker.backend
    task_id = uuid.uuid4().hex
    key = backend.get_key_for_task(task_id)
    backend.store_result(task_id, {"job_id": task_id}, "SUCCESS", request=request_for(task_id))
    stored = backend.client.get(key)
    pubsub = backend.client.pubsub()
    pubsub.subscribe(key)
    # A duplicate delivery that failed, a late stage report: both arrive after the SUCCESS.
    backend.mark_as_failure(task_id, RuntimeError("duplicate"), request=request_for(task_id))
    backend.store_result(task_id, {"stage": "upload"}, "STARTED", request=request_for(task_id))
    assert backend.client.get(key) == stored
    assert messages(pubsub) == []
    assert producer.AsyncResult(task_id).state == "SUCCESS"


def test_a_guarded_state_is_written_only_while_its_guard_is_absent(
    apps: tuple[Celery, Celery],
) -> None:
    """`store_unless`: a job's stage and its cancel check in one script call."""
    worker, producer = apps
    backend = worker.backend
    task_id, guard = uuid.uuid4().hex, f"guard-{uuid.uuid4().hex}"
    key = backend.get_key_for_task(task_id)
    client = backend.client
    pubsub = client.pubsub()
    pubsub.subscribe(key)
    before = calls(client)
    stage = {"stage": "forward"}
    assert backend.store_unless(task_id, stage, "STARTED", request_for(task_id), guard=guard)
    spent = {name: n - before.get(name, 0) for name, n in calls(client).items()}
    assert spent.get("evalsha", 0) + spent.get("eval", 0) == 1 + spent.get("script|load", 0)
    assert spent.get("exists", 0) == 1 and spent.get("setex", 0) == 1  # inside the script
    assert producer.AsyncResult(task_id).info == stage
    stored = client.get(key)
    client.set(guard, b"1")
    late = {"stage": "rendering"}
    assert not backend.store_unless(task_id, late, "STARTED", request_for(task_id), guard=guard)
    assert client.get(key) == stored  # nothing written, nothing announced
    assert [m["result"] for m in messages(pubsub)] == [stage]
    client.delete(guard)


def test_a_value_that_is_not_a_state_is_replaced(apps: tuple[Celery, Celery]) -> None:
    worker, producer = apps
    backend = worker.backend
    task_id = uuid.uuid4().hex
    backend.client.set(backend.get_key_for_task(task_id), b"\xff not json")
    backend.store_result(task_id, {"stage": "forward"}, "STARTED", request=request_for(task_id))
    assert producer.AsyncResult(task_id).state == "STARTED"


def test_only_redis_urls_get_the_one_trip_classes_and_keep_their_address() -> None:
    url = "rediss://:p+ss@cache.example:6380/2?ssl_cert_reqs=required"
    cls, kept = by_url(worker_backend_url(url))
    assert cls is OneTripRedisBackend and kept == url
    sentinels = "sentinel://s1:26379;sentinel://s2:26379/0"
    cls, kept = by_url(worker_backend_url(sentinels))
    assert cls is OneTripSentinelBackend and kept == sentinels
    for other in ("cache+memory://", "db+postgresql://db/results"):
        assert worker_backend_url(other) == other


def test_redis_replies_are_parsed_by_hiredis(apps: tuple[Celery, Celery]) -> None:
    """The result backends' and the broker's connections use hiredis's C parser (the
    `redis[hiredis]` dependency), not redis-py's Python one."""
    from redis._parsers import _HiredisParser

    clients = [app.backend.client for app in apps]
    with apps[0].connection_for_read() as broker:
        clients.append(broker.default_channel.client)
        for client in clients:
            pool = client.connection_pool
            connection = pool.get_connection()
            try:
                connection.connect()
                assert isinstance(connection._parser, _HiredisParser)
            finally:
                pool.release(connection)
