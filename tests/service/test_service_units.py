"""Pure logic of the service parts: no broker, no worker process."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest

from producer import Client, ErrorCode, Settings
from producer.broker import celery_config
from producer.client import sniff_extension
from producer.contract import TASK_NAME
from producer.errors import (
    ConfigurationError,
    InputNotFound,
    InvalidJob,
    ModelNotAllowed,
    ModelNotFound,
    PayloadTooLarge,
    StorageUnavailable,
)
from producer.registry import load_registry, resolve_model
from producer.settings import MIN_REDELIVER_AFTER
from worker.jobs.limits import HARD_LIMIT_EXIT
from worker.runtime.cache import ModelCache
from worker.runtime.fetch import check_model_allowed


class FakeLoaded:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes


def test_cache_second_get_is_a_hit_and_does_not_load_again() -> None:
    cache = ModelCache(max_models=2, max_bytes=1000)
    loads = []
    first, event1 = cache.get_or_load("m#1", lambda: loads.append(1) or FakeLoaded(10))
    second, event2 = cache.get_or_load("m#1", lambda: loads.append(1) or FakeLoaded(10))
    assert (event1, event2) == ("miss", "hit")
    assert first is second and len(loads) == 1
    assert cache.stats()["hits"] == 1 and cache.stats()["misses"] == 1


def test_cache_evicts_least_recently_used_by_count() -> None:
    cache = ModelCache(max_models=2, max_bytes=10**9)
    for key in ("a", "b"):
        cache.get_or_load(key, lambda: FakeLoaded(1))
    cache.get_or_load("a", lambda: FakeLoaded(1))  # a is now the most recent
    cache.get_or_load("c", lambda: FakeLoaded(1))
    assert "b" not in cache and "a" in cache and "c" in cache
    assert cache.stats()["evictions"] == 1


def test_cache_evicts_by_bytes_but_keeps_the_model_just_loaded() -> None:
    cache = ModelCache(max_models=10, max_bytes=100)
    cache.get_or_load("small", lambda: FakeLoaded(60))
    cache.get_or_load("big", lambda: FakeLoaded(500))
    assert "small" not in cache and "big" in cache
    assert cache.stats()["bytes"] == 500


def test_a_settled_worker_still_frees_an_evicted_model() -> None:
    """A worker freezes its long-lived heap (worker/runtime/heap.py); a model it evicts
    afterwards, held in a reference cycle as Keras graphs are, is still freed."""
    import gc
    import weakref

    from worker.runtime import heap
    from worker.runtime.process import WorkerRuntime

    class Cyclic(FakeLoaded):
        def __init__(self) -> None:
            super().__init__(1)
            self.itself = self

    cache = ModelCache(max_models=1, max_bytes=10**9)
    gone = weakref.ref(cache.get_or_load("a#1", Cyclic)[0])
    try:
        WorkerRuntime(Settings()).settle_heap()  # the embedded mode: a user's process
        assert gc.get_freeze_count() == 0
        WorkerRuntime(Settings(broker_url="redis://unused")).settle_heap()
        assert gc.get_freeze_count() > 0 and gone() is not None
        cache.get_or_load("b#1", Cyclic)  # evicts a#1
        assert gone() is None
    finally:
        heap.thaw()


def test_cache_keeps_nothing_when_loading_fails() -> None:
    cache = ModelCache(max_models=2, max_bytes=100)

    def broken() -> FakeLoaded:
        raise ModelNotFound("gone")

    with pytest.raises(ModelNotFound):
        cache.get_or_load("m", broken)
    assert "m" not in cache and cache.stats()["misses"] == 0


def test_model_references_resolve_to_absolute_uris(tmp_path: Path) -> None:
    registry = tmp_path / "models.toml"
    registry.write_text('[models]\nvgg = "s3://models/vgg16.keras"\n')
    names = load_registry(str(registry))
    assert resolve_model("vgg", names) == "s3://models/vgg16.keras"
    assert resolve_model("s3://b/m.h5") == "s3://b/m.h5"
    assert resolve_model("builtin:demo") == "builtin:demo"
    assert resolve_model(tmp_path / "sub" / ".." / "m.h5") == (tmp_path / "m.h5").as_uri()
    assert resolve_model("file://" + str(tmp_path / "m.keras")) == (tmp_path / "m.keras").as_uri()
    json_registry = tmp_path / "models.json"
    json_registry.write_text(json.dumps({"tiny": "file:///models/tiny.keras"}))
    assert resolve_model("tiny", load_registry(str(json_registry))) == "file:///models/tiny.keras"
    with pytest.raises(ModelNotFound, match="registry names: vgg"):
        resolve_model("resnet", names)
    with pytest.raises(ModelNotFound, match="unsupported scheme"):
        resolve_model("http://example.com/m.h5")


def test_allow_list_refuses_other_sources_and_dot_dot() -> None:
    settings = Settings(broker_url="redis://x", model_allow=("s3://models/", "file:///srv/m/"))
    check_model_allowed("s3://models/vgg.keras", settings)
    check_model_allowed("file:///srv/m/a.h5", settings)
    for uri in ("s3://other/vgg.keras", "file:///etc/a.h5", "file:///srv/m/../../etc/a.h5"):
        with pytest.raises(ModelNotAllowed) as err:
            check_model_allowed(uri, settings)
        assert err.value.code == ErrorCode.MODEL_NOT_ALLOWED
    embedded = Settings(model_allow=("builtin:",))
    check_model_allowed("file:///home/me/model.keras", embedded)  # same user, same process
    with pytest.raises(ModelNotAllowed):
        check_model_allowed("s3://models/vgg.keras", embedded)


def test_submit_rejects_bad_input_before_anything_is_queued(tmp_path: Path) -> None:
    settings = Settings(storage_url=(tmp_path / "store").as_uri(), max_image_bytes=100)
    client = Client(settings=settings)
    with pytest.raises(PayloadTooLarge) as too_big:
        client.submit("builtin:demo", b"\x89PNG\r\n\x1a\n" + b"0" * 200)
    assert too_big.value.code == ErrorCode.PAYLOAD_TOO_LARGE
    with pytest.raises(InputNotFound):
        client.submit("builtin:demo", tmp_path / "missing.png")
    with pytest.raises(InvalidJob, match="queue"):
        client.submit("builtin:demo", b"x", queue="tpu")
    with pytest.raises(InvalidJob, match="priority"):
        client.submit("builtin:demo", b"x", priority=12)
    with pytest.raises(InvalidJob, match="unknown job options"):
        client.submit("builtin:demo", b"x", colour="red")
    with pytest.raises(InvalidJob, match="job id"):
        client.submit("builtin:demo", b"x", job_id="../../etc")
    assert client._app is None  # no broker (and no embedded worker) was touched
    assert not (tmp_path / "store").exists() or not list((tmp_path / "store").rglob("*.png"))


def test_image_names_follow_their_content() -> None:
    assert sniff_extension(b"\x89PNG\r\n\x1a\n....") == "png"
    assert sniff_extension(b"\xff\xd8\xff\xe0....") == "jpg"
    assert sniff_extension(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "webp"
    assert sniff_extension(b"????", "photo.TIFF") == "tiff"
    assert sniff_extension(b"????") == "bin"


def test_the_visibility_timeout_spans_two_heartbeats_at_every_redelivery_time() -> None:
    """A live worker's held jobs outlast one late heartbeat (the timeout is at least two
    beats), and a dead worker's come back within ACTVIZ_REDELIVER_AFTER (one beat, the
    timeout and a 1 s sweep), for every value the settings accept."""
    for after in range(MIN_REDELIVER_AFTER, 601):
        settings = Settings(redeliver_after=after)
        assert settings.visibility_timeout >= 2 * settings.heartbeat_s, after
        assert settings.visibility_timeout + settings.heartbeat_s + 1 <= after, after
    assert Settings(redeliver_after=4).heartbeat_s == pytest.approx(4 / 6)
    assert Settings(redeliver_after=4).visibility_timeout == 2
    for after in (1, 2, 3, -1):
        with pytest.raises(ConfigurationError, match="ACTVIZ_REDELIVER_AFTER"):
            Settings(redeliver_after=after)
    with pytest.raises(ConfigurationError, match="ACTVIZ_REDELIVER_AFTER=3"):
        Settings.from_env(environ={"ACTVIZ_REDELIVER_AFTER": "3"})
    with pytest.raises(ConfigurationError, match="ACTVIZ_BATCH_SIZE='eight'"):
        Settings.from_env(environ={"ACTVIZ_BATCH_SIZE": "eight"})


def test_broker_config_is_json_only_with_one_visibility_timeout() -> None:
    settings = Settings(broker_url="rediss://:pw@redis:6380/0", time_limit=100)
    # Dead workers' jobs back within a minute: the last re-stamp may be a heartbeat (10 s)
    # before the death, and the restore sweep runs every second.
    assert settings.heartbeat_s == 10.0 and settings.visibility_timeout == 49
    assert settings.visibility_timeout + settings.heartbeat_s + 1 <= settings.redeliver_after
    assert Settings(redeliver_after=8).heartbeat_s == pytest.approx(8 / 6)
    assert Settings(redeliver_after=8).visibility_timeout == 5
    assert Settings(time_limit=100, redeliver_after=0).visibility_timeout == 260
    config = celery_config(settings)
    assert config["accept_content"] == ["json"] and config["result_accept_content"] == ["json"]
    assert config["task_serializer"] == "json"
    transport = config["broker_transport_options"]
    assert transport["visibility_timeout"] == settings.visibility_timeout
    assert config["result_backend_transport_options"]["visibility_timeout"] == (
        settings.visibility_timeout
    )
    assert transport["actviz_heartbeat"] == settings.heartbeat_s
    assert transport["unacked_restore_interval"] == 1
    assert transport["queue_order_strategy"] == "priority"
    assert transport["priority_steps"] == list(range(10))
    assert "broker_use_ssl" in config  # rediss:// without ssl_cert_reqs gets verification


def test_worker_task_retries_only_transient_errors() -> None:
    from worker.app import create_app

    settings = Settings(broker_url="redis://127.0.0.1:6379/15", max_retries=4)
    app = create_app(settings)
    task = app.tasks[TASK_NAME]
    assert issubclass(StorageUnavailable, task.autoretry_for)
    assert not issubclass(ModelNotAllowed, task.autoretry_for)
    assert task.max_retries == 4 and task.retry_backoff and task.retry_jitter
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.worker_prefetch_multiplier == 1


def test_symlink_in_an_allowed_folder_cannot_reach_outside(tmp_path: Path) -> None:
    from worker.runtime.fetch import fetch_model

    allowed, outside = tmp_path / "models", tmp_path / "private"
    allowed.mkdir()
    outside.mkdir()
    (outside / "secret.h5").write_bytes(b"weights")
    (allowed / "link.h5").symlink_to(outside / "secret.h5")
    (allowed / "real.h5").write_bytes(b"weights")
    settings = Settings(broker_url="redis://x", model_allow=(allowed.as_uri() + "/",))
    assert fetch_model((allowed / "real.h5").as_uri(), settings).path == allowed / "real.h5"
    with pytest.raises(ModelNotAllowed, match="resolves to"):
        fetch_model((allowed / "link.h5").as_uri(), settings)


def test_a_worker_reads_local_images_from_its_result_store_only(tmp_path: Path) -> None:
    from producer.errors import ImageTooLarge
    from producer.storage import FileStore
    from worker.runtime.fetch import read_image

    results, outside = tmp_path / "results", tmp_path / "private"
    (results / "images").mkdir(parents=True)
    outside.mkdir()
    (results / "images" / "a.jpg").write_bytes(b"jpeg")
    (outside / "b.jpg").write_bytes(b"secret")
    (results / "images" / "link.jpg").symlink_to(outside / "b.jpg")
    (results / "images" / "folder.jpg").mkdir()
    store = FileStore(results)
    settings = Settings(broker_url="redis://x", storage_url=results.as_uri(), max_image_bytes=5)
    assert read_image((results / "images" / "a.jpg").as_uri(), store, settings) == b"jpeg"
    for uri in ((outside / "b.jpg").as_uri(), f"{results.as_uri()}/images/../../private/b.jpg"):
        with pytest.raises(InputNotFound, match="outside the result store"):
            read_image(uri, store, settings)
    # A symlink in the store is judged by its target.
    with pytest.raises(InputNotFound, match="outside the result store"):
        read_image((results / "images" / "link.jpg").as_uri(), store, settings)
    for missing in ("none.jpg", "folder.jpg", "a.jpg/x.jpg"):
        with pytest.raises(InputNotFound, match="does not exist"):
            read_image(f"{(results / 'images').as_uri()}/{missing}", store, settings)
    (results / "images" / "big.jpg").write_bytes(b"123456")
    with pytest.raises(ImageTooLarge, match="6 bytes, above the 5-byte limit"):
        read_image((results / "images" / "big.jpg").as_uri(), store, settings)
    # The embedded mode (producer and worker one user) reads a local file from anywhere.
    embedded = Settings(storage_url=results.as_uri())
    assert read_image((outside / "b.jpg").as_uri(), store, embedded) == b"secret"


def test_trust_and_allow_are_decided_on_the_decoded_resolved_path(tmp_path: Path) -> None:
    from worker.runtime.fetch import canonical_model_uri, fetch_model

    trusted, plain = tmp_path / "trusted", tmp_path / "models"
    trusted.mkdir()
    plain.mkdir()
    (plain / "m.keras").write_bytes(b"PK")
    (trusted / "link.keras").symlink_to(plain / "m.keras")
    settings = Settings(
        broker_url="redis://x",
        model_allow=(trusted.as_uri() + "/", plain.as_uri() + "/"),
        model_trusted=(trusted.as_uri() + "/",),
    )
    for hidden in ("%2e%2e", "%2E%2e", "%252e%252e", "..%2F", ".%2e"):
        uri = f"{trusted.as_uri()}/{hidden}/models/m.keras"
        with pytest.raises(ModelNotAllowed):
            check_model_allowed(uri, settings)
    with pytest.raises(ModelNotAllowed):
        check_model_allowed(f"{plain.as_uri()}/m%0a.keras", settings)
    assert not fetch_model(f"{plain.as_uri()}/m.keras", settings).trusted
    # A symlink in the trusted folder to an untrusted file is judged by its target.
    linked = fetch_model(f"{trusted.as_uri()}/link.keras", settings)
    assert not linked.trusted and linked.path == (plain / "m.keras").resolve()
    assert canonical_model_uri(f"{plain.as_uri()}/a%20b.keras").endswith("/models/a%20b.keras")


def test_job_ids_refuse_a_trailing_newline_and_the_contract_checks_option_types() -> None:
    from producer.contract import JobOptions, JobSpec, valid_job_id

    assert valid_job_id("abc") and not valid_job_id("abc\n") and not valid_job_id(None)
    for bad in (
        {"top_k": "8"},
        {"top_k": True},
        {"top_k": 100_000},
        {"mean": ["a"]},
        {"std": [0.0]},
        {"percentile": "99"},
        {"normalize": "percentile", "percentile": 20},
        {"colormap": "../x"},
        {"overlay": "yes"},
        {"layers": 3},
        {"layers": "re:(a)\\1"},
        {"layers": "x" * 5000},
        {"layers": "conv\n1"},
    ):
        with pytest.raises(ValueError):
            JobOptions.from_dict(bad)
    with pytest.raises(ValueError):
        JobSpec.from_message({"job_id": "a", "model": "m", "image": ["not", "a", "uri"]})
    with pytest.raises(ValueError):
        JobSpec.from_message({"job_id": "a", "model": "m", "image": "i", "batch_index": "0"})
    assert JobOptions.from_dict({"layers": "re:^conv", "top_k": 3}).top_k == 3


def test_urls_are_redacted_whatever_the_password_holds() -> None:
    from producer.settings import redact_url
    from worker.logs import configure_logging, mask_credentials

    password = "p@ss:w/rd?#x y"
    url = f"redis://:{quote(password, safe='@:')}@127.0.0.1:6379/0"
    assert redact_url(url) == "redis://***@127.0.0.1:6379/0"
    assert redact_url("rediss://user:a@b@host/1?x=y") == "rediss://***@host/1?x=y"
    assert redact_url("s3://bucket/key@v1") == "s3://bucket/key@v1"
    settings = Settings(broker_url=url)
    assert password in settings.secrets()
    configure_logging(settings, stream=io.StringIO())
    try:
        line = mask_credentials(f"connect {url}: auth {password} failed for {password!r}")
    finally:
        configure_logging(Settings(), stream=io.StringIO())
    assert "p@ss" not in line and "w/rd" not in line and "rd%3F" not in line, line
    assert "redis://***@127.0.0.1:6379/0" in line


def run_limited(
    limits: str, body: str, jobs: int = 1, after: str = ""
) -> subprocess.CompletedProcess:
    """A Python process that runs `jobs` jobs one after another, each `body` under
    `time_limits(<limits>, may_exit=True)` on a thread of its own, then `after` and
    prints 'finished'."""
    script = (
        "import re, threading, time\n"
        "from worker.jobs.limits import time_limits\n"
        "def job():\n"
        f"    with time_limits({limits}, may_exit=True):\n"
        f"        {body}\n"
        f"for _ in range({jobs}):\n"
        "    t = threading.Thread(target=job)\n"
        "    t.start()\n"
        "    t.join()\n"
        f"{after}\n"
        "print('finished')\n"
    )
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )


def test_hard_limit_ends_a_process_whose_thread_holds_the_interpreter_lock() -> None:
    """A backtracking regex on a pool thread: no Python watchdog can run, faulthandler's can."""
    done = run_limited("'stuck', 1, 2", "re.match(r'(.*){30}!', 'a' * 40)")
    assert done.returncode == 1, done.stderr[-2000:]
    assert "finished" not in done.stdout
    assert "Timeout" in done.stderr and "in job" in done.stderr  # faulthandler's stack dump


