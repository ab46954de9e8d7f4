"""Producer -> Redis -> a real `actviz worker` process -> S3 (moto over HTTP) -> Result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import redis
from kombu import Connection, Exchange, Producer, Queue
from stack import ACTVIZ, free_port, start_worker, subprocess_env

from producer import Client, ErrorCode, JobFailed, Settings
from producer.contract import TASK_NAME, manifest_key

REDIS_DB = 10
pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def env(redis_url: str, bucket: str, saved_models: dict[str, Path], tmp_path_factory) -> dict:
    """ACTVIZ_* for the worker and the producers of this module."""
    cache = tmp_path_factory.mktemp("model-cache")
    return subprocess_env(
        ACTVIZ_BROKER_URL=redis_url,
        ACTVIZ_STORAGE_URL=f"s3://{bucket}/results",
        ACTVIZ_MODEL_ALLOW=f"s3://{bucket}/models/,{saved_models['seq'].parent.as_uri()}/",
        ACTVIZ_MODEL_CACHE_DIR=str(cache),
        ACTVIZ_QUEUES="gpu,cpu",
        ACTVIZ_PROGRESS_AFTER_MS="0",  # every stage, however fast the job
    )


@pytest.fixture(scope="module")
def s3_model(s3, bucket: str, saved_models: dict[str, Path]) -> str:  # noqa: ANN001
    key = "models/seq_cnn.keras"
    s3.upload_file(str(saved_models["seq"]), bucket, key)
    return f"s3://{bucket}/{key}"


@pytest.fixture(scope="module")
def metrics_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def worker(env: dict, s3_model: str, metrics_port: int, tmp_path_factory):  # noqa: ANN001, ANN201
    """One `actviz worker` for the module, with the S3 model preloaded and metrics on."""
    log = tmp_path_factory.mktemp("worker") / "worker.log"
    proc = start_worker(
        {**env, "ACTVIZ_METRICS_PORT": str(metrics_port)}, log, "--preload", s3_model
    )
    yield proc
    proc.stop()


@pytest.fixture
def client(env: dict) -> Client:
    return Client(settings=Settings.from_env(environ=env))


def keys_of(s3, bucket: str, prefix: str) -> list[str]:  # noqa: ANN001
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(obj["Key"] for page in pages for obj in page.get("Contents", []))


def test_python_submit_stores_grids_manifest_and_report_in_s3(
    worker, client: Client, s3, bucket: str, s3_model: str, png_bytes: bytes
) -> None:
    job = client.submit(s3_model, png_bytes, layers="conv2d_1,conv2d_2")
    result = job.wait(timeout=60)

    keys = keys_of(s3, bucket, f"results/jobs/{job.id}/")
    names = [k.split(f"{job.id}/", 1)[1] for k in keys]
    assert "manifest.json" in names and "index.html" in names and "input.png" in names
    assert [n for n in names if n.startswith("layers/")] == [
        "layers/00-conv2d_1.png",
        "layers/02-conv2d_2.png",  # NN is the position in the model
    ]
    types = {
        n: s3.head_object(Bucket=bucket, Key=k)["ContentType"]
        for n, k in zip(names, keys, strict=True)
    }
    assert all(t != "binary/octet-stream" for t in types.values()), types
    assert types["manifest.json"] == "application/json"
    assert types["layers/00-conv2d_1.png"] == "image/png"
    assert types["index.html"].startswith("text/html")

    assert result.layers == ["conv2d_1", "conv2d_2"]
    assert result.manifest["job_id"] == job.id
    assert result.manifest["model"]["uri"] == s3_model
    # The worker inherits this run's backend: `make test` runs this test under JAX too.
    assert result.manifest["engine"]["backend"] == os.environ.get("KERAS_BACKEND", "tensorflow")
    grid = result.grid("conv2d_1")
    assert grid.size == (
        result.layer("conv2d_1")["grid"]["width"],
        result.layer("conv2d_1")["grid"]["height"],
    )
    assert len(result.stats("conv2d_2")["mean"]) == 6  # one entry per channel
    with urllib.request.urlopen(result.url("conv2d_1"), timeout=10) as resp:
        assert resp.read().startswith(b"\x89PNG")
    assert job.status() == "succeeded"

    # Every line written while the job ran carries its id, Celery's own lines included.
    lines = worker.log_text().splitlines()
    start = next(i for i, line in enumerate(lines) if f"extract[{job.id}] received" in line)
    end = next(i for i, line in enumerate(lines) if f"extract[{job.id}] succeeded" in line)
    during = [
        line for line in lines[start + 1 : end + 1] if " INFO " in line or " WARNING " in line
    ]
    assert during and all(f" [{job.id}] " in line for line in during), during


def test_result_reads_from_storage_alone_after_redis_is_flushed(
    worker, client: Client, s3_model: str, png_bytes: bytes, redis_url: str, tmp_path: Path
) -> None:
    job = client.submit(s3_model, png_bytes, layers="conv2d_1")
    job.wait(timeout=60)
    redis.Redis.from_url(redis_url).flushdb()

    fresh = Client(settings=client.settings)
    result = fresh.result(job.id)
    assert result.layers == ["conv2d_1"]
    assert fresh.job(job.id).status() == "succeeded"
    out = result.download(tmp_path / "job")
    assert (out / "index.html").is_file() and (out / "layers" / "00-conv2d_1.png").is_file()


def test_same_image_twice_is_uploaded_once(client: Client, s3, bucket: str, tmp_path: Path) -> None:
    import io

    import numpy as np
    from PIL import Image

    # Content no earlier test stored: the first upload must PUT it, the second must not.
    pixels = np.random.default_rng(time.time_ns() % 2**32).integers(0, 255, (20, 24, 3))
    buf = io.BytesIO()
    Image.fromarray(pixels.astype("uint8")).save(buf, format="PNG")
    path = tmp_path / "photo.png"
    path.write_bytes(buf.getvalue())
    puts: list[str] = []
    client.store.client.meta.events.register(
        "before-parameter-build.s3.PutObject", lambda params, **_: puts.append(params["Key"])
    )
    before = keys_of(s3, bucket, "results/inputs/")
    first = client.upload_image(path)
    second = client.upload_image(buf.getvalue())
    after = keys_of(s3, bucket, "results/inputs/")
    assert first == second and first.endswith(".png")
    assert len(puts) == 1 and first.endswith(puts[0])
    assert set(after) - set(before) == {puts[0]}


def test_an_upload_costs_one_request_and_a_stored_large_image_none_but_a_head(
    client: Client, s3, bucket: str
) -> None:
    import io

    import numpy as np
    from PIL import Image

    from producer.client import ASK_FIRST_ABOVE_BYTES

    def random_png(side: int) -> bytes:
        pixels = np.random.default_rng(time.time_ns() % 2**32).integers(0, 255, (side, side, 3))
        buf = io.BytesIO()
        Image.fromarray(pixels.astype("uint8")).save(buf, format="PNG")
        return buf.getvalue()

    small, large = random_png(24), random_png(256)
    assert len(small) <= ASK_FIRST_ABOVE_BYTES < len(large)

    def requests(of: Client, image: bytes) -> list[str]:
        seen: list[str] = []
        events = of.store.client.meta.events
        handlers = {op: (lambda op=op, **_: seen.append(op)) for op in ("PutObject", "HeadObject")}
        for op, handler in handlers.items():
            events.register(f"before-parameter-build.s3.{op}", handler)
        try:
            of.upload_image(image)
        finally:
            for op, handler in handlers.items():
                events.unregister(f"before-parameter-build.s3.{op}", handler)
        return seen

    assert requests(client, small) == ["PutObject"]  # written at once: no HEAD first
    assert requests(client, large) == ["HeadObject", "PutObject"]
    other = Client(settings=client.settings)  # another producer: storage has it
    assert requests(other, large) == ["HeadObject"]
    assert requests(other, large) == []  # and it remembers


def test_second_job_of_a_model_uses_the_warm_model(
    worker, client: Client, s3_model: str, png_bytes: bytes
) -> None:
    first = client.submit(s3_model, png_bytes, layers="conv2d_1")
    first.wait(timeout=60)
    second = client.submit(s3_model, png_bytes, layers="conv2d_1")
    result = second.wait(timeout=60)

    info_first = first.state().info
    info_second = second.state().info
    assert info_second["cache"] == "hit"
    assert info_second["cache_stats"]["misses"] == info_first["cache_stats"]["misses"]
    assert info_second["cache_stats"]["hits"] == info_first["cache_stats"]["hits"] + 1
    assert result.manifest["worker"]["model_cache"] == "hit"
    # The S3 object did not change, so the file on disk was not fetched again.
    assert worker.log_text().count(f"downloading model {s3_model}") == 1


def test_preloaded_model_serves_the_first_job_warm_and_metrics_count_it(
    worker, client: Client, s3_model: str, png_bytes: bytes, metrics_port: int
) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=5) as resp:
        assert resp.status == 200
    result = client.submit(s3_model, png_bytes, layers="conv2d_1").wait(timeout=60)
    assert result.manifest["worker"]["model_cache"] == "hit"
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        metrics = resp.read().decode()
    hits = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith('actviz_model_cache_events_total{event="hit"}')
    ]
    assert hits and hits[0] >= 1
    assert 'actviz_jobs_total{code="",status="succeeded"}' in metrics


def test_bad_input_fails_with_its_code_and_the_next_job_succeeds(
    worker, client: Client, s3, bucket: str, s3_model: str, png_bytes: bytes, tmp_path: Path
) -> None:
    outside = tmp_path / "elsewhere.keras"
    outside.write_bytes(b"not even a model")
    bad = client.submit(outside, png_bytes)
    with pytest.raises(JobFailed) as failed:
        bad.wait(timeout=60)
    assert failed.value.code == ErrorCode.MODEL_NOT_ALLOWED
    assert f"actviz.extract[{bad.id}] retry" not in worker.log_text()  # bad input: no retry
    error = json.loads(
        s3.get_object(Bucket=bucket, Key=f"results/jobs/{bad.id}/error.json")["Body"].read()
    )
    assert error["code"] == ErrorCode.MODEL_NOT_ALLOWED
    assert not keys_of(s3, bucket, f"results/{manifest_key(bad.id)}")
    with pytest.raises(JobFailed) as stored:
        client.result(bad.id)
    assert stored.value.code == ErrorCode.MODEL_NOT_ALLOWED

    not_an_image = client.submit(s3_model, b"GIF89a but not really")
    with pytest.raises(JobFailed) as invalid:
        not_an_image.wait(timeout=60)
    assert invalid.value.code == ErrorCode.INVALID_IMAGE

    good = client.submit(s3_model, png_bytes, layers="conv2d_1")
    assert good.wait(timeout=60).layers == ["conv2d_1"]


def test_message_with_a_bad_job_id_fails_without_writing_anything(
    worker, client: Client, s3, bucket: str, s3_model: str
) -> None:
    message = {"job_id": "../escape", "model": s3_model, "image": "s3://x/y.png"}
    before = keys_of(s3, bucket, "")
    client.app.send_task(TASK_NAME, args=[message], task_id="bad-id-probe", queue="gpu")
    job = client.job("bad-id-probe")
    with pytest.raises(JobFailed) as failed:
        job.wait(timeout=60)
    assert failed.value.code == ErrorCode.INVALID_JOB
    assert keys_of(s3, bucket, "") == before


def test_pickle_message_is_refused_and_logged(worker, redis_url: str, s3, bucket: str) -> None:
    job_id = "pickled-job"
    with Connection(redis_url) as conn:
        gpu = Queue("gpu", Exchange("gpu", type="direct"), routing_key="gpu")
        producer = Producer(conn, exchange=gpu.exchange, routing_key="gpu")
        producer.publish(
            [[{"job_id": job_id, "model": "builtin:demo", "image": "s3://x/y.png"}], {}, {}],
            declare=[gpu],
            serializer="pickle",
            headers={"task": TASK_NAME, "id": job_id},
        )
    worker.wait_for_log("pickle", timeout=30)
    assert (
        "Refusing to deserialize" in worker.log_text() or "untrusted content" in worker.log_text()
    )
    time.sleep(1)
    # Read again: a task that had received it would have logged by now.
    assert f"actviz.extract[{job_id}] received" not in worker.log_text()
    assert not keys_of(s3, bucket, f"results/jobs/{job_id}/")


def test_cli_submit_wait_json_prints_one_object_and_exits_zero(
    worker, env: dict, s3_model: str, png_bytes: bytes, tmp_path: Path, redis_url: str
) -> None:
    image = tmp_path / "cli.png"
    image.write_bytes(png_bytes)
    cmd = [str(ACTVIZ), "submit", "--model", s3_model, "--image", str(image), "--wait", "--json"]
    done = subprocess.run(cmd + ["--layers", "conv2d_2"], env=env, capture_output=True, timeout=90)
    assert done.returncode == 0, done.stderr.decode()
    lines = done.stdout.decode().strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["status"] == "succeeded"
    assert out["manifest"] == f"{env['ACTVIZ_STORAGE_URL']}/jobs/{out['job_id']}/manifest.json"
    assert redis_url in done.stderr.decode()  # which broker it used (no password to hide)

    failed = subprocess.run(
        cmd + ["--layers", "no_such_layer"], env=env, capture_output=True, timeout=90
    )
    assert failed.returncode == 1
    out = json.loads(failed.stdout.decode())
    assert out["status"] == "failed" and out["error"]["code"] == ErrorCode.UNKNOWN_LAYER


def test_producer_never_imports_the_worker_through_submit_wait_fetch_and_the_cli(
    worker, env: dict, s3_model: str, png_bytes: bytes, tmp_path: Path
) -> None:
    image = tmp_path / "light.png"
    image.write_bytes(png_bytes)
    out = tmp_path / "fetched"
    script = f"""
