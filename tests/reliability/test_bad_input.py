"""Hostile and odd input: each gets its error code (or is decoded), and the worker stays up.

One worker serves every case; a good job runs after each bad one, and the
worker's process id never changes.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import harness
import numpy as np
import pytest
from PIL import Image

from producer import Client, ErrorCode, JobFailed, Settings
from producer.contract import TASK_NAME
from producer.errors import PayloadTooLarge

pytestmark = pytest.mark.timeout(300)
MAX_IMAGE_BYTES = 200_000


@pytest.fixture(scope="module")
def env(redis_url: str, bucket: str, tmp_path_factory) -> dict:  # noqa: ANN001
    return harness.worker_env(
        redis_url,
        f"s3://{bucket}/results",
        [f"s3://{bucket}/models/"],
        ACTVIZ_MODEL_CACHE_DIR=str(tmp_path_factory.mktemp("model-cache")),
        ACTVIZ_MAX_IMAGE_BYTES=str(MAX_IMAGE_BYTES),
    )


@pytest.fixture(scope="module")
def worker(env: dict, tmp_path_factory):  # noqa: ANN001, ANN201
    proc = harness.start_worker(env, tmp_path_factory.mktemp("bad-input") / "worker.log")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(env: dict) -> Client:
    return Client(settings=Settings.from_env(environ=env))


@pytest.fixture(scope="module")
def odd_models(s3, bucket: str, tmp_path_factory) -> dict[str, str]:  # noqa: ANN001
    """garbage.h5 (random bytes), lambda.h5 (a Lambda layer), dotdot.keras (a layer '..')."""
    import keras
    import models

    out = tmp_path_factory.mktemp("odd-models")
    (out / "garbage.h5").write_bytes(np.random.default_rng(0).bytes(4096))
    _, lambda_h5 = models.save_lambda_models(out)
    dotdot = keras.Sequential(
        [keras.Input((16, 16, 3)), keras.layers.Conv2D(3, 3, name=".."), keras.layers.ReLU()]
    )
    dotdot.save(out / "dotdot.keras")
    uris = {}
    for name, path in (("garbage", out / "garbage.h5"), ("lambda", lambda_h5)):
        s3.upload_file(str(path), bucket, f"models/{name}.h5")
        uris[name] = f"s3://{bucket}/models/{name}.h5"
    s3.upload_file(str(out / "dotdot.keras"), bucket, "models/dotdot.keras")
    uris["dotdot"] = f"s3://{bucket}/models/dotdot.keras"
    return uris


def jpeg(pixels: np.ndarray, mode: str = "RGB", **save) -> bytes:  # noqa: ANN003
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, format="JPEG", **save)
    return buf.getvalue()


def png_bomb_header(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming width x height, with a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def pattern() -> np.ndarray:
    """16 rows x 32 columns: left half black, right half white."""
    pixels = np.zeros((16, 32, 3), np.uint8)
    pixels[:, 16:] = 255
    return pixels


def bad_images() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, file name) for the images that must fail."""
    rng = np.random.default_rng(1)
    photo = jpeg((rng.random((64, 64, 3)) * 255).astype(np.uint8))
    return {
        "truncated JPEG": (photo[: len(photo) // 2], "cut.jpg"),
        "HTML page saved as .jpg": (b"<!doctype html><html><body>hi</body></html>", "page.jpg"),
        "zero-byte file": (b"", "empty.jpg"),
    }


def good_odd_images() -> dict[str, bytes]:
    """Images that are unusual but valid: they must be decoded, not rejected."""
    rng = np.random.default_rng(2)
    sixteen = io.BytesIO()
    Image.fromarray((rng.random((20, 20)) * 65535).astype(np.uint16)).save(sixteen, format="TIFF")
    cmyk = jpeg((rng.random((20, 20, 3)) * 255).astype(np.uint8), mode="CMYK")
    gif = io.BytesIO()
    frames = [
        Image.fromarray(np.full((20, 20, 3), v, np.uint8)).convert("P") for v in (0, 128, 255)
    ]
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees when displaying
    rotated = io.BytesIO()
    Image.fromarray(pattern()).save(rotated, format="JPEG", exif=exif.tobytes(), quality=95)
    return {
        "16-bit TIFF": sixteen.getvalue(),
        "CMYK JPEG": cmyk,
        "animated GIF": gif.getvalue(),
        "EXIF rotation": rotated.getvalue(),
    }


def expect_failure(job, code: str) -> str:  # noqa: ANN001
    with pytest.raises(JobFailed) as failed:
        job.wait(timeout=60)
    assert failed.value.code == code, failed.value
    return failed.value.code


def test_bad_inputs_fail_with_their_codes_and_the_worker_keeps_serving(
    worker, client: Client, models: dict, odd_models: dict, s3, bucket: str, tmp_path: Path
) -> None:
    pid = worker.pid
    good_png = harness.random_png(40, 16, 16)
    tiny = models["tiny"]
    tried: dict[str, str] = {}

    def good_job_succeeds() -> None:
        assert client.submit(tiny, good_png).wait(timeout=60).layers == ["conv_a", "conv_b"]
        assert worker.alive() and worker.pid == pid

    for name, (data, filename) in bad_images().items():
        path = tmp_path / filename
        path.write_bytes(data)
        tried[name] = expect_failure(client.submit(tiny, path), ErrorCode.INVALID_IMAGE)
        good_job_succeeds()

    bomb = png_bomb_header(40000, 40000)
    tried["40000x40000 PNG header"] = expect_failure(
        client.submit(tiny, bomb), ErrorCode.IMAGE_TOO_LARGE
    )
    good_job_succeeds()

    model_cases = [
        ("model file neither HDF5 nor zip", odd_models["garbage"], ErrorCode.INVALID_MODEL),
        (".h5 with a Lambda layer", odd_models["lambda"], ErrorCode.UNSAFE_MODEL),
        ("model outside ACTVIZ_MODEL_ALLOW", "s3://elsewhere/m.keras", ErrorCode.MODEL_NOT_ALLOWED),
        (
            "model key that does not exist",
            f"s3://{bucket}/models/nope.keras",
            ErrorCode.MODEL_NOT_FOUND,
        ),
    ]
    for name, uri, code in model_cases:
        tried[name] = expect_failure(client.submit(uri, good_png), code)
        good_job_succeeds()

    missing_image = f"s3://{bucket}/results/inputs/{'0' * 64}.png"
    tried["image key that does not exist"] = expect_failure(
        client.submit(tiny, missing_image), ErrorCode.INPUT_NOT_FOUND
    )
    tried["unknown layer name"] = expect_failure(
        client.submit(tiny, good_png, layers="conv_zz"), ErrorCode.UNKNOWN_LAYER
    )
    tried["layer spec that selects nothing"] = expect_failure(
        client.submit(tiny, good_png, layers="re:^nothing_matches$"), ErrorCode.UNKNOWN_LAYER
    )
    good_job_succeeds()

    with pytest.raises(PayloadTooLarge):
        client.submit(tiny, b"\x89PNG" + bytes(MAX_IMAGE_BYTES))
    tried["inline image above ACTVIZ_MAX_IMAGE_BYTES (submit)"] = "payload_too_large"
    huge = {"job_id": "huge-field", "model": tiny, "image": good_png.hex() * 200}
    client.app.send_task(TASK_NAME, args=[huge], task_id="huge-field")
    tried["message with a huge field (worker)"] = expect_failure(
        client.job("huge-field"), ErrorCode.PAYLOAD_TOO_LARGE
    )
    good_job_succeeds()

    for name, data in good_odd_images().items():
        result = client.submit(tiny, data).wait(timeout=60)
        assert result.layers == ["conv_a", "conv_b"], name
        tried[name] = "succeeded"
        if name == "EXIF rotation":
            assert result.manifest["image"]["original_size"] == [32, 16]
            seen = np.asarray(Image.open(io.BytesIO(result.store.get(result.prefix + "input.png"))))
            gray = seen.astype(float).mean(axis=2)
            # The black/white split was left|right in the pixels; displayed it is top|bottom.
            assert abs(gray[:8].mean() - gray[8:].mean()) > 100
            assert abs(gray[:, :8].mean() - gray[:, 8:].mean()) < 30
    good_job_succeeds()

    harness.record("Bad input", "cases tried", len(tried))
    for name, outcome in tried.items():
        harness.record("Bad input", name, outcome)


def test_ids_and_layer_names_never_write_outside_the_job_folder(
    worker,
    client: Client,
    models: dict,
    odd_models: dict,
    s3,
    bucket: str,
    env: dict,
    tmp_path: Path,
) -> None:
    image = client.upload_image(harness.random_png(41, 16, 16))
    before = set(harness.keys_of(s3, bucket, ""))
    bad_ids = ["../escape", "a/b", "..", "jobs/../../x", "/abs"]
    for job_id in bad_ids:
        message = {"job_id": job_id, "model": models["tiny"], "image": image}
        client.app.send_task(
            TASK_NAME, args=[message], task_id=f"probe-{len(job_id)}-{ord(job_id[0])}"
        )
    for job_id in bad_ids:
        job = client.job(f"probe-{len(job_id)}-{ord(job_id[0])}")
        expect_failure(job, ErrorCode.INVALID_JOB)
    # A real model whose layer is named '..': its grid stays inside the job folder.
    dotted = client.submit(odd_models["dotdot"], image).wait(timeout=60)
    after = set(harness.keys_of(s3, bucket, "")) - before
    inside = {k for k in after if k.startswith(f"results/jobs/{dotted.job_id}/")}
    assert after == inside, sorted(after - inside)
    assert any(k.endswith(".png") and "layers/" in k for k in inside)
    assert ".." in dotted.layers

    # The same raw messages against a worker on a file:// store.
    root = tmp_path / "store"
    root.mkdir()
    file_env = {**env, "ACTVIZ_STORAGE_URL": root.as_uri()}
    file_worker = harness.start_worker(file_env, tmp_path / "file-worker.log", "--queues", "cpu")
    try:
        file_client = Client(settings=Settings.from_env(environ=file_env))
        for job_id in bad_ids:
            message = {"job_id": job_id, "model": models["tiny"], "image": image}
            task_id = f"file-probe-{len(job_id)}-{ord(job_id[0])}"
            file_client.app.send_task(TASK_NAME, args=[message], task_id=task_id, queue="cpu")
            expect_failure(file_client.job(task_id), ErrorCode.INVALID_JOB)
    finally:
        file_worker.stop()
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".log"] == []
    harness.record("Bad input", "path-like job ids refused (S3 and file://)", len(bad_ids) * 2)
    harness.record("Bad input", "layer named '..' stays in its job folder", "yes")