def test_hard_limit_ends_a_waiting_job_with_its_own_exit_status() -> None:
    """The watchdog (not the backstop) ends a process whose job waits past its hard limit."""
    started = time.monotonic()
    done = run_limited("'slow', 0, 1", "time.sleep(30)")
    assert done.returncode == HARD_LIMIT_EXIT, done.stderr[-2000:]
    assert "finished" not in done.stdout and "hard time limit" in done.stderr
    assert time.monotonic() - started < 25  # the job's 30 s sleep was cut short


def test_time_limits_of_many_jobs_share_one_timer_and_ended_jobs_never_fire() -> None:
    """50 jobs on pool threads end before their limits; none of their limits fires later."""
    done = run_limited(
        "'quick', 0.5, 1",
        "pass",
        jobs=50,
        # Past every hard limit and the timer's longest sleep; then count timer threads.
        after="time.sleep(4); print(sum(t.name.startswith('Timer-') for t in threading.enumerate()))",
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1", "finished"]  # one timer thread for 100 deadlines


def test_the_consumer_gate_passes_job_messages_and_their_retries_only() -> None:
    import datetime

    from worker.consumer import refusal

    job = {"task": TASK_NAME, "id": "job-1"}
    body = json.dumps([[{"job_id": "job-1"}], {}, {"callbacks": None, "chain": None}])
    soon = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=60)
    assert refusal(job, "application/json", body) is None
    assert refusal({**job, "eta": soon.isoformat()}, "application/json", body) is None  # retry
    refused = {
        "builtin task": ({**job, "task": "celery.accumulate"}, "application/json", body),
        "no headers": (None, "application/json", body),
        "newline id": ({**job, "id": "job-1\n"}, "application/json", body),
        "pickle": (job, "application/x-python-serialize", b"\x80\x04."),
        "far eta": ({**job, "eta": "2099-01-01T00:00:00+00:00"}, "application/json", body),
        "group": ({**job, "group": "g"}, "application/json", body),
        "dict body": (job, "application/json", '{"not": "a list"}'),
        "two args": (job, "application/json", json.dumps([[1, 2], {}, {}])),
        "callback": (job, "application/json", json.dumps([[{}], {}, {"callbacks": [{}]}])),
        "not json": (job, "application/json", b"\xff\xfe"),
        "huge": (job, "application/json", "[" * 300_000),
    }
    for name, args in refused.items():
        assert refusal(*args) is not None, name


