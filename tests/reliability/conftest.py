"""Fixtures of the reliability suite: test models in S3 and the figures report.

The S3 server and bucket fixtures come from tests/conftest.py; `redis_url` is
overridden here with a private redis-server per module. Set
ACTVIZ_WRITE_REPORT=1 to write the measured figures into docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import harness
import pytest

ROOT = Path(__file__).resolve().parents[2]
REPORT = ROOT / "docs" / "reliability.md"
STARTED = time.monotonic()
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"


@pytest.fixture(scope="session")
def rel_model_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return harness.build_models(tmp_path_factory.mktemp("reliability-models"))


@pytest.fixture(scope="module")
def models(s3, bucket: str, rel_model_files: dict[str, Path]) -> dict[str, str]:  # noqa: ANN001
    """s3:// URIs of the test models in this module's bucket."""
    uris = {}
    for name, path in rel_model_files.items():
        key = f"models/{path.name}"
        s3.upload_file(str(path), bucket, key)
        uris[name] = f"s3://{bucket}/{key}"
    return uris


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A private redis-server per module (AOF on), so concurrent test runs never share a queue."""
    server = harness.RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server.url
    server.stop()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if not harness.FIGURES:
        return
    if all(item.nodeid.startswith("tests/reliability/") for item in session.items):
        minutes = (time.monotonic() - STARTED) / 60
        harness.record("Suite", "tests/reliability wall time (min)", round(minutes, 1))
        harness.record("Suite", "tests / failed", f"{len(session.items)} / {session.testsfailed}")
    logs = [p for p in harness.WORKER_LOGS if p.exists()]
    leaks = [
        p
        for p in logs
        if any(secret in p.read_text(errors="replace") for secret in harness.SECRETS)
    ]
    harness.record(
        "Security", "all worker logs of the run / holding a secret", f"{len(logs)} / {len(leaks)}"
    )
    text = render_figures(harness.FIGURES)
    print("\n" + text)
    if os.environ.get("ACTVIZ_WRITE_REPORT") == "1" and REPORT.is_file():
        doc = REPORT.read_text()
        pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.DOTALL)
        REPORT.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", doc))


def render_figures(figures: dict[str, dict]) -> str:
    lines = []
    for section in sorted(figures):
        lines.append(f"**{section}**\n")
        lines.append("| measure | value |")
        lines.append("|---|---|")
        for name, value in figures[section].items():
            shown = json.dumps(value) if isinstance(value, (dict, list)) else str(value)
            lines.append(f"| {name} | {shown} |")
        lines.append("")
    return "\n".join(lines).rstrip()
