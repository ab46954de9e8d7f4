"""Pure logic of the service parts: no broker, no worker process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from producer import Client, ErrorCode, Settings
from producer.broker import celery_config
from producer.client import sniff_extension
from producer.contract import TASK_NAME
from producer.errors import (
    InputNotFound,
    InvalidJob,
    ModelNotAllowed,
    ModelNotFound,
    PayloadTooLarge,
    StorageUnavailable,
)
from producer.registry import load_registry, resolve_model
from worker.cache import ModelCache
from worker.fetch import check_model_allowed


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


def test_broker_config_is_json_only_with_one_visibility_timeout() -> None:
    settings = Settings(broker_url="rediss://:pw@redis:6380/0", time_limit=100)
    config = celery_config(settings)
    assert config["accept_content"] == ["json"] and config["result_accept_content"] == ["json"]
    assert config["task_serializer"] == "json"
    transport = config["broker_transport_options"]
    assert transport["visibility_timeout"] == settings.visibility_timeout > settings.time_limit
    assert config["result_backend_transport_options"]["visibility_timeout"] == (
        settings.visibility_timeout
    )
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
    from worker.fetch import fetch_model

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
