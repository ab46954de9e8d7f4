"""One-shot storage set-up for a stack: `python -m producer.bucket_setup`.

With the administrator's keys it creates the bucket when missing and sets its lifecycle
rules: job and batch folders expire after the result lifetime (`ACTVIZ_RESULT_EXPIRES`,
rounded up to days), uploaded inputs after twice that (jobs share them by content hash),
unfinished multipart uploads after one day. Then it proves, with the worker's and
the producer's own keys, that each can do what it needs and nothing more:

- the worker reads `models/`, reads and writes under the prefix, and cannot write `models/`;
- the producer reads and writes under the prefix, and cannot write or read `models/`.

Any failure exits 1 with one line naming the role, the operation and the key: a stack whose
storage is wrong stops at its init step instead of failing jobs later. Every setting comes
from the environment (the compose file's `s3-init` service, or the dev overlay's Job):

    AWS_ENDPOINT_URL_S3, AWS_DEFAULT_REGION      the server (boto3's own variables)
    ACTVIZ_STORAGE_URL                           s3://BUCKET/PREFIX
    S3_ADMIN_ACCESS_KEY / S3_ADMIN_SECRET_KEY
    S3_WORKER_ACCESS_KEY / S3_WORKER_SECRET_KEY
    S3_PRODUCER_ACCESS_KEY / S3_PRODUCER_SECRET_KEY
    ACTVIZ_RESULT_EXPIRES                        seconds; the Settings default when unset
"""

from __future__ import annotations

import math
import os
import sys
import uuid
from dataclasses import dataclass
from typing import Any

from producer.settings import Settings
from producer.storage import split_s3_uri

MODELS_PREFIX = "models/"
CHECK_DIR = ".actviz-access-check"


class SetupFailed(Exception):
    """The bucket could not be set up, or a role's permissions are not what they must be."""


@dataclass(frozen=True)
class Target:
    bucket: str
    prefix: str  # without slashes at either end
    expire_days: int


def target_from(settings: Settings) -> Target:
    try:
        bucket, prefix = split_s3_uri(settings.storage_url)
    except ValueError:
        raise SetupFailed(
            f"ACTVIZ_STORAGE_URL must be s3://BUCKET/PREFIX, got {settings.storage_url!r}"
        ) from None
    prefix = prefix.strip("/")
    if not prefix:
        raise SetupFailed(
            "ACTVIZ_STORAGE_URL needs a prefix (s3://BUCKET/results): the models live beside it"
        )
    return Target(bucket, prefix, max(1, math.ceil(settings.result_expires / 86400)))


def _code(exc: Exception) -> str:
    return getattr(exc, "response", {}).get("Error", {}).get("Code", type(exc).__name__)


def _expire(rule_id: str, prefix: str, days: int) -> dict[str, Any]:
    return {
        "ID": rule_id,
        "Status": "Enabled",
        "Filter": {"Prefix": prefix},
        "Expiration": {"Days": days},
    }


def prepare_bucket(admin: Any, target: Target) -> list[str]:
    """Create the bucket when missing and (re)set its lifecycle rule; what was done, in words."""
    done = []
    try:
        admin.head_bucket(Bucket=target.bucket)
    except Exception as exc:  # noqa: BLE001 - any answer but 404 is a real failure
        if _code(exc) not in ("404", "NoSuchBucket", "NotFound"):
            raise SetupFailed(f"admin: HeadBucket {target.bucket}: {_code(exc)}") from exc
        try:
            admin.create_bucket(Bucket=target.bucket)
        except Exception as create_exc:  # noqa: BLE001
            raise SetupFailed(
                f"admin: CreateBucket {target.bucket}: {_code(create_exc)}"
            ) from create_exc
        done.append(f"created bucket {target.bucket}")
    days = target.expire_days
    rules = [
        _expire("actviz-jobs", f"{target.prefix}/jobs/", days),
        _expire("actviz-batches", f"{target.prefix}/batches/", days),
        # Uploads are shared by content hash: a new job may reuse one, so they outlive results.
        _expire("actviz-inputs", f"{target.prefix}/inputs/", 2 * days),
        {
            "ID": "actviz-abort-unfinished-uploads",
            "Status": "Enabled",
            "Filter": {"Prefix": ""},
            "AbortIncompleteMultipartUpload": {"DaysAfterInitiation": 1},
        },
    ]
    try:
        admin.put_bucket_lifecycle_configuration(
            Bucket=target.bucket, LifecycleConfiguration={"Rules": rules}
        )
    except Exception as exc:  # noqa: BLE001
        raise SetupFailed(
            f"admin: PutBucketLifecycleConfiguration {target.bucket}: {_code(exc)}"
        ) from exc
    done.append(
        f"jobs and batches under {target.prefix}/ expire after {days} day(s), inputs after {2 * days}"
    )
    return done


