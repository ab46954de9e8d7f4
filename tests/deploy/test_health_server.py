"""The worker's one HTTP port: liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import re
import subprocess
import sys
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


def test_gpu_sampling_never_imports_a_framework():
    # A scrape in a process that has not loaded TensorFlow or JAX samples nothing
    # and must not pull either in (seconds of import and a CUDA context).
    code = (
        "import sys; from worker.metrics import sample_gpu_memory; "
        "n = sample_gpu_memory(); "
        "print(n, 'tensorflow' in sys.modules, 'jax' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["0", "False", "False"], out.stderr


def test_gpu_memory_of_a_jax_gpu_appears_in_metrics(server):
    jax = pytest.importorskip("jax", reason="JAX not installed: GPU sampling checked on GPU hosts")
    gpus = [d for d in jax.local_devices() if d.platform == "gpu"]
    if not gpus:
        pytest.skip("no GPU: GPU memory sampling is checked on GPU hosts")
    import jax.numpy as jnp

    block = jnp.ones((64, 1024, 1024), dtype=jnp.float32).block_until_ready()  # 256 MiB
    status, body = fetch(server.port, "/metrics")
    assert status == 200
    used = re.search(r'^actviz_gpu_memory_bytes\{device="GPU:0"\} (\S+)$', body, re.M)
    peak = re.search(r'^actviz_gpu_memory_peak_bytes\{device="GPU:0"\} (\S+)$', body, re.M)
    assert used and float(used.group(1)) >= block.nbytes
    assert peak and float(peak.group(1)) >= float(used.group(1))


def test_thread_cpu_counts_the_backends_threads_as_native_and_pythons_by_name():
    # TensorFlow runs a CPU forward pass on its own pool threads, which no job's
    # clock sees: the native gauge holds their CPU, and none of a busy Python thread's,
    # which the per-kind gauge shows under the thread's name without its number.
    code = """
import os, threading, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
import numpy as np, tensorflow as tf
from prometheus_client import REGISTRY
from worker.metrics import sample_threads
spun, release = threading.Event(), threading.Event()
def spin():
    end = time.thread_time() + 0.5
    while time.thread_time() < end:
        pass
    spun.set(); release.wait()
before = sample_threads()
worker = threading.Thread(target=spin, name="actviz-spin_1")
worker.start(); spun.wait()
# Sampled while the thread lives: once `threading` has dropped it, the kernel may still
# list it for an instant, and a sample then would count it (see sample_threads).
python_added = sample_threads() - before
spin = REGISTRY.get_sample_value("actviz_thread_cpu_seconds", {"threads": "actviz-spin"})
release.set(); worker.join()
x = tf.random.uniform((8, 128, 128, 16))
w = tf.random.uniform((3, 3, 16, 64))
start_native, start_all = sample_threads(), time.process_time()
for _ in range(40):
    tf.nn.conv2d(x, w, 1, "SAME").numpy()
native = sample_threads() - start_native
print(python_added, native, time.process_time() - start_all, spin)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    python_added, native, total, spin = (float(v) for v in out.stdout.split())
    assert python_added < 0.1, out.stderr  # the 0.5 s of a Python thread is not native
    assert spin >= 0.45, spin  # it is the actviz-spin threads'
    assert native > 0.25 * total > 0, (native, total)  # the convolutions ran on TF's threads
