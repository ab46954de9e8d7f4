"""Object storage: S3-compatible buckets and local folders behind one interface.

Keys are relative to the store's prefix and use '/' separators. boto3 finds
the endpoint and credentials in its standard places (AWS_ENDPOINT_URL_S3,
AWS_ACCESS_KEY_ID, ~/.aws, instance roles), so MinIO needs no extra settings.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import itertools
import os
import secrets
import shutil
import stat
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from producer.errors import ObjectNotFound, ObjectTooLarge, StorageError, StorageUnavailable

CONTENT_TYPES = {
    ".json": "application/json",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".html": "text/html; charset=utf-8",
    ".npz": "application/octet-stream",
    ".h5": "application/x-hdf5",
    ".keras": "application/zip",
}


def content_type_for(key: str) -> str:
    return CONTENT_TYPES.get(Path(key).suffix.lower(), "application/octet-stream")


# A stored file is created as a plain open() would make it (0o666 less the umask: 0644
# under umask 022), so a web server or another user can read reports.
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
# A temporary file's name: this import's random prefix (hosts sharing a folder), the
# process (forked workers share the prefix) and a count: unique without a system call
# for randomness on every object.
_TMP_PREFIX = secrets.token_hex(4)
_tmp_numbers = itertools.count()

S3_SCHEME = "s3://"
FILE_SCHEME = "file://"


def is_s3_uri(uri: str) -> bool:
    return uri.startswith(S3_SCHEME)


def is_file_uri(uri: str) -> bool:
    return uri.startswith(FILE_SCHEME)


class Store(Protocol):
    """One interface for results and inputs, whatever holds them.

    Keys are relative to the store's URL. `get`, `get_at_most`, `head` and
    `download` raise ObjectNotFound; `get_at_most` raises ObjectTooLarge;
    any of them raises StorageUnavailable for a fault of the world.
    """

    url: str
    # Whether a job's objects go to `put` from several threads at once (`put_many`).
    concurrent_puts: bool

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None: ...
    def get(self, key: str) -> bytes: ...
    def get_at_most(self, key: str, limit: int) -> bytes: ...
    def head(self, key: str) -> dict: ...
    def exists(self, key: str) -> bool: ...
    def list(self, prefix: str) -> list[str]: ...
    def list_dated(self, prefix: str) -> list[tuple[str, float, int]]: ...
    def delete_many(self, keys: list[str]) -> int: ...
    def uri(self, key: str) -> str: ...
    def presign(self, key: str, expires: int = 3600) -> str: ...
    def download(self, key: str, path: Path) -> None: ...
    def holds(self, uri: str) -> bool: ...
    def holds_file(self, path: Path) -> bool: ...
    def local_file(self, key: str) -> Path | None: ...


def source_for(uri: str, s3: object | None = None, *, resolved: bool = False) -> tuple[Store, str]:
    """(store, key) that read the object at an `s3://` or `file://` URI.

    `s3`: a boto3 client to reuse; `resolved`: a `file://` URI names a real path already
    (symlinks and '..' resolved), to be read as it is. Raises ValueError for another scheme.
    """
    if is_s3_uri(uri):
        bucket, key = split_s3_uri(uri)
        return S3Store(bucket, client=s3), key
    if is_file_uri(uri):
        path = local_path(uri) if resolved else local_path(uri).resolve()
        return FileStore(path.parent, resolved=True), path.name
    raise ValueError(f"unsupported URI {uri!r}: use s3:// or file://")


def put_many(
    store: Store,
    objects: Iterable[tuple[str, bytes]],
    workers: int = 8,
    pool: Executor | None = None,
) -> None:
    """Upload objects concurrently; raises the first failure after all finish.

    `pool`: a long-lived executor to run the uploads on (a worker keeps one
    for all its jobs); without one, a pool of `workers` threads is made for
    this call. A store whose `concurrent_puts` is false (a local folder) is
    written in the calling thread, one object after another.
    """
    items = list(objects)
    if not store.concurrent_puts or len(items) <= 1 or (workers <= 1 and pool is None):
        for key, data in items:
            store.put(key, data)
        return
    if pool is not None:
        _put_all(pool, store, items)
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(items))) as own:
        _put_all(own, store, items)


def _put_all(pool: Executor, store: Store, items: list[tuple[str, bytes]]) -> None:
    # Uploads run in copies of the caller's context: context variables such as
    # the job id that log lines carry follow them into the pool threads.
    futures = [
        pool.submit(contextvars.copy_context().run, store.put, key, data) for key, data in items
    ]
    for fut in futures:
        fut.result()


class FileStore:
    """A folder on a local or shared filesystem, written atomically per object."""

    # A write here is a few system calls: handing each object to a thread cost more
    # than writing it. A job's 12 files (830 KB) on 2 CPU cores: 0.6-1.4 ms of CPU in
    # the calling thread, 2.0-3.2 through a pool of 8 threads, and no sooner done.
    concurrent_puts = False

    def __init__(self, root: str | Path, url: str | None = None, *, resolved: bool = False) -> None:
        """`resolved`: `root` is a real path already (symlinks and '..' resolved)."""
        self.root = Path(root) if resolved else Path(root).resolve()
        self.url = url or self.root.as_uri()

    def _path(self, key: str) -> Path:
        # Lexical: the keys are relative, '/'-separated, without '..' (a per-object
        # resolve() walked every path component on every write).
        parts = key.split("/")
        if not key or key.startswith("/") or "\\" in key or "\x00" in key or ".." in parts:
            raise ValueError(f"key {key!r} escapes the storage root")
        return self.root.joinpath(*[part for part in parts if part not in ("", ".")])

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        """Write a hidden file beside the object, then rename it over the object: a
        reader sees the old bytes or the new, never a part. The folder is made on the
        first write into it (a missing folder is the only reason to try twice)."""
        path = self._path(key)
        tmp = os.path.join(path.parent, f".tmp-{_TMP_PREFIX}-{os.getpid()}-{next(_tmp_numbers)}")
        created = False
        try:
            try:
                fd = os.open(tmp, _CREATE, 0o666)
            except FileNotFoundError:
                path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(tmp, _CREATE, 0o666)
            created = True
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            if created:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise refused_write("write", self.uri(key), exc) from None

    def get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(self.uri(key)) from None

    def get_at_most(self, key: str, limit: int) -> bytes:
        """The file's bytes; raises ObjectTooLarge past `limit` bytes, before reading."""
        try:
            fh = open(self._path(key), "rb")  # noqa: SIM115 (closed below)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise ObjectNotFound(self.uri(key)) from None
        with fh:
            size = os.fstat(fh.fileno()).st_size  # of the file opened, not of a name
            if size > limit:
                raise ObjectTooLarge(self.uri(key), size)
            data = fh.read(limit + 1)
        if len(data) > limit:  # it grew since
            raise ObjectTooLarge(self.uri(key), len(data))
        return data

    def head(self, key: str) -> dict:
        """{'ContentLength', 'ETag'} as S3 names them; the ETag from size and mtime."""
        try:
            found = os.stat(self._path(key))
        except (FileNotFoundError, NotADirectoryError):
            raise ObjectNotFound(self.uri(key)) from None
        if not stat.S_ISREG(found.st_mode):
            raise ObjectNotFound(self.uri(key))
        return {"ContentLength": found.st_size, "ETag": f"{found.st_size}-{found.st_mtime_ns}"}

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def local_file(self, key: str) -> Path | None:
        """The object's path: it can be read in place."""
        return self._path(key)

    def holds(self, uri: str) -> bool:
        """Whether a file:// URI names a file under this store's root (symlinks resolved)."""
        return is_file_uri(uri) and self.holds_file(local_path(uri).resolve())

    def holds_file(self, path: Path) -> bool:
        """Whether a real path (symlinks resolved) lies under this store's root."""
        return self.root in path.parents

    def list(self, prefix: str) -> list[str]:
        return [key for key, _, _ in self.list_dated(prefix)]

    def list_dated(self, prefix: str) -> list[tuple[str, float, int]]:
        """(key, last-modified epoch seconds, size) of every object under `prefix`."""
        base = self._path(prefix) if prefix else self.root
        folder = base if base.is_dir() else base.parent
        if not folder.exists():
            return []
        found = []
        for path in folder.rglob("*"):
            key = path.relative_to(self.root).as_posix()
            if key.startswith(prefix) and "/.tmp-" not in "/" + key and path.is_file():
                info = path.stat()
                found.append((key, info.st_mtime, info.st_size))
        return sorted(found)

    def delete_many(self, keys: list[str]) -> int:
        """Delete the objects (and the folders they leave empty); returns how many went."""
        removed, folders = 0, set()
        for key in keys:
            path = self._path(key)
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                continue
            folders.update(p for p in path.parents if self.root in p.parents)
        for folder in sorted(folders, key=lambda p: len(p.parts), reverse=True):
            with contextlib.suppress(OSError):  # not empty: something else lives there
                folder.rmdir()
        return removed

    def uri(self, key: str) -> str:
        return self._path(key).as_uri()

    def presign(self, key: str, expires: int = 3600) -> str:
        return str(self._path(key))

    def download(self, key: str, path: Path) -> None:
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.part")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(self._path(key), tmp)
            os.replace(tmp, path)
        except FileNotFoundError:
            raise ObjectNotFound(self.uri(key)) from None
        except OSError as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise refused_write(f"download {self.uri(key)} to", str(path), exc) from None


