"""Attacks from the queue: what anyone who can write to Redis can send, against a real worker.

Raw messages are published with kombu, as an attacker would: the official
client cannot produce most of them. After each attack the same worker must
still be up and serve a good job; refused messages are kept on
`actviz:dead-letters` and counted in `actviz_messages_refused_total`.
See docs/security.md for the attack classes.
"""

from __future__ import annotations

import json
import re
import sys
import time
import urllib.request
from pathlib import Path

import harness
import pytest
import redis
from kombu import Connection, Exchange, Producer, Queue

from producer import Client, ErrorCode, JobFailed, Settings
from producer.contract import TASK_NAME
from producer.errors import InvalidJob

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import models as test_models  # noqa: E402

pytestmark = pytest.mark.timeout(240)
GOOD_LAYERS = ["conv_a", "conv_b"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trusted folder and an allowed-but-untrusted one, each with a Lambda model."""
    root = tmp_path_factory.mktemp("model-folders")
    found = {name: root / name for name in ("trusted", "models", "markers")}
    for folder in found.values():
        folder.mkdir()
    markers = found["markers"]
    for name in ("trusted", "models"):
        source = test_models.touch_on_call(markers / f"{name}-lambda-ran")
        test_models.code_lambda_model(found[name] / "lambda.keras", source)
    return found


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return harness.free_port()


@pytest.fixture(scope="module")
def env(
    redis_url: str, bucket: str, models: dict, folders: dict, metrics_port: int, tmp_path_factory
) -> dict:  # noqa: ANN001
    trusted = folders["trusted"].as_uri() + "/"
    return harness.worker_env(
        redis_url,
        f"s3://{bucket}/results",
        [f"s3://{bucket}/models/", trusted, folders["models"].as_uri() + "/"],
        ACTVIZ_MODEL_TRUSTED=trusted,
        ACTVIZ_MODEL_CACHE_DIR=str(tmp_path_factory.mktemp("model-cache")),
        ACTVIZ_METRICS_PORT=str(metrics_port),
    )


@pytest.fixture(scope="module")
def worker(env: dict, tmp_path_factory):  # noqa: ANN001, ANN201
    worker = harness.start_worker(env, tmp_path_factory.mktemp("worker") / "worker.log")
    yield worker
    worker.stop()


@pytest.fixture
def client(env: dict) -> Client:
    return Client(settings=Settings.from_env(environ=env))


def publish(redis_url: str, body: object, headers: dict, **options: object) -> None:
    """Put one message on the 'gpu' queue exactly as given (no client-side checks)."""
    with Connection(redis_url) as conn:
        gpu = Queue("gpu", Exchange("gpu", type="direct"), routing_key="gpu")
        producer = Producer(conn, exchange=gpu.exchange, routing_key="gpu")
        producer.publish(body, declare=[gpu], headers=headers, **options)


def dead_letters(redis_url: str) -> list[dict]:
    conn = redis.Redis.from_url(redis_url)
    try:
        return [json.loads(raw) for raw in conn.lrange("actviz:dead-letters", 0, -1)]
    finally:
        conn.close()


def wait_dead_letter(redis_url: str, reason_part: str) -> dict:
    def found() -> dict | None:
        return next((d for d in dead_letters(redis_url) if reason_part in d["reason"]), None)

    return harness.wait_for(found, 30, f"dead letter {reason_part!r}", 0.2)


def refused_count(port: int, reason: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    match = re.search(rf'actviz_messages_refused_total{{reason="{reason}"}} (\S+)', text)
    return float(match.group(1)) if match else 0.0


def still_serves(worker: harness.Worker, client: Client, models: dict, seed: int) -> None:
    assert worker.alive(), worker.log_text()[-3000:]
    result = client.submit(models["tiny"], harness.random_png(seed, 16, 16)).wait(timeout=60)
    assert result.layers == GOOD_LAYERS


def expect_code(job, code: str) -> str:  # noqa: ANN001
    with pytest.raises(JobFailed) as failed:
        job.wait(timeout=60)
    assert failed.value.code == code, failed.value
    return failed.value.message


def test_encoded_dot_dot_through_the_trusted_prefix_is_refused_and_runs_no_code(
    worker, client: Client, folders: dict, models: dict
) -> None:
    markers = folders["markers"]
    image = client.upload_image(harness.random_png(1, 16, 16))
    trusted_uri = folders["trusted"].as_uri()
    escapes = {
        "escape-2e": f"{trusted_uri}/%2e%2e/models/lambda.keras",
        "escape-2E": f"{trusted_uri}/%2E%2E/models/lambda.keras",
        "escape-double": f"{trusted_uri}/%252e%252e/models/lambda.keras",
        "escape-slash": f"{trusted_uri}/..%2fmodels/lambda.keras",
    }
    for job_id, model in escapes.items():
        message = {"job_id": job_id, "model": model, "image": image}
        client.app.send_task(TASK_NAME, args=[message], task_id=job_id)
    for job_id in escapes:
        expect_code(client.job(job_id), ErrorCode.MODEL_NOT_ALLOWED)
    # The same model by its own name is allowed but untrusted: refused, its code never runs.
    direct = client.submit((folders["models"] / "lambda.keras").as_uri(), image)
    expect_code(direct, ErrorCode.UNSAFE_MODEL)
    assert not (markers / "models-lambda-ran").exists()
    # Control: a Lambda from the trusted folder does run, so the marker would show it.
    trusted = client.submit((folders["trusted"] / "lambda.keras").as_uri(), image)
    assert trusted.wait(timeout=60).layers == ["code", "conv"]
    assert (markers / "trusted-lambda-ran").exists()
    still_serves(worker, client, models, 2)
    harness.record("Security", "encoded '..' out of the trusted prefix", "model_not_allowed")


def test_messages_of_the_wrong_shape_are_dead_lettered_and_the_worker_goes_on(
    worker, client: Client, redis_url: str, models: dict, metrics_port: int
) -> None:
    before = refused_count(metrics_port, "format")
    task = {"task": TASK_NAME}
    publish(redis_url, {"not": "a list"}, {**task, "id": "shape-dict"}, serializer="json")
    publish(redis_url, [[], {}], {**task, "id": "shape-two"}, serializer="json")
    publish(redis_url, [["x", "y"], {}, {}], {**task, "id": "shape-args"}, serializer="json")
    canvas = {"callbacks": [{"task": "celery.accumulate", "args": [1], "kwargs": {}}]}
    publish(redis_url, [[{}], {}, canvas], {**task, "id": "shape-canvas"}, serializer="json")
    for job_id in ("shape-dict", "shape-two", "shape-args", "shape-canvas"):
        harness.wait_for(
            lambda job_id=job_id: any(
                d["headers"].get("id") == job_id for d in dead_letters(redis_url)
            ),
            30,
            f"{job_id} dead-lettered",
            0.2,
        )
    still_serves(worker, client, models, 3)
    assert refused_count(metrics_port, "format") >= before + 4
    assert "Unrecoverable error" not in worker.log_text()
    harness.record("Security", "wrong-shape messages: worker stays up", "4 dead-lettered")


def test_only_the_actviz_task_runs_and_ids_cannot_forge_log_lines(
    worker, client: Client, redis_url: str, models: dict
) -> None:
    body = [[1, 2], {}, {}]
    publish(
        redis_url, body, {"task": "celery.accumulate", "id": "builtin-probe"}, serializer="json"
    )
    wait_dead_letter(redis_url, "is not actviz.extract")
    assert client.app.AsyncResult("builtin-probe").state == "PENDING"  # never ran

    forged = "ok-id\n2099-01-01 00:00:00,000 CRITICAL forged line"
    message = {"job_id": "ok-id", "model": models["tiny"], "image": "s3://x/y.png"}
    publish(redis_url, [[message], {}, {}], {"task": TASK_NAME, "id": forged}, serializer="json")
    wait_dead_letter(redis_url, "task id is not one safe path segment")
    log = worker.log_text()
    assert not any(line.startswith("2099-01-01") for line in log.splitlines())
    still_serves(worker, client, models, 4)


def test_oversized_message_is_dropped_before_it_is_parsed(
    worker, client: Client, redis_url: str, models: dict
) -> None:
    rss_before = worker.rss_kib()
    # 30 MB of small JSON objects: gigabytes of Python objects once parsed.
    flood = [[{"job_id": "flood", "pad": [0] * 10_000_000}], {}, {}]
    publish(redis_url, flood, {"task": TASK_NAME, "id": "flood"}, serializer="json")
    record = wait_dead_letter(redis_url, "not parsed")
    assert record["body_chars"] <= 1024
    still_serves(worker, client, models, 5)
    grown_mib = (worker.rss_kib() - rss_before) / 1024
    assert grown_mib < 200, grown_mib
    harness.record("Security", "30 MB message: worker RSS growth (MiB)", round(grown_mib))


def test_envelope_that_does_not_parse_is_dropped_and_the_worker_goes_on(
    worker, client: Client, redis_url: str, models: dict
) -> None:
    conn = redis.Redis.from_url(redis_url)
    try:  # straight onto the queue's list, as kombu's own envelope would be
        conn.lpush("gpu", "[" * 200_000)
        conn.lpush("gpu", b"\xff not json")
    finally:
        conn.close()
    harness.wait_for(
        lambda: sum("not readable JSON" in d["reason"] for d in dead_letters(redis_url)) >= 2,
        30,
        "both envelopes dead-lettered",
        0.2,
    )
    still_serves(worker, client, models, 11)


def test_pickle_body_is_refused_unread(
    worker, client: Client, redis_url: str, models: dict
) -> None:
    message = {"job_id": "pickled", "model": models["tiny"], "image": "s3://x/y.png"}
    publish(
        redis_url, [[message], {}, {}], {"task": TASK_NAME, "id": "pickled"}, serializer="pickle"
    )
    wait_dead_letter(redis_url, "(pickle) is untrusted content")
    assert client.app.AsyncResult("pickled").state == "PENDING"
    still_serves(worker, client, models, 6)


def test_catastrophic_layer_regex_neither_freezes_the_worker_nor_passes_submit(
    worker, client: Client, models: dict
) -> None:
    image = harness.random_png(7, 16, 16)
    started = time.monotonic()
    job = client.submit(models["tiny"], image, layers="re:(.*){1000}!")
    expect_code(job, ErrorCode.UNKNOWN_LAYER)  # matched in linear time: no layer is named so
    harness.record(
        "Security", "'re:(.*){1000}!' job ends (s)", round(time.monotonic() - started, 1)
    )
    with pytest.raises(InvalidJob, match="RE2"):
        client.submit(models["tiny"], image, layers=r"re:(conv)\1")
    still_serves(worker, client, models, 8)


def test_options_of_the_wrong_type_fail_as_invalid_job_at_submit_and_in_the_worker(
    worker, client: Client, models: dict
) -> None:
    image = client.upload_image(harness.random_png(9, 16, 16))
    for options in ({"top_k": "8"}, {"mean": ["a"], "std": [1.0]}, {"overlay": "yes"}):
        with pytest.raises(InvalidJob):
            client.submit(models["tiny"], image, **options)
        job_id = "wrong-type-" + next(iter(options))
        message = {"job_id": job_id, "model": models["tiny"], "image": image, "options": options}
        client.app.send_task(TASK_NAME, args=[message], task_id=job_id)
        expect_code(client.job(job_id), ErrorCode.INVALID_JOB)
    still_serves(worker, client, models, 10)


def test_remote_control_cannot_stop_the_worker_or_drop_jobs(
    worker, client: Client, models: dict, metrics_port: int
) -> None:
    """Celery's remote control is a fanout message on the same Redis: anyone who can
    write there could send `shutdown` to every worker. Only read-only commands answer."""
    control = client.app.control
    before = refused_count(metrics_port, "control")
    assert control.ping(timeout=3), "ping (read-only) must still answer"
    stats = control.inspect(timeout=3).stats()
    assert stats and all("pool" in reply for reply in stats.values())
    # Commands that change a worker answer with an error and change nothing.
    replies = control.broadcast(
        "cancel_consumer", arguments={"queue": "gpu"}, reply=True, timeout=3
    )
    assert replies and all("error" in r for reply in replies for r in reply.values()), replies
    control.revoke("revoked-probe")
    control.rate_limit(TASK_NAME, "1/h")
    control.time_limit(TASK_NAME, soft=1, hard=2)
    control.broadcast("pool_restart", arguments={"reload": True})
    bodies = (  # what no Celery client sends
        ["shutdown"],
        "shutdown",
        {"method": ["shutdown"]},
        {"method": 7},
        {"method": "stats", "arguments": ["not", "a", "dict"]},
        {"method": "ping", "matcher": "pcre", "pattern": "(a+)+$"},
    )
    with Connection(client.settings.broker_url) as conn:
        mailbox = Producer(conn, exchange=Exchange("celery.pidbox", type="fanout"))
        for body in bodies:
            mailbox.publish(body, serializer="json")
    control.broadcast("shutdown")
    assert control.ping(timeout=3), "remote control still listens after malformed bodies"
    time.sleep(3)
    assert worker.alive(), worker.log_text()[-3000:]
    image = harness.random_png(6, 16, 16)
    jobs = [client.submit(models["tiny"], image, job_id="revoked-probe")]
    jobs += [client.submit(models["tiny"], image) for _ in range(3)]
    assert [job.wait(timeout=60).layers for job in jobs] == [GOOD_LAYERS] * 4
    log = worker.log_text()
    for command in ("cancel_consumer", "revoke", "rate_limit", "time_limit", "shutdown"):
        assert f"command '{command}' refused" in log
    assert "Warm shutdown" not in log
    assert "remote control message refused" in log
    assert refused_count(metrics_port, "control") >= before + 6 + len(bodies)
    harness.record("Security", "remote control: shutdown, revoke, cancel_consumer", "refused")
