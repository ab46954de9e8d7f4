"""The worker's one HTTP port: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest

from worker import metrics, service


def fetch(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


@pytest.fixture
def server():
    service.set_ready(False)
    srv = service.start(0)
    yield srv
    srv.stop()
    service.set_ready(False)


def test_healthz_answers_while_the_process_runs(server):
    assert fetch(server.port, "/healthz") == (200, "ok\n")


def test_readyz_is_503_until_set_ready_then_200(server):
    assert fetch(server.port, "/readyz")[0] == 503
    service.set_ready(True)
    assert fetch(server.port, "/readyz") == (200, "ready\n")
    service.set_ready(False)
    assert fetch(server.port, "/readyz")[0] == 503


def test_metrics_exposes_actviz_series_and_recorded_values(server):
    metrics.JOBS.labels(status="succeeded", code="").inc()
    metrics.STAGE_SECONDS.labels(stage="forward").observe(0.02)
    status, body = fetch(server.port, "/metrics")
    assert status == 200
    for name in (
        "actviz_jobs_total",
        "actviz_stage_seconds_bucket",
        "actviz_queue_wait_seconds",
        "actviz_model_cache_bytes",
        "actviz_forward_batch_images",
    ):
        assert name in body, name
    line = next(
        ln
        for ln in body.splitlines()
        if ln.startswith('actviz_stage_seconds_count{stage="forward"}')
    )
    assert float(line.split()[-1]) >= 1


def test_unknown_path_is_404(server):
    assert fetch(server.port, "/")[0] == 404


def test_port_already_taken_raises_oserror(server):
    with pytest.raises(OSError):
        service.start(server.port)


def test_gpu_sampling_is_a_noop_without_tensorflow_gpus():
    # TF may or may not be imported by other tests; on this CPU machine either way
    # there is no GPU, so nothing is sampled and nothing raises.
    assert metrics.sample_gpu_memory() == 0