def test_the_consumer_gate_refuses_a_body_nested_too_deeply_to_parse() -> None:
    from worker.consumer import refusal

    deep = "[" * 100_000 + "]" * 100_000  # 200 KB: under the size bound, over the parser's
    assert refusal({"task": TASK_NAME, "id": "j"}, "application/json", deep) is not None


def test_a_cold_load_does_not_hold_up_a_warm_model() -> None:
    """The cold load finishes only after the warm hit returned: no lock may join them."""
    import threading

    cache = ModelCache(max_models=4, max_bytes=10_000)
    cache.get_or_load("warm#1", lambda: FakeLoaded(10))
    warm_served = threading.Event()

    def slow_load() -> FakeLoaded:
        assert warm_served.wait(30), "the warm hit waited for the cold load"
        return FakeLoaded(20)

    cold = threading.Thread(target=cache.get_or_load, args=("cold#1", slow_load))
    cold.start()
    hit = threading.Thread(
        target=lambda: cache.get_or_load("warm#1", lambda: FakeLoaded(99)) and warm_served.set()
    )
    hit.start()
    hit.join(20)
    assert warm_served.is_set()
    cold.join(20)
    assert "cold#1" in cache and cache.stats()["hits"] == 1 and cache.stats()["misses"] == 2


def test_callers_of_one_key_share_its_single_load() -> None:
    import threading

    cache = ModelCache(max_models=4, max_bytes=10_000)
    loads = []
    started = threading.Event()
    release = threading.Event()

    def load() -> FakeLoaded:
        loads.append(1)
        started.set()
        release.wait(20)
        return FakeLoaded(10)

    first = threading.Thread(target=cache.get_or_load, args=("m#1", load))
    first.start()
    started.wait(20)
    results = []
    second = threading.Thread(target=lambda: results.append(cache.get_or_load("m#1", load)))
    second.start()
    release.set()
    first.join(20)
    second.join(20)
    assert len(loads) == 1 and results[0][1] == "hit"


