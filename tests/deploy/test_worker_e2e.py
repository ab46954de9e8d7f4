"""End to end without containers: `actviz worker` started with exactly the environment the
`worker-cpu` service gets in the compose stack (the image's ENV, then docker-compose.yml's
variables), container addresses swapped for a local Redis and S3 server."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from compose_file import interpolate, load_compose, localize, read_env_file, service_environment

from producer.client import Client
from producer.contract import TIMED_STAGES
from producer.settings import Settings

REDIS_DB = 14
ROOT = Path(__file__).resolve().parents[2]
ACTVIZ = Path(sys.executable).parent / "actviz"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def image_environment(home: Path, variant: str = "cpu") -> dict[str, str]:
    """The ENV of the worker image's final stage for `variant`, inherited ENV included
    (the final stage is FROM runtime-<variant>, itself FROM runtime-base), its home
    folder moved to `home`."""
    text = (ROOT / "worker" / "Dockerfile").read_text().replace("\\\n", " ")
    stages: dict[str, tuple[str, list[str]]] = {}
    for chunk in text.split("\nFROM ")[1:]:
        head, *lines = chunk.splitlines()
        base, _, alias = head.partition(" AS ")
        stages[alias.strip() or base.strip()] = (base.strip().replace("${VARIANT}", variant), lines)
    chain, name = [], "runtime"
    while name in stages:
        chain.append(stages[name][1])
        name = stages[name][0]
    env: dict[str, str] = {}
    for lines in reversed(chain):  # the base stage's ENV first, the final stage's last
        for line in lines:
            if line.startswith("ENV "):
                for pair in shlex.split(line[4:]):
                    key, _, value = pair.partition("=")
                    env[key] = value.replace("${VARIANT}", variant)
    assert env.pop("PATH").startswith("/opt/venv/bin:")  # the venv; here: this interpreter's
    return {k: v.replace("/home/actviz", str(home)) for k, v in env.items()}


def test_the_gpu_image_requires_a_gpu_and_the_cpu_image_does_not(tmp_path: Path) -> None:
    assert image_environment(tmp_path, "gpu")["ACTVIZ_REQUIRE_GPU"] == "true"
    assert image_environment(tmp_path, "cpu")["ACTVIZ_REQUIRE_GPU"] == "false"
    assert image_environment(tmp_path, "gpu")["ACTVIZ_QUEUES"] == "gpu"


@pytest.fixture(scope="module")
def compose_env():
    # The CPU service: on this machine, the GPU image's worker would refuse to start
    # (ACTVIZ_REQUIRE_GPU), as it should without a GPU.
    return service_environment("worker-cpu", read_env_file())


@pytest.fixture(scope="module")
def compose_bucket(s3, compose_env):
    """The bucket the compose stack's s3-init creates."""
    name = urlsplit(compose_env["ACTVIZ_STORAGE_URL"]).netloc
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=name)
    return name


def poll_readiness(proc: subprocess.Popen, port: int, timeout: float = 180) -> list[int]:
    """Every change of the /readyz status from the first answer until 200 (or exit)."""
    seen: list[int] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            status, _ = get(port, "/readyz")
        except OSError:  # not listening yet
            time.sleep(0.05)
            continue
        if not seen or seen[-1] != status:
            seen.append(status)
        if status == 200:
            break
        time.sleep(0.05)
    return seen


@pytest.fixture(scope="module")
def worker(s3_endpoint, compose_bucket, redis_url, compose_env, tmp_path_factory):
    """A running `actviz worker` and the /readyz answers it gave while starting."""
    port = free_port()
    env = localize(compose_env, broker_url=redis_url, s3_endpoint=s3_endpoint, port=port)
    home = tmp_path_factory.mktemp("home")
    # Nothing from this process leaks in: the worker sees the image's ENV, then the
    # compose variables on top, as in the container.
    base = {"PATH": os.environ["PATH"], "HOME": str(home), **image_environment(home)}
    log_path = home / "worker.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [str(ACTVIZ), "worker"], env={**base, **env}, stdout=log, stderr=subprocess.STDOUT
        )
    seen = poll_readiness(proc, port)
    yield {"proc": proc, "port": port, "env": env, "seen": seen, "log": log_path}
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def worker_log(worker) -> str:
    return worker["log"].read_text(errors="replace")


@pytest.fixture(scope="module")
def producer_env(worker):
    """This process talks to the same S3 as the worker (boto3 reads these variables)."""
    names = (
        "AWS_ENDPOINT_URL_S3",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
    )
    with pytest.MonkeyPatch.context() as mp:
        for name in names:
            mp.setenv(name, worker["env"][name])
        yield


def local_client(worker) -> Client:
    env = worker["env"]
    return Client(
        settings=Settings(
            broker_url=env["ACTVIZ_BROKER_URL"], storage_url=env["ACTVIZ_STORAGE_URL"]
        )
    )


@pytest.fixture(scope="module")
def finished_job(worker, producer_env):
    assert worker["seen"] and worker["seen"][-1] == 200, worker_log(worker)[-3000:]
    from worker.demo import image_path

    job = local_client(worker).submit("builtin:demo", Path(image_path()))
    return job, job.wait(timeout=180)


def test_readyz_flips_from_503_to_ready_after_preload(worker):
    assert worker["seen"] == [503, 200], worker_log(worker)[-3000:]
    assert get(worker["port"], "/healthz")[0] == 200
    assert "builtin:demo" in worker["env"]["ACTVIZ_PRELOAD"]


