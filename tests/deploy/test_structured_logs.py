"""Worker log lines: JSON per line, job id on every line of a job, no credentials."""

from __future__ import annotations

import io
import json
import logging

import pytest

from producer.settings import Settings
from worker.logs import configure_logging, current_job_id, job_context


@pytest.fixture
def capture():
    def install(**fields):
        stream = io.StringIO()
        handler = configure_logging(Settings(**fields), stream=stream)
        return stream, handler

    root = logging.getLogger()
    level = root.level
    yield install
    root.setLevel(level)
    for handler in list(root.handlers):
        if getattr(handler, "_actviz", False):
            root.removeHandler(handler)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(ln) for ln in stream.getvalue().splitlines()]


def test_json_lines_carry_the_job_id_from_any_logger(capture):
    stream, _ = capture(log_json=True)
    logging.getLogger("actviz.test").info("before")
    with job_context("job-123"):
        logging.getLogger("actviz.test").info("inside %s", "ours")
        logging.getLogger("botocore.somewhere").warning("inside theirs")
    logging.getLogger("actviz.test").info("after")
    out = lines(stream)
    assert [e["message"] for e in out] == ["before", "inside ours", "inside theirs", "after"]
    assert [e.get("job_id") for e in out] == [None, "job-123", "job-123", None]
    assert out[2]["level"] == "WARNING" and out[2]["logger"] == "botocore.somewhere"
    assert out[0]["ts"].endswith("Z")


def test_job_context_nests_and_restores(capture):
    with job_context("outer"):
        with job_context("inner"):
            assert current_job_id() == "inner"
        assert current_job_id() == "outer"
    assert current_job_id() is None


def test_extra_fields_become_json_keys(capture):
    stream, _ = capture(log_json=True)
    with job_context("j1"):
        logging.getLogger("actviz.test").info("stage done", extra={"stage": "forward", "ms": 12.5})
    (entry,) = lines(stream)
    assert entry["stage"] == "forward" and entry["ms"] == 12.5 and entry["job_id"] == "j1"


def test_credentials_in_urls_never_reach_the_log(capture):
    stream, _ = capture(log_json=True)
    secret = "s3cr3t-pw"
    log = logging.getLogger("actviz.test")
    log.info("broker redis://:%s@redis:6379/0", secret)
    log.info("extra", extra={"url": f"redis://user:{secret}@redis:6379/0"})
    try:
        raise ConnectionError(f"cannot reach redis://:{secret}@redis:6379")
    except ConnectionError:
        log.exception("failed")
    text = stream.getvalue()
    assert secret not in text
    assert "redis://***@redis:6379/0" in text
    assert len(lines(stream)) == 3


def test_plain_format_shows_the_job_id_or_a_dash(capture):
    stream, _ = capture(log_json=False)
    log = logging.getLogger("actviz.test")
    log.info("outside")
    with job_context("abc"):
        log.info("inside")
    first, second = stream.getvalue().splitlines()
    assert "[-] outside" in first
    assert "[abc] inside" in second


def test_configure_logging_twice_keeps_one_handler(capture):
    capture(log_json=True)
    capture(log_json=False, log_level="WARNING")
    ours = [h for h in logging.getLogger().handlers if getattr(h, "_actviz", False)]
    assert len(ours) == 1
    assert logging.getLogger().level == logging.WARNING