def test_a_job_has_a_kind_and_messages_without_one_are_activations(tmp_path: Path) -> None:
    from producer.contract import JOB_KINDS, JobSpec

    old = {"job_id": "j1", "model": "builtin:demo", "image": "s3://b/i.png"}
    assert JobSpec.from_message(old).kind == "activations" == JOB_KINDS[0]
    assert JobSpec.from_message(JobSpec.from_message(old).to_message()).kind == "activations"
    with pytest.raises(ValueError, match="kind 'census' unknown"):
        JobSpec.from_message({**old, "kind": "census"})
    client = Client(settings=Settings(storage_url=(tmp_path / "store").as_uri()))
    with pytest.raises(InvalidJob, match="kind"):
        client.submit("builtin:demo", tmp_path / "unused.png", kind="census")
    assert client._app is None  # refused before anything was queued


def test_every_error_code_has_its_class_and_survives_the_wire() -> None:
    from producer.contract import ERROR_CODES, ErrorCode
    from producer.errors import error_class, error_from_dict

    for code in ERROR_CODES:
        cls = error_class(code)
        assert cls.code == code and cls.__name__ != "ActvizError", code
        error = cls("what to do")
        back = error_from_dict(json.loads(json.dumps(error.to_dict())))
        assert type(back) is cls and back.code == ErrorCode(code) and back.message == "what to do"


