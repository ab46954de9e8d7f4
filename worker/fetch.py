"""Getting a job's inputs onto the worker: model files and image bytes.

Models come only from URI prefixes in `settings.model_allow` (plus local files
in the embedded mode, where producer and worker are the same user). S3 models
are cached on local disk next to their ETag and downloaded again only when the
object changes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from producer.errors import ImageTooLarge, InputNotFound, ModelNotAllowed, ModelNotFound
from producer.settings import Settings, redact_url
from producer.storage import (
    FileStore,
    ObjectNotFound,
    ObjectTooLarge,
    S3Store,
    Store,
    local_path,
    split_s3_uri,
)

log = logging.getLogger(__name__)

BUILTIN_DEMO = "builtin:demo"


@dataclass(frozen=True)
class ModelFile:
    """A model on local disk; `version` changes whenever the source object does."""

    uri: str
    path: Path
    version: str
    downloaded: bool = False

    @property
    def cache_key(self) -> str:
        return f"{self.uri}#{self.version}"


def model_allowed(uri: str, settings: Settings) -> bool:
    """True when `uri` starts with an allowed prefix (local files too when embedded)."""
    if settings.embedded and uri.startswith("file://"):
        return True
    return any(uri.startswith(prefix) for prefix in settings.model_allow if prefix)


def model_trusted(uri: str, settings: Settings) -> bool:
    """Trusted models may hold Lambda layers (code); only listed prefixes are."""
    return any(uri.startswith(prefix) for prefix in settings.model_trusted if prefix)


def check_model_allowed(uri: str, settings: Settings) -> None:
    """Raises ModelNotAllowed (model_not_allowed) outside the allow-list."""
    if ".." in uri.split("/"):
        raise ModelNotAllowed(f"model URI {uri!r} contains '..'")
    if not model_allowed(uri, settings):
        allowed = ", ".join(settings.model_allow) or "nothing"
        raise ModelNotAllowed(
            f"model {redact_url(uri)} is outside the allowed sources ({allowed}); "
            "add its prefix to ACTVIZ_MODEL_ALLOW on the worker"
        )


def fetch_model(uri: str, settings: Settings, s3: object | None = None) -> ModelFile:
    """Make the model at `uri` available as a local file.

    Raises ModelNotAllowed (model_not_allowed), ModelNotFound (model_not_found),
    StorageUnavailable (transient). `s3`: a boto3 client to reuse.
    """
    check_model_allowed(uri, settings)
    if uri == BUILTIN_DEMO:
        from worker.demo import model_path

        path = Path(model_path())
        return ModelFile(uri, path, _file_version(path))
    if uri.startswith("builtin:"):
        raise ModelNotFound(f"no builtin model {uri!r}; the builtin one is {BUILTIN_DEMO}")
    if uri.startswith("file://"):
        path = local_path(uri)
        if not path.is_file():
            raise ModelNotFound(f"model file {path} does not exist on the worker")
        # A symlink inside an allowed folder must not reach a file outside it.
        real = path.resolve()
        if not settings.embedded and not model_allowed(real.as_uri(), settings):
            raise ModelNotAllowed(f"model {uri} resolves to {real}, outside the allowed sources")
        return ModelFile(uri, path, _file_version(path))
    if uri.startswith("s3://"):
        return _fetch_s3_model(uri, Path(settings.model_cache_dir), s3)
    raise ModelNotFound(f"model URI {uri!r} has an unsupported scheme; use s3:// or file://")


def _file_version(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def _fetch_s3_model(uri: str, cache_dir: Path, s3: object | None) -> ModelFile:
    bucket, key = split_s3_uri(uri)
    store = S3Store(bucket, client=s3)
    try:
        etag = str(store.head(key).get("ETag", "")).strip('"')
    except ObjectNotFound:
        raise ModelNotFound(f"model {uri} does not exist") from None
    folder = cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:24]
    path = folder / Path(key).name
    etag_file = folder / "etag"
    if path.is_file() and etag_file.is_file() and etag_file.read_text() == etag:
        return ModelFile(uri, path, etag)
    log.info("downloading model %s (etag %s)", uri, etag)
    try:
        store.download(key, path)
    except ObjectNotFound:
        raise ModelNotFound(f"model {uri} does not exist") from None
    _write_atomic(etag_file, etag)
    return ModelFile(uri, path, etag, downloaded=True)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def read_image(uri: str, store: Store, settings: Settings, s3: object | None = None) -> bytes:
    """The bytes of the image a job names, checking the size before reading the body.

    The image may live in the result store (uploaded by the producer), in any
    s3:// bucket the worker's credentials can read, or, in the embedded mode,
    in a local file. Raises InputNotFound (input_not_found), ImageTooLarge
    (image_too_large), StorageUnavailable (transient).
    """
    limit = settings.max_image_bytes
    if uri.startswith("s3://"):
        bucket, key = split_s3_uri(uri)
        source = S3Store(bucket, client=s3)
        try:
            return source.get_at_most(key, limit)
        except ObjectNotFound:
            raise InputNotFound(f"image {uri} does not exist") from None
        except ObjectTooLarge as exc:
            raise _too_large(uri, exc.size, limit) from None
    if uri.startswith("file://"):
        path = local_path(uri).resolve()
        inside_store = isinstance(store, FileStore) and store.root in path.parents
        if not (inside_store or settings.embedded):
            raise InputNotFound(f"image {uri} is outside the result store")
        if not path.is_file():
            raise InputNotFound(f"image {uri} does not exist")
        _check_image_size(uri, path.stat().st_size, limit)
        return path.read_bytes()
    raise InputNotFound(f"image URI {uri!r} has an unsupported scheme; use s3:// or file://")


def _check_image_size(uri: str, size: int, limit: int) -> None:
    if size > limit:
        raise _too_large(uri, size, limit)


def _too_large(uri: str, size: int, limit: int) -> ImageTooLarge:
    return ImageTooLarge(f"image {uri} is {size} bytes, above the {limit}-byte limit")