def test_metrics_count_the_finished_job_and_time_every_stage(worker, finished_job):
    job, result = finished_job
    assert result.layers
    status, body = get(worker["port"], "/metrics")
    assert status == 200
    succeeded = re.search(r'^actviz_jobs_total\{code="",status="succeeded"\} (\S+)$', body, re.M)
    assert succeeded and float(succeeded.group(1)) >= 1, body
    for stage in TIMED_STAGES:
        count = re.search(rf'^actviz_stage_seconds_count\{{stage="{stage}"\}} (\S+)$', body, re.M)
        assert count and float(count.group(1)) >= 1, f"no observation for stage {stage}"
    wait = re.search(r"^actviz_queue_wait_seconds_count (\S+)$", body, re.M)
    assert wait and float(wait.group(1)) >= 1


def test_logs_are_json_lines_tagged_with_the_job_id_and_free_of_secrets(worker, finished_job):
    job, _ = finished_job
    text = worker_log(worker)
    entries = [json.loads(ln) for ln in text.splitlines() if ln.startswith("{")]
    assert entries, text[-2000:]
    # Celery logs "received" before the task runs and "succeeded" after it returns;
    # every line any other logger writes in between belongs to the job.
    start = next(i for i, e in enumerate(entries) if job.id in e["message"])
    end = next(i for i, e in enumerate(entries) if "succeeded" in e["message"] and i > start)
    inside = [e for e in entries[start + 1 : end] if not e["logger"].startswith("celery.")]
    assert inside, "the job wrote no log lines of its own"
    assert [e for e in inside if e.get("job_id") != job.id] == []
    assert worker["env"]["AWS_SECRET_ACCESS_KEY"] not in text
    assert read_env_file()["REDIS_PASSWORD"] not in text


def healthcheck_argv(test: list[str]) -> list[str]:
    """A Docker exec-form healthcheck, run with this interpreter in place of `python`."""
    assert test[0] == "CMD" and test[1] == "python", test
    return [sys.executable, *test[2:]]


def test_image_and_compose_healthchecks_pass_against_the_ready_worker(worker):
    text = (ROOT / "worker" / "Dockerfile").read_text()
    image_test = json.loads(re.search(r"^HEALTHCHECK .*\\\n\s*CMD (\[.*\])$", text, re.M).group(1))
    env = {"PATH": os.environ["PATH"], "ACTVIZ_METRICS_PORT": str(worker["port"])}
    image_check = [sys.executable, *image_test[1:]]
    assert subprocess.run(image_check, env=env, capture_output=True, timeout=30).returncode == 0
    env["ACTVIZ_METRICS_PORT"] = str(free_port())  # nothing listens there
    assert subprocess.run(image_check, env=env, capture_output=True, timeout=30).returncode != 0

    compose_test = load_compose()["services"]["worker"]["healthcheck"]["test"]
    argv = [a.replace(":9100/", f":{worker['port']}/") for a in healthcheck_argv(compose_test)]
    assert subprocess.run(argv, capture_output=True, timeout=30).returncode == 0


def test_demo_producer_command_from_compose_gets_a_result(worker, s3_endpoint):
    producer = load_compose()["services"]["producer"]
    env = service_environment("producer", read_env_file())
    env = localize(env, broker_url=worker["env"]["ACTVIZ_BROKER_URL"], s3_endpoint=s3_endpoint)
    script = interpolate(producer["command"][0], {})  # "$$" -> "$", as Compose does
    assert producer["entrypoint"] == ["/bin/sh", "-c"]
    base = {"PATH": f"{ACTVIZ.parent}:{os.environ['PATH']}", "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run(
        ["/bin/sh", "-c", script], env={**base, **env}, capture_output=True, text=True, timeout=240
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "succeeded" in (out.stdout + out.stderr).lower()


def slow_model(path: Path) -> Path:
    """A real CNN whose forward pass takes a second or more on a CPU (wide 256x256 convs)."""
    import keras

    keras.utils.set_random_seed(3)
    inputs = keras.Input((256, 256, 3))
    x = inputs
    for width in (128, 256, 256, 256):
        x = keras.layers.Conv2D(width, 3, padding="same", activation="relu")(x)
    keras.Model(inputs, x, name="slow_cnn").save(path)
    return path


def test_sigterm_mid_job_lets_the_job_finish_then_exits_0(worker, finished_job, s3, tmp_path):
    """What a Kubernetes scale-down or `docker compose stop` does to a busy worker."""
    env, proc = worker["env"], worker["proc"]
    storage = urlsplit(env["ACTVIZ_STORAGE_URL"])
    s3.upload_file(str(slow_model(tmp_path / "slow.keras")), storage.netloc, "models/slow.keras")
    model_uri = f"s3://{storage.netloc}/models/slow.keras"
    assert any(model_uri.startswith(p) for p in env["ACTVIZ_MODEL_ALLOW"].split(","))

    from worker.demo import image_path

    client = local_client(worker)
    job = client.submit(model_uri, Path(image_path()))
    deadline = time.monotonic() + 120
    while job.status() != "started" and time.monotonic() < deadline:
        time.sleep(0.02)
    assert job.status() == "started"
    proc.send_signal(signal.SIGTERM)
    # The signal must have landed while the job ran, or this test proves nothing.
    assert not client.store.exists(f"jobs/{job.id}/manifest.json")
    assert proc.wait(120) == 0, worker_log(worker)[-3000:]
    result = job.wait(timeout=10)
    assert len(result.layers) == 4
    assert "Warm shutdown" in worker_log(worker) or "warm shutdown" in worker_log(worker)