def test_celery_failures_map_to_codes_by_class() -> None:
    from billiard.exceptions import WorkerLostError
    from celery.exceptions import SoftTimeLimitExceeded

    from producer.client import error_of

    assert error_of(SoftTimeLimitExceeded())["code"] == "time_limit"
    assert error_of(WorkerLostError("gone"))["code"] == "worker_lost"
    assert error_of(StorageUnavailable("down"))["code"] == "storage_error"
    assert error_of(KeyError("x"))["code"] == "internal"


def test_file_store_keys_stay_inside_the_root(tmp_path) -> None:  # noqa: ANN001
    from producer.storage import FileStore

    store = FileStore(tmp_path / "store")
    store.put("jobs/a/layers/00-x.png", b"png")
    assert (tmp_path / "store" / "jobs" / "a" / "layers" / "00-x.png").read_bytes() == b"png"
    for key in ("../out", "jobs/../../out", "/etc/passwd", "a\\..\\b", "", "a/\x00"):
        with pytest.raises(ValueError, match="escapes"):
            store.put(key, b"x")
    assert not (tmp_path / "out").exists()


def test_a_local_folder_is_written_in_the_calling_thread_and_s3_through_the_pool(
    tmp_path,  # noqa: ANN001
) -> None:
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from producer.storage import FileStore, S3Store, put_many

    class Writers(FileStore):
        """A local folder that records which thread wrote each object."""

        threads: list[str]

        def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
            super().put(key, data, content_type)
            self.threads.append(threading.current_thread().name)

    objects = [(f"jobs/a/layers/{i:02d}.png", bytes([i]) * 100) for i in range(12)]
    with ThreadPoolExecutor(4, thread_name_prefix="upload") as pool:
        local = Writers(tmp_path / "local")
        local.threads = []
        put_many(local, objects, pool=pool)
        assert local.threads == [threading.current_thread().name] * 12
        assert local.get("jobs/a/layers/11.png") == bytes([11]) * 100
        pooled = Writers(tmp_path / "pooled")
        pooled.threads = []
        pooled.concurrent_puts = S3Store.concurrent_puts  # what an S3 store declares
        put_many(pooled, objects, pool=pool)
        assert len(pooled.threads) == 12
        assert all(name.startswith("upload") for name in pooled.threads)