def _expect(role: str, allowed: bool, op: str, key: str, call: Any) -> None:
    try:
        call()
    except Exception as exc:  # noqa: BLE001
        if allowed:
            raise SetupFailed(
                f"{role}: {op} {key} refused ({_code(exc)}); the {role} needs it"
            ) from exc
        if _code(exc) not in ("AccessDenied", "403", "Forbidden"):
            raise SetupFailed(
                f"{role}: {op} {key} failed with {_code(exc)} instead of AccessDenied"
            ) from exc
        return
    if not allowed:
        raise SetupFailed(
            f"{role}: {op} {key} was allowed; the {role}'s keys must not have that permission"
        )


def check_role(role: str, client: Any, admin: Any, target: Target) -> None:
    """Prove `role`'s keys have exactly the access the stack gives it (module docstring)."""
    bucket, run = target.bucket, uuid.uuid4().hex[:12]
    inside = f"{target.prefix}/{CHECK_DIR}/{role}-{run}"
    model = f"{MODELS_PREFIX}{CHECK_DIR}/{role}-{run}"
    admin.put_object(Bucket=bucket, Key=model, Body=b"model")
    listing = f"{target.prefix}/"
    checks = [  # (allowed, operation, key, call)
        (
            True,
            "PutObject",
            inside,
            lambda: client.put_object(Bucket=bucket, Key=inside, Body=b"x"),
        ),
        (
            True,
            "GetObject",
            inside,
            lambda: client.get_object(Bucket=bucket, Key=inside)["Body"].read(),
        ),
        (
            True,
            "ListObjectsV2",
            listing,
            lambda: client.list_objects_v2(Bucket=bucket, Prefix=listing),
        ),
        (role == "worker", "GetObject", model, lambda: client.get_object(Bucket=bucket, Key=model)),
        (False, "PutObject", model, lambda: client.put_object(Bucket=bucket, Key=model, Body=b"x")),
    ]
    try:
        for allowed, operation, key, call in checks:
            _expect(role, allowed, operation, key, call)
    finally:
        for key in (inside, model):
            admin.delete_object(Bucket=bucket, Key=key)


def _client(access: str, secret: str) -> Any:
    import boto3

    return boto3.client("s3", aws_access_key_id=access, aws_secret_access_key=secret)


def main() -> int:
    env = os.environ
    try:
        target = target_from(Settings.from_env())
        keys = {}
        for role in ("admin", "worker", "producer"):
            access, secret = (
                env.get(f"S3_{role.upper()}_{part}_KEY", "") for part in ("ACCESS", "SECRET")
            )
            if not access or not secret:
                raise SetupFailed(
                    f"S3_{role.upper()}_ACCESS_KEY and S3_{role.upper()}_SECRET_KEY must be set"
                )
            keys[role] = (access, secret)
        admin = _client(*keys["admin"])
        for line in prepare_bucket(admin, target):
            print(f"bucket-setup: {line}")
        for role in ("worker", "producer"):
            check_role(role, _client(*keys[role]), admin, target)
            print(f"bucket-setup: the {role}'s keys have exactly the access it needs")
    except SetupFailed as exc:
        print(f"bucket-setup: {exc}", file=sys.stderr)
        return 1
    print(f"bucket-setup: s3://{target.bucket}/{target.prefix} ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