def refused_write(operation: str, target: str, exc: OSError) -> StorageError:
    """StorageError (storage_error) for a local write the system refused: a full disk, a
    quota, a read-only file system, missing permission; naming what and where."""
    hint = {
        errno.ENOSPC: "free space there, or point it elsewhere",
        errno.EDQUOT: "raise the quota, or free space there",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "the worker's user may not write there",
        errno.EPERM: "the worker's user may not write there",
    }.get(exc.errno or 0, "")
    reason = exc.strerror or type(exc).__name__
    return StorageError(
        f"could not {operation} {target}: {reason}" + (f" ({hint})" if hint else "")
    )


def s3_client(endpoint_url: str | None = None):  # noqa: ANN201 - botocore's type is generated
    """A boto3 S3 client configured from boto3's own environment variables; `endpoint_url`
    overrides AWS_ENDPOINT_URL_S3 (the public endpoint links are signed for)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint_url or None,
        config=Config(
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=60,
            max_pool_connections=32,
        ),
    )


def _transient(exc: Exception) -> bool:
    """Whether a storage fault is the world's (retry it), not the request's.

    The one place that classifies them: Store methods raise StorageUnavailable
    for these and nothing else transient.
    """
    from botocore.exceptions import (
        ClientError,
        ConnectionClosedError,
        ConnectTimeoutError,
        EndpointConnectionError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import HTTPError as Urllib3Error

    if isinstance(
        exc,
        EndpointConnectionError
        | ConnectionClosedError
        | ConnectTimeoutError
        | ReadTimeoutError
        | ResponseStreamingError
        | Urllib3Error
        | ConnectionError,
    ):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        code = exc.response.get("Error", {}).get("Code", "")
        return status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout")
    return False


def _read(body: Any, uri: str, amount: int | None = None) -> bytes:
    """Read a response body; a connection cut mid-body is StorageUnavailable."""
    try:
        return body.read() if amount is None else body.read(amount)
    except Exception as exc:
        if _transient(exc):
            raise StorageUnavailable(f"storage unavailable for {uri}: {exc}") from exc
        raise


_PERMISSION = {
    "PutObject": "s3:PutObject",
    "GetObject": "s3:GetObject",
    "HeadObject": "s3:GetObject",
    "ListObjectsV2": "s3:ListBucket",
    "DeleteObjects": "s3:DeleteObject",
}


def _refused(exc: Exception, uri: str) -> StorageError | None:
    """StorageError (storage_error) for a request the bucket refused (403: no permission,
    wrong credentials), naming the operation, the object and the permission it needs."""
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return None
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    error = exc.response.get("Error", {})
    if status != 403 and error.get("Code") not in ("AccessDenied", "InvalidAccessKeyId"):
        return None
    operation = getattr(exc, "operation_name", "") or "request"
    needs = _PERMISSION.get(operation)
    return StorageError(
        f"storage refused {operation} on {uri}: {error.get('Code', status)}"
        + (f" ({error['Message']})" if error.get("Message") else "")
        + (f"; the credentials need {needs} there" if needs else "")
    )


def _not_found(exc: Exception) -> bool:
    from botocore.exceptions import ClientError

    if not isinstance(exc, ClientError):
        return False
    code = exc.response.get("Error", {}).get("Code", "")
    return code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket")


class S3Store:
    """An S3 bucket and key prefix: `s3://bucket/some/prefix`."""

    concurrent_puts = True  # each PUT waits a round trip: a job's objects go together

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        client: object | None = None,
        public_endpoint: str = "",
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._client = client
        # Links are signed for this endpoint (a browser's view of the server), with the
        # same credentials and region; requests still go to the client's endpoint.
        self.public_endpoint = public_endpoint.rstrip("/")
        self._signer: object | None = None

    @property
    def client(self):  # noqa: ANN201
        if self._client is None:
            self._client = s3_client()
        return self._client

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, fn, uri: str, **kwargs):  # noqa: ANN001, ANN202
        try:
            return fn(**kwargs)
        except Exception as exc:
            if _not_found(exc):
                raise ObjectNotFound(uri) from None
            if _transient(exc):
                raise StorageUnavailable(f"storage unavailable for {uri}: {exc}") from exc
            refused = _refused(exc, uri)
            if refused is not None:
                raise refused from None
            raise

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        self._call(
            self.client.put_object,
            self.uri(key),
            Bucket=self.bucket,
            Key=self._key(key),
            Body=data,
            ContentType=content_type or content_type_for(key),
        )

    def get(self, key: str) -> bytes:
        uri = self.uri(key)
        resp = self._call(self.client.get_object, uri, Bucket=self.bucket, Key=self._key(key))
        return _read(resp["Body"], uri)

    def get_at_most(self, key: str, limit: int) -> bytes:
        """The object's bytes, in one GET; raises ObjectTooLarge past `limit` bytes.

        The size is checked from the response headers before the body is read,
        and the read stops at `limit` + 1 bytes whatever the headers said.
        """
        uri = self.uri(key)
        resp = self._call(self.client.get_object, uri, Bucket=self.bucket, Key=self._key(key))
        body = resp["Body"]
        try:
            size = int(resp.get("ContentLength") or 0)
            if size > limit:
                raise ObjectTooLarge(uri, size)
            data = _read(body, uri, limit + 1)
            if len(data) > limit:
                raise ObjectTooLarge(uri, len(data))
            return data
        finally:
            body.close()

    def head(self, key: str) -> dict:
        return self._call(
            self.client.head_object, self.uri(key), Bucket=self.bucket, Key=self._key(key)
        )

    def exists(self, key: str) -> bool:
        try:
            self.head(key)
        except ObjectNotFound:
            return False
        return True

    def list(self, prefix: str) -> list[str]:
        return sorted(key for key, _, _ in self._iter_objects(prefix))

    def list_dated(self, prefix: str) -> list[tuple[str, float, int]]:
        """(key, last-modified epoch seconds, size) of every object under `prefix`."""
        return sorted(self._iter_objects(prefix))

    def delete_many(self, keys: list[str]) -> int:
        """Delete the objects, 1,000 per request (S3's batch delete); returns how many went."""
        removed = 0
        for start in range(0, len(keys), 1000):
            chunk = [{"Key": self._key(key)} for key in keys[start : start + 1000]]
            resp = self._call(
                self.client.delete_objects,
                self.uri(keys[start]),
                Bucket=self.bucket,
                Delete={"Objects": chunk, "Quiet": False},
            )
            removed += len(resp.get("Deleted", []))
        return removed

    def _iter_objects(self, prefix: str) -> Iterator[tuple[str, float, int]]:
        paginator = self.client.get_paginator("list_objects_v2")
        strip = len(self.prefix) + 1 if self.prefix else 0
        pages = paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix))
        try:
            for page in pages:
                for obj in page.get("Contents", []):
                    modified = obj["LastModified"].timestamp()
                    yield obj["Key"][strip:], modified, int(obj.get("Size", 0))
        except Exception as exc:
            if _transient(exc):
                raise StorageUnavailable(f"storage unavailable: {exc}") from exc
            raise

    def uri(self, key: str) -> str:
        return f"{S3_SCHEME}{self.bucket}/{self._key(key)}"

    def local_file(self, key: str) -> Path | None:
        """None: an S3 object must be downloaded to be read as a file."""
        return None

    def holds_file(self, path: Path) -> bool:
        """A bucket holds no local file."""
        return False

    def holds(self, uri: str) -> bool:
        """Whether an s3:// URI names an object under this store's bucket and prefix."""
        if not is_s3_uri(uri):
            return False
        bucket, key = split_s3_uri(uri)
        return bucket == self.bucket and (not self.prefix or key.startswith(self.prefix + "/"))

    @property
    def signer(self):  # noqa: ANN201
        """The client that signs links: the public endpoint's, when one is set."""
        if not self.public_endpoint:
            return self.client
        if self._signer is None:
            self._signer = s3_client(endpoint_url=self.public_endpoint)
        return self._signer

    def presign(self, key: str, expires: int = 3600) -> str:
        return self.signer.generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=int(expires),
        )

    def download(self, key: str, path: Path) -> None:
        """Multipart, concurrent download through boto3's transfer manager."""
        # One temp name per process and thread: workers sharing a model cache, and jobs
        # of one batching worker, may fetch the same file at once.
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.part")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._call(
                self.client.download_file,
                self.uri(key),
                Bucket=self.bucket,
                Key=self._key(key),
                Filename=str(tmp),
            )
            os.replace(tmp, path)
        except OSError as exc:  # the local side: a full disk, a read-only cache folder
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(exc, ConnectionError):
                raise
            raise refused_write(f"download {self.uri(key)} to", str(path), exc) from None


def open_store(url: str, public_endpoint: str = "") -> Store:
    """`s3://bucket/prefix` or `file:///abs/dir` or `file://./relative/dir`.

    `public_endpoint`: an S3 store signs its links for this endpoint (Settings.s3_public_endpoint).
    """
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ValueError(f"storage URL {url!r} names no bucket")
        return S3Store(parsed.netloc, parsed.path, public_endpoint=public_endpoint)
    if parsed.scheme == "file":
        return FileStore(local_path(url), url)
    if parsed.scheme == "":
        return FileStore(url)
    raise ValueError(f"unsupported storage URL {url!r}: use s3://bucket/prefix or file:///dir")


def local_path(uri: str) -> Path:
    """Path of a `file://` URI; `file://./x` and `file://x` are relative to the cwd."""
    parsed = urlparse(uri)
    if parsed.scheme not in ("file", ""):
        raise ValueError(f"not a file URI: {uri!r}")
    if parsed.scheme == "":
        return Path(uri)
    return Path(unquote(parsed.netloc + parsed.path))


def split_s3_uri(uri: str) -> tuple[str, str]:
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ValueError(f"not an s3:// URI: {uri!r}")
    return parsed.netloc, parsed.path.lstrip("/")
