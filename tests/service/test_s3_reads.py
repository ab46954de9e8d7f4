"""Reading a job's image from S3 (moto over HTTP): one GET, the size checked before the body."""

from __future__ import annotations

import pytest

from producer.contract import ErrorCode
from producer.errors import ImageTooLarge, InputNotFound
from producer.settings import Settings
from producer.storage import ObjectNotFound, ObjectTooLarge, S3Store
from worker.runtime.fetch import read_image


def test_get_at_most_returns_the_bytes_up_to_the_limit(s3, bucket: str) -> None:  # noqa: ANN001
    s3.put_object(Bucket=bucket, Key="reads/ten.bin", Body=b"0123456789")
    store = S3Store(bucket, "reads")
    assert store.get_at_most("ten.bin", 10) == b"0123456789"
    with pytest.raises(ObjectTooLarge) as large:
        store.get_at_most("ten.bin", 9)
    assert large.value.size == 10
    with pytest.raises(ObjectNotFound):
        store.get_at_most("missing.bin", 10)


def test_worker_reads_an_s3_image_with_one_get_and_refuses_one_too_large(
    s3,  # noqa: ANN001
    bucket: str,
) -> None:
    s3.put_object(Bucket=bucket, Key="reads/photo.png", Body=b"\x89PNG" + bytes(96))
    settings = Settings(max_image_bytes=100)
    store = S3Store(bucket, "reads")
    calls: list[str] = []
    store.client.meta.events.register("before-call.s3", lambda model, **_: calls.append(model.name))
    uri = f"s3://{bucket}/reads/photo.png"
    assert read_image(uri, store, settings, store.client) == b"\x89PNG" + bytes(96)
    assert calls == ["GetObject"]  # no HEAD before it
    with pytest.raises(ImageTooLarge) as large:
        read_image(uri, store, Settings(max_image_bytes=99), store.client)
    assert large.value.code == ErrorCode.IMAGE_TOO_LARGE
    assert "100 bytes, above the 99-byte limit" in str(large.value)
    with pytest.raises(InputNotFound):
        read_image(f"s3://{bucket}/reads/none.png", store, settings, store.client)