import sys
import producer
from producer import cli
client = producer.Client.from_env()
job = client.submit({s3_model!r}, {str(image)!r}, layers="conv2d_1")
result = job.wait(timeout=60)
result.download({str(out / "api")!r})
assert cli.main(["status", job.id, "--json"]) == 0
assert cli.main(["fetch", job.id, "--out", {str(out / "cli")!r}]) == 0
assert cli.main(["config"]) == 0
assert "tensorflow" not in sys.modules, "tensorflow imported"
assert "keras" not in sys.modules, "keras imported"
loaded = sorted(m for m in sys.modules if m == "worker" or m.startswith("worker."))
assert not loaded, loaded
print("ok", job.id)
"""
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=90)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().splitlines()[-1].startswith("ok ")
    assert (out / "api" / "manifest.json").is_file() and (out / "cli" / "manifest.json").is_file()


def test_worker_commands_without_the_worker_packages_say_which_extra_to_install(
    env: dict,
) -> None:
    """Simulates the light install: prometheus_client (a worker extra) cannot be imported."""
    script = """
import sys
sys.modules["prometheus_client"] = None  # what `pip install actviz` without [worker] lacks
from producer import Client, cli
from producer.errors import ConfigurationError
code = cli.main(["worker"])
try:
    Client(broker_url="memory://").app  # the embedded worker starts here
