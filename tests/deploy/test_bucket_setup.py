"""`python -m producer.bucket_setup`, the stack's one-shot storage set-up, against an S3 server
that enforces IAM: it creates the bucket and its lifecycle rule, proves each role's keys have
exactly the access the stack gives it, and stops the stack (exit 1, one line) when they do not."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from stack import StrictS3, allow, bucket_roles, setup_env, subprocess_env

BUCKET = "actviz-setup"
PREFIX = "results"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    # Free actions: the server's first answer, then each user's creation, policy and keys.
    server = StrictS3(tmp_path_factory.mktemp("setup-s3") / "moto.log", 1 + 5 * 3)
    try:
        keys = bucket_roles(server, BUCKET, PREFIX)
        keys["broad_worker"] = server.user("broad_worker", allow(["s3:*"], BUCKET, f"{BUCKET}/*"))
        keys["nothing"] = server.user("nothing", allow(["s3:ListBucket"], "other-bucket"))
        server.client("s3", keys["admin"]).create_bucket(Bucket="spend-free-actions")
        server.enforce("spend-free-actions", keys["nothing"])
        yield server, keys
    finally:
        server.stop()


def run_setup(server: StrictS3, keys: dict, **roles: str) -> subprocess.CompletedProcess:
    env = subprocess_env(
        **setup_env(server, keys, f"s3://{BUCKET}/{PREFIX}", **roles),
        ACTVIZ_RESULT_EXPIRES=str(3 * 86400 + 1),
    )
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(name, None)
    return subprocess.run(
        [sys.executable, "-m", "producer.bucket_setup"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )


def test_it_creates_the_bucket_and_its_lifecycle_rule_and_checks_both_roles(server):
    server, keys = server
    out = run_setup(server, keys)
    assert out.returncode == 0, out.stderr
    assert "created bucket actviz-setup" in out.stdout
    assert "the worker's keys have exactly the access it needs" in out.stdout
    assert "the producer's keys have exactly the access it needs" in out.stdout
    admin = server.client("s3", keys["admin"])
    rules = {r["ID"]: r for r in admin.get_bucket_lifecycle_configuration(Bucket=BUCKET)["Rules"]}
    expiry = {r["Filter"]["Prefix"]: r.get("Expiration", {}).get("Days") for r in rules.values()}
    assert expiry == {
        f"{PREFIX}/jobs/": 4,
        f"{PREFIX}/batches/": 4,
        f"{PREFIX}/inputs/": 8,
        "": None,
    }
    # The checks leave nothing behind.
    assert admin.list_objects_v2(Bucket=BUCKET).get("KeyCount", 0) == 0
    again = run_setup(server, keys)  # a restarted stack runs it again
    assert again.returncode == 0, again.stderr
    assert "created bucket" not in again.stdout


def test_a_worker_key_that_may_write_models_stops_the_stack(server):
    server, keys = server
    out = run_setup(server, keys, worker="broad_worker")
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "bucket-setup: worker: PutObject models/.actviz-access-check/"
        + out.stderr.split("models/.actviz-access-check/")[1].split()[0]
        + " was allowed; the worker's keys must not have that permission"
    ]
    assert "Traceback" not in out.stderr


def test_a_producer_key_without_access_to_the_results_stops_the_stack(server):
    server, keys = server
    out = run_setup(server, keys, producer="nothing")
    assert out.returncode == 1
    assert out.stderr.startswith("bucket-setup: producer: PutObject results/.actviz-access-check/")
    assert "refused (AccessDenied); the producer needs it" in out.stderr
    assert "Traceback" not in out.stderr
