"""infra/s3/seaweedfs-start.sh, the compose `s3` service's entrypoint, run here with the service's
own environment: the identities file it writes (scoped, private) and the server it starts."""

from __future__ import annotations

import json
import stat
import subprocess
from pathlib import Path

from compose_file import load_compose, read_env_file, service_environment

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "infra" / "s3" / "seaweedfs-start.sh"


def start(tmp_path: Path, **overrides: str) -> tuple[subprocess.CompletedProcess, Path, Path]:
    config, argv = tmp_path / "s3.json", tmp_path / "argv"
    stub = tmp_path / "entrypoint.sh"  # stands in for the image's /entrypoint.sh
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {argv}\n')
    stub.chmod(0o755)
    env = {
        "PATH": "/usr/bin:/bin",
        **service_environment("s3", read_env_file()),
        "S3_CONFIG_PATH": str(config),
        "SEAWEEDFS_ENTRYPOINT": str(stub),
        **overrides,
    }
    out = subprocess.run(
        ["/bin/sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=30
    )
    return out, config, argv


def test_the_compose_service_runs_this_script():
    s3 = load_compose()["services"]["s3"]
    assert s3["entrypoint"] == ["/bin/sh", "/actviz/seaweedfs-start.sh"]
    assert "./infra/s3/seaweedfs-start.sh:/actviz/seaweedfs-start.sh:ro" in s3["volumes"]


def test_identities_are_scoped_to_the_bucket_and_the_file_is_private(tmp_path):
    out, config, argv = start(tmp_path)
    assert out.returncode == 0, out.stderr
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    env = read_env_file()
    identities = {i["name"]: i for i in json.loads(config.read_text())["identities"]}
    assert identities["worker"]["actions"] == [
        "Read:actviz/models/*",
        "Read:actviz/results/*",
        "Write:actviz/results/*",
        "List:actviz",
    ]
    assert identities["producer"]["actions"] == [
        "Read:actviz/results/*",
        "Write:actviz/results/*",
        "List:actviz",
    ]
    assert identities["worker"]["credentials"] == [
        {"accessKey": env["ACTVIZ_S3_ACCESS_KEY"], "secretKey": env["ACTVIZ_S3_SECRET_KEY"]}
    ]
    assert (
        identities["producer"]["credentials"][0]["accessKey"]
        == env["ACTVIZ_PRODUCER_S3_ACCESS_KEY"]
    )
    assert "Admin" in identities["admin"]["actions"]
    assert argv.read_text().split() == [
        "server",
        "-dir=/data",
        "-s3",
        "-s3.port=9000",
        f"-s3.config={config}",
    ]
    for secret in ("S3_ADMIN_SECRET_KEY", "ACTVIZ_S3_SECRET_KEY", "ACTVIZ_PRODUCER_S3_SECRET_KEY"):
        assert env[secret] not in out.stdout + out.stderr


def test_a_key_that_would_break_the_file_is_refused(tmp_path):
    out, config, argv = start(tmp_path, S3_WORKER_SECRET_KEY='abc"def')
    assert out.returncode == 2
    assert "may not hold quotes" in out.stderr
    assert not argv.exists()


def test_a_missing_key_is_refused(tmp_path):
    out, _, argv = start(tmp_path, S3_PRODUCER_SECRET_KEY="")
    assert out.returncode != 0 and "S3_PRODUCER_SECRET_KEY" in out.stderr
    assert not argv.exists()