except ConfigurationError as exc:
    print("embedded:", exc.code, exc.message)
print("worker exit", code)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=90
    )
    assert "worker exit 2" in done.stdout, done.stderr
    assert "pip install 'actviz[worker]'" in done.stderr
    assert "embedded: invalid_config" in done.stdout and "actviz[worker]" in done.stdout


def test_replaced_model_object_is_downloaded_and_loaded_again(
    worker, client: Client, s3, bucket: str, saved_models: dict[str, Path], png_bytes: bytes
) -> None:
    key = "models/replaced.h5"
    uri = f"s3://{bucket}/{key}"
    s3.upload_file(str(saved_models["seq_h5"]), bucket, key)
    first = client.submit(uri, png_bytes, layers="conv2d_1").wait(timeout=60)
    s3.upload_file(str(saved_models["small_h5"]), bucket, key)  # new content, new ETag
    second = client.submit(uri, png_bytes, layers="conv2d_1").wait(timeout=60)

    assert first.manifest["model"]["input_shape"] == [32, 32, 3]
    assert second.manifest["model"]["input_shape"] == [24, 24, 3]
    assert second.manifest["worker"]["model_cache"] == "miss"
    assert worker.log_text().count(f"downloading model {uri}") == 2
    # Each manifest names the bytes it used.
    import hashlib

    for result, name in ((first, "seq_h5"), (second, "small_h5")):
        digest = hashlib.sha256(saved_models[name].read_bytes()).hexdigest()
        assert result.manifest["model"]["sha256"] == digest