def test_file_store_files_get_the_umask_mode_not_mkstemps_0600(tmp_path) -> None:  # noqa: ANN001
    import os
    import stat

    from producer import storage

    mask = os.umask(0)
    os.umask(mask)
    store = storage.FileStore(tmp_path / "store")
    store.put("jobs/a/index.html", b"<html>")
    mode = stat.S_IMODE(os.stat(tmp_path / "store" / "jobs" / "a" / "index.html").st_mode)
    assert mode == 0o666 & ~mask  # 0644 under the usual umask 022, not mkstemp's 0600
    assert mode != 0o600 or mask == 0o177
    store.put("jobs/a/index.html", b"<html>again")  # replaced whole, nothing left beside it
    assert store.get("jobs/a/index.html") == b"<html>again"
    assert os.listdir(tmp_path / "store" / "jobs" / "a") == ["index.html"]


def test_writers_of_one_folder_in_threads_and_processes_never_share_a_temporary_file(
    tmp_path,  # noqa: ANN001
) -> None:
    """Threads of this process and forked processes (whose imports are shared, as a
    worker's --per-device children's are) writing one key at once: every write
    lands whole, none is refused, and nothing is left beside the object."""
    import os
    from concurrent.futures import ThreadPoolExecutor

    from producer.storage import FileStore

    store = FileStore(tmp_path / "store")
    bodies = {bytes([i]) * 4096 for i in range(16)}

    def write_all() -> None:
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda body: store.put("jobs/a/manifest.json", body), sorted(bodies)))

    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child's outcome is its exit status)
            code = 1
            try:
                write_all()
                code = 0
            finally:
                os._exit(code)
        children.append(pid)
    write_all()
    for pid in children:
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    assert store.get("jobs/a/manifest.json") in bodies
    assert os.listdir(tmp_path / "store" / "jobs" / "a") == ["manifest.json"]


def test_a_model_folder_is_read_in_place_and_a_plain_folder_is_not_called_missing(
    tmp_path,  # noqa: ANN001
) -> None:
    from producer.errors import InvalidModel, ModelNotFound
    from producer.settings import Settings
    from worker.engine import open_model
    from worker.runtime.fetch import fetch_model

    folder = tmp_path / "models" / "not-a-savedmodel"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("weights elsewhere")
    settings = Settings(model_allow=((tmp_path / "models").as_uri() + "/",))
    found = fetch_model(folder.as_uri(), settings)
    assert found.path == folder.resolve() and found.version.startswith("dir-")
    with pytest.raises(InvalidModel, match="not a TensorFlow SavedModel"):
        open_model(found.path, uri=found.uri)
    before = found.version
    (folder / "notes.txt").write_text("weights elsewhere, changed")
    assert fetch_model(folder.as_uri(), settings).version != before
    with pytest.raises(ModelNotFound, match="does not exist"):
        fetch_model((tmp_path / "models" / "nothing-here").as_uri(), settings)


def test_the_backstop_timer_moves_only_when_the_earliest_deadline_does(monkeypatch) -> None:  # noqa: ANN001
    from worker.jobs import limits

    calls: list[str] = []
    monkeypatch.setattr(
        limits.faulthandler, "dump_traceback_later", lambda delay, **_: calls.append("arm")
    )
    monkeypatch.setattr(
        limits.faulthandler, "cancel_dump_traceback_later", lambda: calls.append("cancel")
    )
    backstop = limits._Backstop()
    tokens = [backstop.add(300) for _ in range(20)]  # one step: one timer
    assert calls.count("arm") <= 2
    backstop.remove(tokens[0])
    sooner = backstop.add(30)  # an earlier deadline moves it
    arms = calls.count("arm")
    backstop.remove(sooner)  # and back
    assert calls.count("arm") == arms + 1
    for token in tokens[1:]:
        backstop.remove(token)
    assert calls[-1] == "cancel" and backstop._armed is None


