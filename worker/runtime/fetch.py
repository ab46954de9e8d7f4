"""Getting a job's inputs onto the worker: model files and image bytes.

Models come only from URI prefixes in `settings.model_allow` (plus local files
in the embedded mode, where producer and worker are the same user). S3 models
are cached on local disk next to their ETag and downloaded again only when the
object changes.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from producer.contract import has_control_chars
from producer.errors import (
    ImageTooLarge,
    InputNotFound,
    ModelNotAllowed,
    ModelNotFound,
    StorageError,
)
from producer.settings import Settings, redact_url
from producer.storage import (
    ObjectNotFound,
    ObjectTooLarge,
    Store,
    is_file_uri,
    local_path,
    refused_write,
    source_for,
)

log = logging.getLogger(__name__)

BUILTIN_DEMO = "builtin:demo"


@dataclass(frozen=True)
class ModelFile:
    """A model on local disk; `version` changes whenever the source object does."""

    uri: str
    path: Path
    version: str
    # Decided on the canonical URI: the model may hold Lambda layers (code).
    trusted: bool = False

    @property
    def cache_key(self) -> str:
        return f"{self.uri}#{self.version}" + ("#trusted" if self.trusted else "")


def model_allowed(uri: str, settings: Settings) -> bool:
    """True when `uri` starts with an allowed prefix (local files too when embedded).

    Give it the canonical URI (`canonical_model_uri`): prefixes are compared as text.
    """
    if settings.embedded and is_file_uri(uri):
        return True
    return any(uri.startswith(prefix) for prefix in _prefixes(settings.model_allow))


def model_trusted(uri: str, settings: Settings) -> bool:
    """Trusted models may hold Lambda layers (code); only listed prefixes are.

    Give it the canonical URI (`canonical_model_uri`): prefixes are compared as text.
    """
    return any(uri.startswith(prefix) for prefix in _prefixes(settings.model_trusted))


@functools.lru_cache(maxsize=32)
def _prefixes(prefixes: tuple[str, ...]) -> tuple[str, ...]:
    """The prefixes as canonical URIs: a file:// folder by its real path, as models are.

    Resolved once per process and setting: the allow-list is configuration, and a
    folder's symlink re-pointed later does not move it.
    """
    out = []
    for prefix in filter(None, prefixes):
        if is_file_uri(prefix):
            real = local_path(prefix).resolve().as_uri()
            prefix = real + "/" if prefix.endswith("/") and not real.endswith("/") else real
        out.append(prefix)
    return tuple(out)


def canonical_model_uri(uri: str) -> str:
    """The one spelling of `uri` that allow-list and trust decisions compare.

    A file:// URI becomes the URI of the real file (percent-escapes decoded,
    symlinks and '..' resolved), so '/srv/trusted/%2e%2e/models/m.keras' is
    judged as '/srv/models/m.keras'. Any URI whose decoded form holds a '..'
    segment, a backslash or a control character is refused outright.
    Raises ModelNotAllowed (model_not_allowed).
    """
    decoded = uri
    for _ in range(3):  # '%252e' is '%2e' once decoded: refuse what any depth hides
        decoded = unquote(decoded)
        if ".." in decoded.split("/") or "\\" in decoded:
            raise ModelNotAllowed(f"model URI {redact_url(uri)!r} contains '..' or a backslash")
        if has_control_chars(decoded):
            raise ModelNotAllowed("model URI contains control characters")
    if is_file_uri(uri):
        return local_path(uri).resolve().as_uri()
    return uri


def check_model_allowed(uri: str, settings: Settings) -> str:
    """The canonical URI of an allowed model (see `canonical_model_uri`).

    Raises ModelNotAllowed (model_not_allowed) outside the allow-list.
    """
    canonical = canonical_model_uri(uri)
    if not model_allowed(canonical, settings):
        allowed = ", ".join(settings.model_allow) or "nothing"
        shown = (
            redact_url(uri) if canonical == uri else f"{redact_url(uri)} resolves to {canonical},"
        )
        raise ModelNotAllowed(
            f"model {shown} is outside the allowed sources ({allowed}); "
            "add its prefix to ACTVIZ_MODEL_ALLOW on the worker"
        )
    return canonical


def fetch_model(uri: str, settings: Settings, s3: object | None = None) -> ModelFile:
    """Make the model at `uri` available as a local file.

    Raises ModelNotAllowed (model_not_allowed), ModelNotFound (model_not_found),
    StorageUnavailable (transient). `s3`: a boto3 client to reuse.
    """
    canonical = check_model_allowed(uri, settings)
    trusted = model_trusted(canonical, settings)
    if uri == BUILTIN_DEMO:
        from worker.demo import model_path

        canonical = Path(model_path()).resolve().as_uri()  # then read like any local file
    elif uri.startswith("builtin:"):
        raise ModelNotFound(f"no builtin model {uri!r}; the builtin one is {BUILTIN_DEMO}")
    try:
        # A local file by the real path the checks judged: resolving it again would follow
        # a symlink swapped in since.
        store, key = source_for(canonical, s3, resolved=True)
    except ValueError:
        raise ModelNotFound(
            f"model URI {uri!r} has an unsupported scheme; use s3:// or file://"
        ) from None
    try:
        version = str(store.head(key).get("ETag", "")).strip('"')
    except ObjectNotFound:
        folder = store.local_file(key)
        if folder is not None and folder.is_dir():
            # A local folder: a TensorFlow SavedModel (the loader says if it is not one).
            return ModelFile(uri, folder, folder_version(folder), trusted=trusted)
        raise ModelNotFound(f"model {redact_url(uri)} does not exist") from None
    path = store.local_file(key)
    if path is not None:
        return ModelFile(uri, path, version, trusted=trusted)
    return _download(uri, store, key, version, Path(settings.model_cache_dir), trusted)


def _download(
    uri: str, store: Store, key: str, version: str, cache_dir: Path, trusted: bool
) -> ModelFile:
    """The model in the local cache, downloaded again only when its version changed."""
    folder = cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:24]
    path = folder / Path(key).name
    etag_file = folder / "etag"
    if path.is_file() and etag_file.is_file() and etag_file.read_text() == version:
        return ModelFile(uri, path, version, trusted=trusted)
    log.info("downloading model %s (etag %s)", uri, version)
    try:
        store.download(key, path)
        _write_atomic(etag_file, version)
    except ObjectNotFound:
        raise ModelNotFound(f"model {uri} does not exist") from None
    except OSError as exc:
        error = refused_write("write", str(etag_file), exc)
        raise StorageError(
            f"{error.message}; the model cache is ACTVIZ_MODEL_CACHE_DIR={cache_dir}"
        ) from None
    except StorageError as exc:  # a full disk, a read-only folder: the download was removed
        raise StorageError(
            f"{exc.message}; the model cache is ACTVIZ_MODEL_CACHE_DIR={cache_dir}"
        ) from None
    return ModelFile(uri, path, version, trusted=trusted)


def folder_version(folder: Path, most: int = 10_000) -> str:
    """A version for a model folder: its files' count, total size and latest mtime.

    Changes whenever a file in it is replaced; reads at most `most` entries.
    """
    count = size = latest = 0
    for path in folder.rglob("*"):
        count += 1
        if count > most:
            break
        if path.is_file():
            stat = path.stat()
            size += stat.st_size
            latest = max(latest, stat.st_mtime_ns)
    return f"dir-{count}-{size}-{latest}"


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
    try:
        source, key = source_for(uri, s3)
    except ValueError:
        raise InputNotFound(
            f"image URI {uri!r} has an unsupported scheme; use s3:// or file://"
        ) from None
    # Local files are read from the result store only (the embedded mode: from anywhere),
    # by their real path (source_for resolved it).
    path = source.local_file(key)
    if path is not None and not (settings.embedded or store.holds_file(path)):
        raise InputNotFound(f"image {uri} is outside the result store")
    try:
        return source.get_at_most(key, limit)
    except ObjectNotFound:
        raise InputNotFound(f"image {uri} does not exist") from None
    except ObjectTooLarge as exc:
        raise _too_large(uri, exc.size, limit) from None


def _too_large(uri: str, size: int, limit: int) -> ImageTooLarge:
    return ImageTooLarge(f"image {uri} is {size} bytes, above the {limit}-byte limit")