def test_cli_batch_status_fetch_and_open(
    worker, env: dict, s3, bucket: str, s3_model: str, png_bytes: bytes, tmp_path: Path
) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "a.png").write_bytes(png_bytes)
    (images / "b.png").write_bytes(png_bytes[:-1] + b"\x00")  # same pixels, other bytes
    (images / "notes.txt").write_text("not an image")

    def actviz(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(ACTVIZ), *args], env=env, capture_output=True, timeout=90)

    done = actviz(
        "batch", "--model", s3_model, "--layers", "conv2d_1", str(images), "--wait", "--json"
    )
    assert done.returncode == 0, done.stderr.decode()
    outcomes = [json.loads(line) for line in done.stdout.decode().splitlines()]
    assert [Path(o["image"]).name for o in outcomes] == ["a.png", "b.png"]
    assert all(o["status"] == "succeeded" for o in outcomes)
    batch_id = outcomes[0]["batch_id"]
    assert outcomes[1]["batch_id"] == batch_id
    gallery = s3.get_object(Bucket=bucket, Key=f"results/batches/{batch_id}/index.html")
    assert gallery["ContentType"].startswith("text/html")
    page = gallery["Body"].read().decode()
    assert all(f"jobs/{o['job_id']}/" in page for o in outcomes)
    assert "a.png" in page and "b.png" in page  # captioned by the user's file names
    # The worker kept the batch's progress in Redis: what `batch --wait` read, in O(1).
    progress = Client(settings=Settings.from_env(environ=env)).batch_progress(batch_id)
    assert (progress.total, progress.started, progress.succeeded, progress.failed) == (2, 2, 2, 0)
    assert sorted(progress.finished_ids) == sorted(o["job_id"] for o in outcomes)
    # No storage markers: the bookkeeping is O(1) per job.
    assert keys_of(s3, bucket, f"results/batches/{batch_id}/jobs/") == []

    job_id = outcomes[0]["job_id"]
    status = actviz("status", job_id, "--json")
    assert json.loads(status.stdout) == {"job_id": job_id, "status": "succeeded"}

    out = tmp_path / "fetched"
    fetched = actviz("fetch", job_id, "--out", str(out))
    assert fetched.returncode == 0, fetched.stderr.decode()
    assert (out / "index.html").is_file() and (out / "manifest.json").is_file()
    assert json.loads((out / "manifest.json").read_text())["job_id"] == job_id

    link = actviz("open", job_id).stdout.decode().strip()
    with urllib.request.urlopen(link, timeout=10) as resp:
        assert b"<html" in resp.read().lower()

    missing = actviz("status", "no-such-job", "--json")
    assert json.loads(missing.stdout)["status"] == "unknown"  # not "queued": nobody sent it
    assert missing.returncode == 1