def test_a_colormap_matplotlib_does_not_know_is_refused_before_the_job_is_queued() -> None:
    import matplotlib

    from producer.colormaps import COLORMAPS
    from producer.contract import JobOptions

    assert COLORMAPS.issubset(matplotlib.colormaps)  # the worker knows every name we accept
    assert {"viridis", "magma", "gray", "viridis_r"} <= COLORMAPS
    with pytest.raises(ValueError, match="did you mean viridis"):
        JobOptions(colormap="viridiss").validate()
    with pytest.raises(ValueError, match="not a matplotlib colormap"):
        JobOptions(colormap="nosuchcmap").validate()
    JobOptions(colormap="magma_r").validate()


def test_a_jobs_image_keeps_the_name_its_user_gave_it(tmp_path) -> None:  # noqa: ANN001
    from producer.client import image_name_of
    from producer.contract import JobSpec
    from worker.report.gallery import _label

    assert image_name_of(tmp_path / "holiday photo (3).JPG") == "holiday photo (3).JPG"
    assert image_name_of("s3://bucket/inputs/cat.png") == "cat.png"
    assert image_name_of(b"\x89PNG...") is None
    spec = JobSpec(job_id="j1", model="builtin:demo", image="s3://b/x.png", image_name="cat.png")
    assert JobSpec.from_message(spec.to_message()).image_name == "cat.png"
    with pytest.raises(ValueError, match="image_name"):
        JobSpec(job_id="j2", model="builtin:demo", image="s3://b/x.png", image_name="a\x1bb")
    # The gallery captions an image by that name, not by its content-addressed key.
    manifest = {"image": {"uri": "s3://b/inputs/9f86d0.png", "name": "cat.png"}}
    assert _label("j1", manifest) == "cat.png"
    assert _label("j1", {"image": {"uri": "s3://b/inputs/9f86d0.png"}}) == "9f86d0.png"


def test_the_batch_summary_keeps_long_paths_whole_when_piped(capsys) -> None:  # noqa: ANN001
    from producer.cli import _print_table

    path = "/data/" + "very-long-folder-name/" * 6 + "image-0001.png"
    _print_table(
        [{"image": path, "job_id": "j" * 32, "status": "succeeded", "report": "file:///r/x.html"}]
    )
    out = capsys.readouterr().out
    assert path in out  # on one line, not folded at 80 columns


def test_the_error_table_in_the_docs_lists_every_code() -> None:
    import re
    from pathlib import Path

    from producer.contract import ERROR_CODES

    docs = (Path(__file__).resolve().parents[2] / "docs" / "service.md").read_text()
    table = docs.split("## Errors", 1)[1].split("\n## ", 1)[0]
    documented = re.findall(r"^\| `([a-z_]+)` \|", table, re.M)
    assert sorted(documented) == sorted(ERROR_CODES)


def test_every_flag_in_the_documented_cli_synopsis_exists() -> None:
    """docs/service.md's CLI block cannot drift from the parser: each flag it shows is real."""
    import re
    from pathlib import Path

    from producer.cli import build_parser

    docs = (Path(__file__).resolve().parents[2] / "docs" / "service.md").read_text()
    block = docs.split("## CLI", 1)[1].split("```", 2)[1]
    command, checked = None, 0
    for line in block.splitlines():
        code = line.split("#", 1)[0]
        start = re.match(r"actviz (\w+)", code)
        if start:
            command = start.group(1)
        if command is None:
            continue
        parser = build_parser(command)
        sub = next(
            a for a in parser._actions if getattr(a, "choices", None) and command in a.choices
        ).choices[command]
        known = {flag for action in sub._actions for flag in action.option_strings}
        for flag in re.findall(r"(--[a-z][a-z-]*)", code):
            if flag == "--version":
                continue
            assert flag in known, f"actviz {command} has no {flag} (docs/service.md)"
            checked += 1
    assert checked >= 25


def test_native_start_up_notices_are_dropped_and_other_stderr_lines_kept() -> None:
    """What a C++ library writes to file descriptor 2 during the import is filtered, not lost."""
    import subprocess
    import sys

    code = (
        "import os\n"
        "from worker.runtime.native_logs import quiet_native_startup\n"
        "with quiet_native_startup():\n"
        "    os.write(2, b'WARNING: All log messages before absl::InitializeLog() is called"
        " are written to STDERR\\n')\n"
        "    os.write(2, b'I0000 00:00:1795807367.508555    8455 port.cc:153] oneDNN custom"
        " operations are on.\\n')\n"
        "    os.write(2, b'E0000 00:00:1795807369.905338    8455 cuda_platform.cc:52] failed"
        " call to cuInit: INTERNAL\\n')\n"
        "    os.write(2, b'E0000 00:00:1795872446.407202   20077 util.cc:131] oneDNN supports"
        " DT_UINT8 only on platforms with AVX-512. Falling back to the default Eigen-based"
        " implementation if present.\\n')\n"
        "    os.write(2, b'E0000 00:00:1.0 1 saver.cc:12] could not open the checkpoint\\n')\n"
        "    os.write(2, b'a real problem\\n')\n"
        "os.write(2, b'after\\n')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stderr.decode().splitlines()
    assert lines == [
        "E0000 00:00:1.0 1 saver.cc:12] could not open the checkpoint",
        "a real problem",
        "after",
    ]


def test_tensorflows_pools_are_sized_before_its_first_op_unless_set_already() -> None:
    """`import_backend(threads)` sizes TensorFlow's pools in a new process (a worker's); the
    environment's TF_NUM_*_THREADS win, and a process that ran an op keeps its pools."""
    import os
    import subprocess
    import sys

    def pools(env: dict[str, str], first: str = "") -> tuple[int, int]:
        code = (
            f"{first}\n"
            "from worker.runtime.native_logs import backend_pools, import_backend\n"
            "import_backend((1, 1))\n"
            "print(*backend_pools())\n"
        )
        done = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
            env={**os.environ, "KERAS_BACKEND": "tensorflow", **env},
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-2000:]
        intra, inter = done.stdout.split()
        return int(intra), int(inter)

    assert pools({}) == (1, 1)
    assert pools({"TF_NUM_INTEROP_THREADS": "3"}) == (1, 0)  # 0: left to TensorFlow
    ran = "import tensorflow as tf; tf.zeros((2,)) + 1"  # an embedding host's own work
    assert pools({}, first=ran) == (0, 0)


