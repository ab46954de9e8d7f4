"""`actviz gc`: old job and batch folders go whole; newer ones and inputs stay (local and S3)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from stack import ACTVIZ, subprocess_env

from producer.gc import collect, parse_duration
from producer.storage import FileStore, open_store

DAY = 86400


def fill(store, jobs: list[str]) -> None:  # noqa: ANN001
    for job in jobs:
        store.put(f"jobs/{job}/manifest.json", b"{}")
        store.put(f"jobs/{job}/layers/00-conv.png", b"png" * 100)
    store.put("batches/b-old/index.html", b"<html>")
    store.put("inputs/abc.png", b"image")


def age(root: Path, folder: str, days: float) -> None:
    then = time.time() - days * DAY
    for path in (root / folder).rglob("*"):
        os.utime(path, (then, then))


def test_the_local_folder_loses_old_folders_whole_and_keeps_the_rest(tmp_path: Path) -> None:
    root = tmp_path / "store"
    store = FileStore(root)
    fill(store, ["old1", "old2", "new1", "mixed"])
    for folder in ("jobs/old1", "jobs/old2", "batches/b-old", "inputs"):
        age(root, folder, 10)
    age(root, "jobs/mixed", 10)
    (root / "jobs/mixed/manifest.json").touch()  # written today: the folder stays whole
    env = subprocess_env(ACTVIZ_STORAGE_URL=root.as_uri(), HOME=str(tmp_path / "home"))
    dry = subprocess.run(
        [str(ACTVIZ), "gc", "--older-than", "7d", "--dry-run", "--json"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert dry.returncode == 0, dry.stderr.decode()
    planned = json.loads(dry.stdout)
    assert planned["folders"] == ["jobs/old1/", "jobs/old2/", "batches/b-old/"]
    assert (root / "jobs/old1/manifest.json").exists()  # a dry run deletes nothing
    done = subprocess.run(
        [str(ACTVIZ), "gc", "--older-than", "7d", "--json"],
        env=env,
        capture_output=True,
        timeout=60,
    )
    report = json.loads(done.stdout)
    assert report["objects"] == 5 and report["folders"] == planned["folders"]
    assert not (root / "jobs/old1").exists() and not (root / "batches/b-old").exists()
    assert (root / "jobs/new1/manifest.json").exists()
    assert (root / "jobs/mixed/layers/00-conv.png").exists()
    assert (root / "inputs/abc.png").exists()  # inputs may be shared by newer jobs
    bad = subprocess.run(
        [str(ACTVIZ), "gc", "--older-than", "soon"], env=env, capture_output=True, timeout=60
    )
    assert bad.returncode == 2 and b"is not a duration" in bad.stderr


def test_s3_folders_go_in_batch_deletes(s3, bucket: str, s3_endpoint: str, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    store = open_store(f"s3://{bucket}/results")
    fill(store, [f"j{i}" for i in range(3)])
    # Nothing is older than a day yet; seen from ten days ahead, everything is.
    assert collect(store, DAY).folders == []
    report = collect(store, DAY, now=time.time() + 10 * DAY)
    assert report.folders == ["jobs/j0/", "jobs/j1/", "jobs/j2/", "batches/b-old/"]
    assert report.objects == 7
    assert store.list("jobs/") == [] and store.list("inputs/") == ["inputs/abc.png"]


@pytest.mark.parametrize(("text", "seconds"), [("7d", 7 * DAY), ("12h", 43200), ("90", 90)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds
