"""The worker image, built for real and run: `infra/image/build.sh cpu` builds worker/Dockerfile
with Docker where an engine answers and with buildah otherwise; `actviz worker` then runs inside
the image on the host network, with the compose stack's `worker-cpu` environment pointed at this
machine's Redis and S3 server, and serves a job submitted from here."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from compose_file import localize, read_env_file, service_environment
from stack import ACTVIZ, StrictS3, bucket_roles, free_port, setup_env, subprocess_env, wait_for

from producer.client import Client
from producer.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "infra" / "image" / "build.sh"
INFRA_README = ROOT / "infra" / "README.md"
BUILD_TIMEOUT_S = 3600  # a first build downloads TensorFlow into the image
IMAGE_UID = 10001
# The suite's 300 s per test would cut a first build short (four minutes on two cores).
pytestmark = pytest.mark.timeout(BUILD_TIMEOUT_S + 600)


class Engine:
    """What the tests need from Docker or buildah: a long-running command in a container of
    the image, more commands beside it, the image's configuration and size."""

    def __init__(self, name: str, image: str) -> None:
        self.name, self.image = name, image
        self.container = f"actviz-test-{uuid.uuid4().hex[:10]}"
        if name == "buildah":
            subprocess.run(
                ["buildah", "from", "--name", self.container, image],
                check=True,
                capture_output=True,
            )

    def _env_args(self, env: dict[str, str]) -> list[str]:
        return [arg for key, value in env.items() for arg in ("--env", f"{key}={value}")]

    def start(self, argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
        if self.name == "docker":
            cmd = ["docker", "run", "--rm", "--name", self.container, "--network", "host"]
            cmd += ["--entrypoint", argv[0], *self._env_args(env), self.image, *argv[1:]]
        else:
            cmd = ["buildah", "run", "--isolation", "chroot", "--network", "host"]
            cmd += [*self._env_args(env), self.container, "--", *argv]
        with open(log, "wb") as out:
            return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)

    def exec(
        self, argv: list[str], env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess:
        env_args = self._env_args(env or {})
        if self.name == "docker":
            cmd = ["docker", "exec", *env_args, self.container, *argv]
        else:
            cmd = ["buildah", "run", "--isolation", "chroot", "--network", "host", *env_args]
            cmd += [self.container, "--", *argv]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    def config(self) -> dict:
        """The image's Docker configuration (User, Env, Healthcheck, ...)."""
        if self.name == "docker":
            out = subprocess.run(
                ["docker", "image", "inspect", "--format", "{{json .Config}}", self.image],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            return json.loads(out.stdout)
        out = subprocess.run(
            ["buildah", "inspect", "--type", "image", self.image],
            check=True,
            capture_output=True,
            text=True,
        )
        return json.loads(out.stdout)["Docker"]["config"]

    def size_bytes(self) -> int:
        if self.name == "docker":
            out = subprocess.run(
                ["docker", "image", "inspect", "--format", "{{.Size}}", self.image],
                check=True, capture_output=True, text=True,
            )  # fmt: skip
            return int(out.stdout)
        out = subprocess.run(
            ["buildah", "images", "--format", "{{.Size}}", self.image],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        number, unit = out.stdout.split()[:2]
        return int(float(number) * {"kB": 1e3, "MB": 1e6, "GB": 1e9}[unit])

    def remove(self) -> None:
        cmd = ["docker", "rm", "-f"] if self.name == "docker" else ["buildah", "rm"]
        subprocess.run([*cmd, self.container], capture_output=True)


def build(what: str) -> dict:
    """infra/image/build.sh WHAT: the engine, base and image it says it used, and its seconds."""
    started = time.monotonic()
    out = subprocess.run(
        ["bash", str(BUILD), what], capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
    )
    seconds = time.monotonic() - started
    assert out.returncode == 0, f"{what} image build failed:\n{out.stderr[-6000:]}"
    said = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    return {**said, "seconds": seconds}


@pytest.fixture(scope="module")
def built():
    """The CPU worker image."""
    return build("cpu")


@pytest.fixture(scope="module")
def producer_image():
    """The producer image (the compose stack's s3-init runs it)."""
    built = build("producer")
    engine = Engine(built["engine"], built["image"])
    yield engine
    engine.remove()


@pytest.fixture(scope="module")
def engine(built):
    engine = Engine(built["engine"], built["image"])
    yield engine
    engine.remove()


def descendants(pid: int) -> list[int]:
    """Every process below `pid`, read from /proc (the container shares this PID namespace)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                stat = (entry / "stat").read_text()
                ppid = int(stat.rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def worker_pids(root: int) -> list[int]:
    """The `actviz worker` Python processes started under `root`."""
    pids = []
    for pid in descendants(root):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv[0].endswith(b"python") and b"worker" in argv and argv[1].endswith(b"actviz"):
                pids.append(pid)
    return pids


def uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))


def readyz(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=3) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except OSError:
        return None


@pytest.fixture(scope="module")
def in_image(engine, s3, s3_endpoint, redis_url, tmp_path_factory):
    """`actviz worker` inside the image with the compose `worker-cpu` environment, ready."""
    compose_env = service_environment("worker-cpu", read_env_file())
    port = free_port()
    env = localize(compose_env, broker_url=redis_url, s3_endpoint=s3_endpoint, port=port)
    bucket = urlsplit(env["ACTVIZ_STORAGE_URL"]).netloc
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou):
        s3.create_bucket(Bucket=bucket)
    log = tmp_path_factory.mktemp("image") / "worker.log"
    proc = engine.start(["actviz", "worker"], env, log)

    def ready() -> bool:
        assert proc.poll() is None, f"the worker in the image exited:\n{log.read_text()[-4000:]}"
        return readyz(port) == 200

    wait_for(ready, 300, "the worker in the image to be ready", interval=0.5)
    yield {"proc": proc, "env": env, "port": port, "log": log}
    for pid in worker_pids(proc.pid):  # a warm shutdown, as `docker stop` asks for
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def test_the_build_says_which_engine_and_base_it_used(built, capsys):
    assert built["engine"] in ("docker", "buildah")
    assert built["base"].split()[0] and (
        "registry" in built["base"] or "mmdebstrap" in built["base"]
    )
    with capsys.disabled():
        print(
            f"\nworker image: {built['image']}, built with {built['engine']} in "
            f"{built['seconds']:.0f} s on base {built['base']}"
        )


def test_a_job_submitted_from_the_host_is_served_inside_the_image(
    in_image, s3, monkeypatch, tmp_path
):
    env = in_image["env"]
    for name in (
        "AWS_ENDPOINT_URL_S3",
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "AWS_DEFAULT_REGION",
    ):
        monkeypatch.setenv(name, env[name])
    client = Client(
        settings=Settings(
            broker_url=env["ACTVIZ_BROKER_URL"], storage_url=env["ACTVIZ_STORAGE_URL"]
        )
    )
    from worker.demo import image_path

    job = client.submit("builtin:demo", Path(image_path()), layers=":4")
    result = job.wait(timeout=240)
    manifest = result.manifest
    assert manifest["model"]["uri"] == "builtin:demo"
    assert [layer["name"] for layer in manifest["layers"]][:1] and len(manifest["layers"]) == 4
    # Every file the manifest lists is in the bucket, written by the worker in the image.
    storage = urlsplit(env["ACTVIZ_STORAGE_URL"])
    prefix = f"{storage.path.strip('/')}/jobs/{job.id}/"
    stored = {
        obj["Key"].removeprefix(prefix)
        for page in s3.get_paginator("list_objects_v2").paginate(
            Bucket=storage.netloc, Prefix=prefix
        )
        for obj in page.get("Contents", [])
    }
    assert "manifest.json" in stored
    assert set(manifest["files"]) <= stored, set(manifest["files"]) - stored
    # The image's TensorFlow and the host's agree on what the model saw: the same job in
    # process here (the embedded mode `make demo` uses), against the manifest from the image.
    local = embedded_manifest(Path(image_path()), tmp_path)
    assert manifest["model"]["sha256"] == local["model"]["sha256"]
    for theirs, ours in zip(manifest["layers"], local["layers"], strict=True):
        assert (theirs["name"], theirs["output_shape"]) == (ours["name"], ours["output_shape"])
        for stat in ("mean", "max", "sparsity"):
            assert theirs["stats"][stat] == pytest.approx(ours["stats"][stat], rel=1e-3, abs=1e-5)


def embedded_manifest(image: Path, tmp_path: Path) -> dict:
    store = tmp_path / "embedded"
    env = subprocess_env(ACTVIZ_STORAGE_URL=store.as_uri())
    env.pop("ACTVIZ_BROKER_URL", None)
    cmd = [
        str(ACTVIZ),
        "submit",
        "--model",
        "builtin:demo",
        "--image",
        str(image),
        "--layers",
        ":4",
    ]
    out = subprocess.run(
        [*cmd, "--wait", "--json"], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    job_id = json.loads(out.stdout.strip().splitlines()[-1])["job_id"]
    return json.loads((store / "jobs" / job_id / "manifest.json").read_text())


def test_the_worker_runs_as_the_images_non_root_user(in_image, engine):
    assert engine.config()["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    pids = worker_pids(in_image["proc"].pid)
    assert pids, "no actviz worker process found under the container"
    assert {uid_of(pid) for pid in pids} == {IMAGE_UID}
    assert engine.exec(["id", "-u"]).stdout.strip() == str(IMAGE_UID)


def test_the_workers_compiled_loops_are_cached_under_the_images_cache_folder(in_image, engine):
    """The CPU image's worker reduces its passes on the host; its warm-up (the compose
    default preloads the demo model) compiled those loops, and numba wrote their machine
    code to NUMBA_CACHE_DIR, as the worker's user: a restarted container loads it."""
    env = dict(item.split("=", 1) for item in engine.config()["Env"])
    folder = env["NUMBA_CACHE_DIR"]
    assert folder.startswith("/home/actviz/.cache/")
    found = engine.exec(["find", folder, "-name", "host_kernels.*.nbi", "-user", str(IMAGE_UID)])
    assert found.returncode == 0, found.stderr
    assert "host_kernels.fused-" in found.stdout, found.stdout


def test_the_images_healthcheck_passes_inside_it_and_fails_without_a_worker(in_image, engine):
    check = engine.config()["Healthcheck"]["Test"]
    assert check[0] == "CMD", check
    port = str(in_image["port"])
    assert engine.exec(check[1:], {"ACTVIZ_METRICS_PORT": port}).returncode == 0
    assert engine.exec(check[1:], {"ACTVIZ_METRICS_PORT": str(free_port())}).returncode != 0


def test_infra_readme_records_the_image_size(engine):
    """infra/README.md says how large the CPU image is; the figure stays within 20% of a build."""
    measured = engine.size_bytes()
    written = re.search(r"CPU image is about ([\d.]+) GB", INFRA_README.read_text())
    assert written, "infra/README.md does not record the CPU image's size"
    assert float(written.group(1)) * 1e9 == pytest.approx(measured, rel=0.2), measured


def test_the_producer_image_runs_the_stacks_storage_set_up(producer_image, tmp_path):
    """What the compose stack's s3-init does, inside the producer image: the bucket, its
    lifecycle rules, and both roles' keys checked against a server that enforces IAM."""
    assert producer_image.config()["User"] == f"{IMAGE_UID}:{IMAGE_UID}"
    server = StrictS3(tmp_path / "moto.log", 1 + 3 * 3)
    try:
        keys = bucket_roles(server, "actviz", "results")
        server.enforce("no-such-bucket", keys["producer"])
        env = setup_env(server, keys, "s3://actviz/results")
        out = producer_image.exec(["python", "-m", "producer.bucket_setup"], env)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "bucket-setup: s3://actviz/results ready" in out.stdout
        rules = server.client("s3", keys["admin"]).get_bucket_lifecycle_configuration(
            Bucket="actviz"
        )
        assert {r["ID"] for r in rules["Rules"]} >= {
            "actviz-jobs",
            "actviz-batches",
            "actviz-inputs",
        }
        # The light image carries no TensorFlow.
        probe = producer_image.exec(
            ["python", "-c", "import importlib.util as u; print(u.find_spec('tensorflow'))"]
        )
        assert probe.stdout.strip() == "None"
    finally:
        server.stop()