def test_started_job_reports_each_stage_in_order(
    worker, client: Client, s3_model: str, png_bytes: bytes, redis_url: str
) -> None:
    job_id = "stages-" + str(int(time.time() * 1000))
    # The Redis result backend publishes every state change on the job's key.
    pubsub = redis.Redis.from_url(redis_url).pubsub()
    pubsub.subscribe(f"celery-task-meta-{job_id}")
    client.submit(s3_model, png_bytes, layers="conv2d_1", job_id=job_id).wait(timeout=60)
    seen = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (not seen or seen[-1][0] != "SUCCESS"):
        message = pubsub.get_message(timeout=1)
        if message and message["type"] == "message":
            meta = json.loads(message["data"])
            result = meta.get("result") or {}
            seen.append(
                (meta["status"], result.get("stage") if meta["status"] == "STARTED" else None)
            )
    pubsub.close()
    stages = [stage for status, stage in seen if status == "STARTED" and stage]
    assert stages == ["loading model", "forward", "rendering", "uploading"]
    # Every STARTED write is a stage: Celery's own start write is off with Redis, where
    # the job registry records the start (producer/broker.py).
    assert [status for status, stage in seen if not stage] == ["SUCCESS"]
    assert seen[-1][0] == "SUCCESS"


def _run_with_terminal_stderr(cmd: list[str], env: dict) -> tuple[int, str, str]:
    """Run `cmd` with stderr on a pseudo-terminal (progress on) and stdout on a pipe."""
    import os
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=follower)
    os.close(follower)
    chunks = []
    while True:
        try:
            chunk = os.read(leader, 1 << 16)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        chunks.append(chunk)
    stdout = proc.stdout.read().decode()
    proc.wait(timeout=90)
    os.close(leader)
    return proc.returncode, stdout, b"".join(chunks).decode(errors="replace")


def test_json_output_parses_while_progress_is_shown_on_a_terminal(
    worker, env: dict, s3_model: str, png_bytes: bytes, tmp_path: Path
) -> None:
    images = tmp_path / "progress"
    images.mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(png_bytes[:-1] + bytes([i]))
    base = [str(ACTVIZ), "batch", "--model", s3_model, "--layers", "conv2d_1", str(images)]

    code, stdout, stderr = _run_with_terminal_stderr(base + ["--wait", "--json"], env)
    assert code == 0, stderr
    assert "done 3 · failed 0" in stderr  # the progress bar was drawn on the terminal
    outcomes = [json.loads(line) for line in stdout.splitlines()]
    assert len(outcomes) == 3 and all(o["status"] == "succeeded" for o in outcomes)

    single = [str(ACTVIZ), "submit", "--model", s3_model, "--image", str(images / "0.png")]
    code, stdout, stderr = _run_with_terminal_stderr(single + ["--wait", "--json"], env)
    assert code == 0, stderr
    assert json.loads(stdout)["status"] == "succeeded"