def test_a_message_above_the_workers_bound_is_refused_at_submit(tmp_path: Path) -> None:
    """Class names travel in the message; too many of them are refused before anything is
    queued, with the size and what takes it, not by the worker later."""
    from stack import noise_png

    from producer.contract import MAX_MESSAGE_BYTES
    from producer.errors import PayloadTooLarge

    (tmp_path / "cat.png").write_bytes(noise_png(1))
    client = Client(settings=Settings(storage_url=(tmp_path / "store").as_uri()))
    labels = [f"a long class name number {i}" for i in range(5000)]
    with pytest.raises(PayloadTooLarge, match="5000 class names") as refused:
        client.submit("builtin:demo", tmp_path / "cat.png", kind="gradcam", labels=labels)
    assert str(MAX_MESSAGE_BYTES) in refused.value.message
    assert client._app is None  # nothing was queued


def test_a_local_write_the_system_refuses_is_a_storage_error_naming_it(tmp_path) -> None:  # noqa: ANN001
    import errno

    from producer.errors import StorageError
    from producer.storage import FileStore, refused_write

    store = FileStore(tmp_path)
    store.put("jobs/a", b"a file where a folder should be")
    with pytest.raises(StorageError) as refused:
        store.put("jobs/a/manifest.json", b"{}")
    assert refused.value.code == "storage_error"
    assert refused.value.message.startswith(f"could not write {store.uri('jobs/a/manifest.json')}")
    assert [p.name for p in (tmp_path / "jobs").iterdir()] == ["a"]  # nothing half-written
    full = refused_write("write", "/cache/m.h5", OSError(errno.ENOSPC, "No space left on device"))
    assert full.message == (
        "could not write /cache/m.h5: No space left on device (free space there, or point it elsewhere)"
    )


def test_an_unreachable_broker_fails_a_submit_with_broker_unavailable(tmp_path) -> None:  # noqa: ANN001
    import os
    import subprocess
    import sys
    import time

    from stack import free_port

    from producer import Client
    from producer.errors import BrokerUnavailable

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    client = Client(
        settings=Settings(broker_url=url, storage_url=tmp_path.as_uri(), submit_retry_s=1)
    )
    started = time.monotonic()
    with pytest.raises(BrokerUnavailable) as refused:
        client.submit("builtin:demo", b"\x89PNG not really")
    assert 0.5 <= time.monotonic() - started < 10  # tried again for about a second
    assert (
        refused.value.code == "broker_unavailable"
        and "ACTVIZ_SUBMIT_RETRY_S" in refused.value.message
    )
    env = {
        "ACTVIZ_BROKER_URL": url,
        "ACTVIZ_STORAGE_URL": tmp_path.as_uri(),
        "ACTVIZ_SUBMIT_RETRY_S": "1",
    }
    image = tmp_path / "a.png"
    image.write_bytes(b"\x89PNG not really")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "producer.cli",
            "submit",
            "--model",
            "builtin:demo",
            "--image",
            str(image),
        ],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and "broker_unavailable" in done.stderr
    assert "Traceback" not in done.stderr


def test_monitors_see_a_jobs_summary_without_passwords() -> None:
    """Celery puts a repr of a task's arguments in its message for Flower and `celery
    events`; a job's is its id, kind, model and image, with URL passwords removed."""
    from producer.broker import arguments_shown

    message = {
        "job_id": "j1",
        "kind": "activations",
        "model": "https://user:s3cret@models.example/m.keras",
        "image": "s3://bucket/in.png",
        "options": {"labels": ["cat"] * 1000},
    }
    shown = arguments_shown(message)
    assert shown.startswith("[{") and "'j1'" in shown and "s3://bucket/in.png" in shown
    assert "s3cret" not in shown and "models.example/m.keras" in shown
    assert "labels" not in shown and len(shown) < 200
    assert arguments_shown("not a message") == "[{}]"
