"""`actviz worker --per-device K`: K solo worker processes share one device."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from stack import free_port, start_worker, subprocess_env, wait_for

from producer import Client, Settings
from worker.main import child_plan
from worker.runtime.cores import usable_cores

REDIS_DB = 7
pytestmark = pytest.mark.timeout(180)


def test_children_are_spread_over_devices_and_told_not_to_preallocate() -> None:
    settings = Settings(
        broker_url="redis://127.0.0.1:6379/0",
        storage_url="s3://bucket/results",
        concurrency=2,
        processes_per_device=3,
        metrics_port=9100,
    )
    plan = child_plan(settings, {})
    assert [env["CUDA_VISIBLE_DEVICES"] for env in plan] == ["0", "0", "0", "1", "1", "1"]
    assert [env["ACTVIZ_METRICS_PORT"] for env in plan] == [str(9100 + i) for i in range(6)]
    assert {env["ACTVIZ_PROCESSES_PER_DEVICE"] for env in plan} == {"1"}  # children run one each
    assert {env["ACTVIZ_HOST_PROCESSES"] for env in plan} == {"6"}  # and know they share cores
    assert {env["XLA_PYTHON_CLIENT_PREALLOCATE"] for env in plan} == {"false"}
    # What the operator set is kept; one process per device needs no change.
    mine = child_plan(settings, {"XLA_PYTHON_CLIENT_PREALLOCATE": "true"})
    assert all("XLA_PYTHON_CLIENT_PREALLOCATE" not in env for env in mine)
    single = child_plan(Settings(concurrency=2, metrics_port=0), {})
    assert [env["CUDA_VISIBLE_DEVICES"] for env in single] == ["0", "1"]
    assert all("XLA_PYTHON_CLIENT_PREALLOCATE" not in env for env in single)
    assert {env["ACTVIZ_METRICS_PORT"] for env in single} == {"0"}


def test_two_processes_on_one_device_both_serve_jobs(
    redis_url: str,
    bucket: str,
    saved_models: dict[str, Path],
    png_bytes: bytes,
    tmp_path: Path,
) -> None:
    port = free_port()
    while not _free(port + 1):
        port = free_port()
    env = subprocess_env(
        ACTVIZ_BROKER_URL=redis_url,
        ACTVIZ_STORAGE_URL=f"s3://{bucket}/results",
        ACTVIZ_MODEL_ALLOW=f"{saved_models['seq'].parent.as_uri()}/",
        ACTVIZ_MODEL_CACHE_DIR=str(tmp_path / "cache"),
        ACTVIZ_METRICS_PORT=str(port),
        ACTVIZ_BATCH_SIZE="1",
    )
    worker = start_worker(env, tmp_path / "worker.log", "--per-device", "2")
    try:
        wait_for(lambda: worker.log_text().count(" ready.") == 2, 90, "both worker processes")
        # Each process runs TensorFlow's ops on its share of the cores, one op at a time.
        share = max(1, usable_cores() // 2)
        pools = f"TensorFlow's pools: {share} thread(s) for each op, 1 op(s) at a time"
        assert worker.log_text().count(pools) == 2, worker.log_text()[-3000:]
        for child_port in (port, port + 1):
            wait_for(lambda p=child_port: _ready(p), 30, f"/readyz on {child_port}")
        client = Client(settings=Settings.from_env(environ=env))
        nodes = {name for reply in client.app.control.ping(timeout=3) for name in reply}
        assert {name.split("@")[0] for name in nodes} == {"actviz0", "actviz1"}
        model = saved_models["seq"].as_uri()
        jobs = [client.submit(model, png_bytes, layers="conv2d_1") for _ in range(4)]
        assert all(job.wait(timeout=90).manifest["job_id"] == job.id for job in jobs)
    finally:
        worker.stop()
    assert worker.proc.returncode is not None


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def _free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_processes_per_device_default_to_what_the_cores_per_gpu_can_feed() -> None:
    from worker.main import default_per_device, visible_gpus

    assert default_per_device(cores=16, gpus=1, devices=1) == 12
    assert default_per_device(cores=16, gpus=2, devices=2) == 6  # 8 cores per GPU
    assert default_per_device(cores=16, gpus=2, devices=1) == 12  # one device used
    assert default_per_device(cores=6, gpus=1, devices=1) == 4
    assert default_per_device(cores=2, gpus=1, devices=1) == 1
    assert default_per_device(cores=128, gpus=1, devices=1) == 16  # capped
    assert default_per_device(cores=64, gpus=0, devices=1) == 1  # no GPU: one process
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "0,1"}) == 2
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == 0
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "-1"}) == 0


def test_children_are_pinned_to_the_devices_the_worker_was_given() -> None:
    """A container given GPU 3, or GPUs by UUID, pins its children to those, not to 0..N-1."""
    from worker.main import child_plan

    plan = child_plan(Settings(concurrency=2, metrics_port=0), {"CUDA_VISIBLE_DEVICES": "3,GPU-ab"})
    assert [env["CUDA_VISIBLE_DEVICES"] for env in plan] == ["3", "GPU-ab"]
    per_device = Settings(concurrency=1, processes_per_device=2, metrics_port=0)
    assert [
        e["CUDA_VISIBLE_DEVICES"] for e in child_plan(per_device, {"CUDA_VISIBLE_DEVICES": "5"})
    ] == [
        "5",
        "5",
    ]


def test_a_worker_refuses_devices_it_does_not_have() -> None:
    from worker.main import gpu_refusal

    assert "sees no GPU" in gpu_refusal(Settings(require_gpu=True), 0)
    assert gpu_refusal(Settings(require_gpu=True), 1) is None
    refused = gpu_refusal(Settings(concurrency=4), 1)
    assert "--concurrency 4" in refused and "sees 1" in refused
    assert gpu_refusal(Settings(concurrency=4), 0) is None  # a CPU host: processes share cores


@pytest.mark.parametrize("visible", ["", "0"])
def test_require_gpu_makes_a_worker_without_one_exit_with_the_reason(
    visible: str, redis_url: str, tmp_path: Path
) -> None:
    """No GPU at all (''), or a device named but not there ('0' on this CPU machine): the
    worker exits with status 2 and says why, rather than serving jobs on the CPU."""
    import subprocess

    from stack import ACTVIZ, subprocess_env

    env = subprocess_env(
        ACTVIZ_BROKER_URL=redis_url,
        ACTVIZ_STORAGE_URL=(tmp_path / "results").as_uri(),
        ACTVIZ_REQUIRE_GPU="true",
        CUDA_VISIBLE_DEVICES=visible,
    )
    done = subprocess.run(
        [str(ACTVIZ), "worker"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert "ACTVIZ_REQUIRE_GPU is set" in done.stderr and "sees no GPU" in done.stderr


def test_each_process_sizes_its_pools_to_its_share_of_the_cores() -> None:
    from worker.runtime.cores import backend_threads, core_share, render_threads, report_helpers

    # (cores, processes on the host) -> (share, encode threads, report helpers, TensorFlow's
    # threads for each op and ops at a time)
    cases = {
        (16, 12): (1, 2, 0, (1, 1)),  # below a share of 4 cores, reports in the job's thread
        (16, 5): (3, 3, 0, (3, 1)),
        (16, 4): (4, 4, 2, (4, 1)),
        (16, 1): (16, 16, 4, None),  # a process alone keeps TensorFlow's default pools
        (2, 1): (2, 2, 0, None),
    }
    for (cores, processes), expected in cases.items():
        settings = Settings.from_env({"ACTVIZ_HOST_PROCESSES": str(processes)})
        got = (core_share(settings, cores), render_threads(settings, cores))
        got += (report_helpers(settings, cores), backend_threads(settings, cores))
        assert got == expected, (cores, processes)
