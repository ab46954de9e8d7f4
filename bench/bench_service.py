"""Service benchmark: jobs/s and latency through Redis, S3 and a real worker, vs the in-process floor.

One run measures, on the same images:

  in-process (no queue, no storage), images/s per model and layer spec:
    forward     the compiled forward pass alone on a preprocessed batch
    analyze     forward + grids + stats + manifest (`analyze`), per batch size
    classic     the book's recipe from bench/bench_engine.py (per-layer
                predict + matplotlib), classic CNN and ':8' only
  service: its own redis-server and moto_server on free ports, one
    `actviz worker --preload` subprocess per batch size (ACTVIZ_BATCH_SIZE),
    producers at each concurrency submitting the fixed workload; end-to-end
    latency is submit (image upload included) to the Celery result being
    SUCCESS, which the worker stores after the job's manifest
  cold start: seconds from starting `actviz worker --preload` to /readyz 200,
    and the first job of a model the worker has not loaded yet.

Workload: --jobs per model (classic 150x150 CNN of bench_engine, and a deeper
VGG-style CNN on the same input), half with layers ':8', half with the
default (every spatial layer), in that order; every service job has an image of
its own (320x240 JPEG), which its producer uploads (--reuse-images cycles the 16
images of the in-process floor instead, and the client skips their uploads).
With --storage file, each producer deletes its job's stored files once the job is
done, so the folder holds only the jobs in flight (--keep-results keeps them all).

    python bench/bench_service.py [--jobs 200] [--batch-sizes 1,8] [--concurrency 1,4,16]
    KERAS_BACKEND=jax python bench/bench_service.py --in-process-only
    KERAS_BACKEND=jax python bench/bench_service.py --storage file --models classic \
        --batch-sizes 32 --concurrency 64 --per-device 4      # a GPU node

`--in-process-only` needs no Redis, S3 server or worker: it prints the
engine floor with a batch-size sweep (1/8/32) and where the time goes.
Never asserts; prints one table.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_engine  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from producer import contract  # noqa: E402
from producer.contract import JobOptions  # noqa: E402
from producer.settings import Settings  # noqa: E402
from worker.engine import (  # noqa: E402
    analyze,
    manifest_bytes,
    open_model,
    preprocess,
)

SPECS = (":8", None)  # first 8 layers; every spatial layer (the default)
IMAGES = 16
SWEEP = (1, 8, 32)
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


# ---- models and images ------------------------------------------------------


def deep_cnn() -> keras.Model:
    """A deeper VGG-style CNN on 150x150x3: 9 convs in 4 blocks, 13 spatial layers."""
    keras.utils.set_random_seed(1)
    layers = keras.layers
    stack: list = [keras.Input((150, 150, 3))]
    for filters, convs in ((32, 2), (64, 2), (96, 3), (128, 2)):
        stack += [
            layers.Conv2D(filters, 3, padding="same", activation="relu") for _ in range(convs)
        ]
        stack.append(layers.MaxPooling2D(2))
    stack += [layers.GlobalAveragePooling2D(), layers.Dense(1, activation="sigmoid")]
    return keras.Sequential(stack, name="deep_vgg_style")


def photos(count: int, width: int = 320, height: int = 240, first: int = 0) -> list[bytes]:
    """`count` distinct photo-like JPEGs: gradients, waves and noise, seeded `first`, ..."""
    out = []
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    for seed in range(first, first + count):
        rng = np.random.default_rng(seed)
        fx, fy = rng.uniform(8, 30, 2)
        base = np.stack([xx / width, yy / height, 0.5 + 0.5 * np.sin(xx / fx + yy / fy)], axis=-1)
        pixels = np.clip(base * 220 + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
        out.append(buffer.getvalue())
    return out


def save_models(folder: Path) -> dict[str, Path]:
    paths = {"classic": folder / "classic_cnn.keras", "deep": folder / "deep_cnn.keras"}
    bench_engine.classic_cnn().save(paths["classic"])
    deep_cnn().save(paths["deep"])
    return paths


def spec_name(spec: str | None) -> str:
    return spec or "default"


# ---- in-process floor -------------------------------------------------------


def median_s(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm: graphs, caches, colormap LUT
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


@dataclass
class Floor:
    forward: dict[int, float] = field(default_factory=dict)  # batch -> images/s
    analyze: dict[int, float] = field(default_factory=dict)  # batch -> images/s
    stages: dict[str, float] = field(default_factory=dict)  # ms per image, largest batch
    activation_mb: dict[int, float] = field(default_factory=dict)  # batch -> MB
    d2h_kb: float = 0.0  # KB per image copied from the device to the host, largest batch
    cpu_ms: dict[int, float] = field(default_factory=dict)  # batch -> process CPU ms per image
    classic: float | None = None


def mean_floor(first: Floor, second: Floor) -> Floor:
    """Two in-process references, taken before and after the service rows, averaged: a
    shared machine drifts over a run, and the service is compared with their mean."""

    def mean(name: str) -> dict[int, float]:
        ours, theirs = getattr(first, name), getattr(second, name)
        return {b: (ours[b] + theirs[b]) / 2 for b in ours}

    return replace(first, forward=mean("forward"), analyze=mean("analyze"), cpu_ms=mean("cpu_ms"))


def measure_floor(
    path: Path, images: list[bytes], spec: str | None, batches: tuple[int, ...], repeats: int
) -> Floor:
    settings = Settings()
    options = JobOptions(layers=spec)
    loaded = open_model(path)
    extractor = loaded.extractor(spec)
    floor = Floor()
    for batch in batches:
        chosen = [images[i % len(images)] for i in range(batch)]
        pixels = np.stack(
            [
                preprocess(d, loaded.input_shape, options, settings, loaded.auto_scale).pixels
                for d in chosen
            ]
        )
        floor.activation_mb[batch] = batch * extractor.output_bytes(pixels.shape[1:]) / 2**20
        forward = bench_engine.forward_only(extractor)
        floor.forward[batch] = batch / median_s(lambda x=pixels, f=forward: f(x), repeats)

        def run(chosen: list[bytes] = chosen) -> list:
            results = analyze(loaded, chosen, options, settings)
            for result in results:
                manifest_bytes(result.manifest)
            return results

        run()  # compiles this pass size: its CPU is not the engine's per image
        cpu_started = time.process_time()
        rounds = max(2, repeats // max(1, batch // 4))
        floor.analyze[batch] = batch / median_s(run, rounds)
        # median_s runs `run` rounds + 1 times (one untimed warm run, warm already).
        floor.cpu_ms[batch] = (time.process_time() - cpu_started) * 1000.0 / (batch * (rounds + 1))
    results = analyze(
        loaded, [images[i % len(images)] for i in range(batches[-1])], options, settings
    )
    for stage in ("preprocess", "forward", "render", "stats"):
        total = sum(r.manifest["timings_ms"][stage] for r in results)
        # The forward pass is shared: every image of the batch records the same time.
        floor.stages[stage] = total / len(results) / (len(results) if stage == "forward" else 1)
    floor.d2h_kb = results[0].manifest["batch"]["d2h_bytes"] / len(results) / 1024
    return floor


def measure_classic(path: Path, image: bytes, repeats: int) -> float:
    loaded = open_model(path)
    book = bench_engine.activation_model(loaded.model)
    with tempfile.TemporaryDirectory(prefix="actviz-classic-") as tmp:
        return 1.0 / median_s(
            lambda: bench_engine.classic_recipe(loaded.model, image, Path(tmp), book), repeats
        )


def device_name() -> str:
    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            gpus = tf.config.list_logical_devices("GPU")
            return gpus[0].name if gpus else "CPU"
        if backend == "jax":
            import jax

            device = jax.devices()[0]
            return f"{device.platform.upper()} ({device.device_kind})"
        if backend == "torch":
            import torch

            return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    except Exception as exc:  # noqa: BLE001 (the table says what it could not find)
        return f"unknown ({exc})"
    return "CPU"


# ---- real services ------------------------------------------------------------


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.05)
    raise TimeoutError(f"{what} not ready after {timeout} s")


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status == 200
    except OSError:
        return False


@contextlib.contextmanager
def services(folder: Path, s3: bool = True) -> Iterator[dict[str, str]]:
    """redis-server and (unless `s3` is false) moto_server on free ports.

    Yields the env a worker and client need.
    """
    bin_dir = Path(sys.executable).parent
    redis_port, s3_port = free_port(), free_port()
    redis_bin = shutil.which("redis-server")
    if redis_bin is None:
        raise SystemExit("redis-server not found; --in-process-only runs without it")
    procs = [
        subprocess.Popen(
            [redis_bin, "--port", str(redis_port), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            cwd=folder,
        )
    ]
    if s3:
        procs.append(
            subprocess.Popen(
                [str(bin_dir / "moto_server"), "-H", "127.0.0.1", "-p", str(s3_port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    endpoint = f"http://127.0.0.1:{s3_port}"
    try:
        env: dict = {}
        if s3:
            wait_until(lambda: http_ok(endpoint), 30, "moto_server")
            env = {**S3_ENV, "AWS_ENDPOINT_URL_S3": endpoint}
            os.environ.update(env)  # this process's boto3 (the producers) too
        import redis

        wait_until(lambda: _redis_up(redis, redis_port), 30, "redis-server")
        env["ACTVIZ_BROKER_URL"] = f"redis://127.0.0.1:{redis_port}/0"
        env["pids"] = {"redis": procs[0].pid}
        if s3:
            env["pids"]["s3 server"] = procs[1].pid
        yield env
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)


def redis_commands(url: str) -> dict[str, float]:
    """Calls so far by command name, all clients (Redis's INFO commandstats)."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {
        name.removeprefix("cmdstat_"): float(value["calls"])
        for name, value in stats.items()
        if name.startswith("cmdstat_") and name not in ("cmdstat_info",)
    }


def process_tree(root: int) -> list[int]:
    """`root` and its live descendants (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    out, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        out.append(pid)
        frontier += children.get(pid, [])
    return out


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds one process has used."""
    return sum(cpu_tree(pid, depth=0).values())


def cpu_tree(root: int, depth: int = 64) -> dict[str, float]:
    """CPU seconds of `root` and its live descendants (Linux /proc), by role.

    "helpers": spawned helper processes (report rendering, quarantine), whose
    command line is multiprocessing's; "worker": the worker processes themselves
    (with --per-device K, the parent and its K children).
    """
    procs: dict[int, tuple[int, float]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        procs[int(stat.parent.name)] = (int(fields[1]), cpu)
    found: dict[str, float] = {}
    frontier, level = [root], 0
    while frontier and level <= depth:
        nxt = []
        for pid in frontier:
            if pid not in procs:
                continue
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                cmdline = b""
            role = "helpers" if b"multiprocessing" in cmdline else "worker"
            found[role] = found.get(role, 0.0) + procs[pid][1]
            nxt += [child for child, (parent, _) in procs.items() if parent == pid]
        frontier, level = nxt, level + 1
    return found


def port_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _redis_up(redis: object, port: int) -> bool:
    try:
        return bool(redis.Redis(port=port).ping())
    except Exception:  # noqa: BLE001
        return False


class Worker:
    """An `actviz worker --preload ... --per-device K` subprocess with its metrics ports
    (one per process: with K > 1 its K children serve port, port + 1, ...)."""

    def __init__(
        self, env: dict[str, str], preload: list[str], log: Path, per_device: int = 1
    ) -> None:
        self.port = free_port()
        while per_device > 1 and not all(port_free(self.port + i) for i in range(per_device)):
            self.port = free_port()
        self.ports = [self.port + i for i in range(max(1, per_device))]
        env = {**env, "ACTVIZ_METRICS_PORT": str(self.port)}
        # `actviz worker`, through this interpreter (its console script may be elsewhere).
        args = [sys.executable, "-m", "producer.cli", "worker"]
        args += ["--per-device", str(max(1, per_device))]
        for uri in preload:
            args += ["--preload", uri]
        self.started = time.monotonic()
        with log.open("wb") as out:
            self.proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT)
        self.log = log
        self.ready_s = wait_until(self._ready, 300, "actviz worker")

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"worker exited {self.proc.returncode}: {self.log.read_text()}")
        return all(http_ok(f"http://127.0.0.1:{port}/readyz") for port in self.ports)

    def counters(self) -> dict[str, float]:
        """So far, all processes: "passes", "images" (actviz_forward_batch_images),
        "native" (CPU seconds, actviz_native_thread_cpu_seconds), per thread kind of
        actviz_thread_cpu_seconds "threads=<kind>" (CPU seconds) and, per bucket bound `le`
        of the passes' histogram, "le=<bound>": passes of at most that size."""
        names = {
            "actviz_forward_batch_images_count": "passes",
            "actviz_forward_batch_images_sum": "images",
            "actviz_native_thread_cpu_seconds": "native",
        }
        values = dict.fromkeys(names.values(), 0.0)
        for port in self.ports:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
            for line in text.splitlines():
                name, _, value = line.partition(" ")
                if name in names:
                    values[names[name]] += float(value)
                elif name.startswith('actviz_thread_cpu_seconds{threads="'):
                    kind = "threads=" + name.split('"')[1]
                    values[kind] = values.get(kind, 0.0) + float(value)
                elif name.startswith('actviz_forward_batch_images_bucket{le="'):
                    bound = "le=" + name.split('"')[1]
                    values[bound] = values.get(bound, 0.0) + float(value)
        return values

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


def pass_shares(before: dict[str, float], after: dict[str, float]) -> dict[int, float]:
    """{size: share of the passes between two `counters()` readings} for every size the
    histogram's buckets tell apart (consecutive whole bounds: 1 to 8)."""
    bounds = sorted(int(float(k[3:])) for k in after if k.startswith("le=") and k[3:] != "+Inf")
    counts = {b: after[f"le={b}.0"] - before.get(f"le={b}.0", 0.0) for b in bounds}
    total = after["passes"] - before["passes"]
    shares, below = {}, 0.0
    for bound in bounds:
        if bound - 1 not in counts and bound != 1:
            break
        shares[bound] = (counts[bound] - below) / total if total else 0.0
        below = counts[bound]
    return shares


@dataclass
class Load:
    jobs: int
    seconds: float
    latencies: list[float]
    groups: list[str]  # "model spec" of each latency
    failed: int
    images_per_forward: float
    pass_sizes: dict[int, float]  # share of the forward passes by their size in images
    stages: dict[str, float]
    cpu_ms: dict[str, float]  # CPU ms per job, by process
    cpu_stages: dict[str, float]  # CPU ms per job by stage, from the jobs' own cpu_ms
    redis_calls: dict[str, float] = field(default_factory=dict)  # commands per job, by name
    threads: dict[str, float] = field(default_factory=dict)  # worker CPU ms per job, by thread kind

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) * 1000.0

    def worst_group_spread(self) -> tuple[float, str]:
        """The largest p95/p50 within one (model, layer spec) group, and that group.

        The workload mixes models of different cost, so the p95/p50 of all
        jobs together measures the mix as much as the service's jitter.
        """
        worst = (0.0, "")
        for group in sorted(set(self.groups)):
            values = [v for v, g in zip(self.latencies, self.groups, strict=True) if g == group]
            ratio = float(np.percentile(values, 95) / np.percentile(values, 50))
            worst = max(worst, (ratio, group))
        return worst


class Watcher:
    """One thread that polls every job in flight with a single MGET, every 5 ms.

    Polling each job from its own producer thread would cost the producers
    more CPU than the worker on a small machine; Celery's pub/sub result
    consumer is not safe to share between threads. A result is decoded only when
    its bytes changed since the last poll: a job stays STARTED for hundreds of
    polls, and decoding each one was most of the producers' CPU.
    """

    def __init__(self, app: object) -> None:
        self.backend = app.backend
        self._waiting: dict[str, tuple[threading.Event, list[str]]] = {}
        self._seen: dict[str, bytes] = {}  # each job's result as last decoded
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def wait(self, job_id: str) -> tuple[str, dict]:
        """Block until the job's result is stored; (final state, the task's result)."""
        event, state = threading.Event(), []
        with self._lock:
            self._waiting[job_id] = (event, state)
        event.wait()
        return state[0], state[1]

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(0.005):
            with self._lock:
                ids = list(self._waiting)
            if not ids:
                continue
            keys = [self.backend.get_key_for_task(i) for i in ids]
            for job_id, raw in zip(ids, self.backend.client.mget(keys), strict=True):
                if raw is None or self._seen.get(job_id) == raw:
                    continue
                self._seen[job_id] = raw
                meta = self.backend.decode_result(raw)
                if meta["status"] in ("SUCCESS", "FAILURE"):
                    del self._seen[job_id]
                    with self._lock:
                        event, state = self._waiting.pop(job_id)
                    result = meta.get("result")
                    state += [meta["status"], result if isinstance(result, dict) else {}]
                    event.set()


def run_load(
    settings: Settings,
    workload: list[tuple[str, bytes, str | None]],
    concurrency: int,
    keep: bool = True,
) -> tuple[float, list[float], int, dict[str, float], dict[str, float]]:
    """Submit `workload` with `concurrency` jobs in flight.

    `keep=False`: each producer deletes its job's stored files once the job is
    done, as a retention rule would, so that the store does not grow with the run
    (see `--keep-results`).

    Returns (seconds, [(group, latency s)], failed jobs, mean ms per worker stage,
    mean CPU ms per worker stage).
    """
    from producer import Client

    latencies: list[tuple[str, float]] = []
    stages: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    failed = [0]
    lock = threading.Lock()
    cursor = iter(workload)
    clients = [Client(settings=settings) for _ in range(concurrency)]
    watcher = Watcher(clients[0].app)

    def producer(client: Client) -> None:
        while True:
            with lock:
                item = next(cursor, None)
            if item is None:
                return
            model, image, spec = item
            started = time.perf_counter()
            job = client.submit(model, image, layers=spec)
            state, result = watcher.wait(job.id)
            elapsed = time.perf_counter() - started
            if not keep and state == "SUCCESS":
                prefix = contract.job_prefix(job.id)
                names = [prefix + name for name in result.get("files") or []]
                client.store.delete_many([*names, contract.manifest_key(job.id)])
            with lock:
                latencies.append((f"{model.rsplit('/', 1)[-1]} {spec_name(spec)}", elapsed))
                failed[0] += state == "FAILURE"
                for stage, ms in (result.get("timings_ms") or {}).items():
                    stages.setdefault(stage, []).append(ms)
                for stage, ms in (result.get("cpu_ms") or {}).items():
                    cpu.setdefault(stage, []).append(ms)

    threads = [threading.Thread(target=producer, args=(c,), daemon=True) for c in clients]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    watcher.close()
    means = {stage: statistics.mean(values) for stage, values in stages.items()}
    # Per job of the workload: a stage some jobs skip counts as 0 for them.
    done = max(1, len(latencies))
    cpu_means = {stage: sum(values) / done for stage, values in cpu.items()}
    return seconds, latencies, failed[0], means, cpu_means


class ImageSource:
    """Images for the service's jobs: a new one per job (the producer uploads each, as a
    user's would be), or, with `reuse`, the IMAGES of the in-process floor again (the
    client then finds each stored and skips its upload)."""

    def __init__(self, fixed: list[bytes], reuse: bool) -> None:
        self.fixed, self.reuse, self.next_seed = fixed, reuse, len(fixed)

    def take(self, count: int) -> list[bytes]:
        if self.reuse:
            return [self.fixed[i % len(self.fixed)] for i in range(count)]
        out = photos(count, first=self.next_seed)
        self.next_seed += count
        return out


def workload_of(uris: dict[str, str], images: ImageSource, jobs: int, specs: tuple = SPECS) -> list:
    """Per model `jobs` jobs in equal blocks of `specs` (':8' first, then the default),
    each with an image from `images`. Made before a load starts: generating images
    is not the producers' cost."""
    pictures = images.take(len(uris) * jobs)
    out = []
    for m, name in enumerate(uris):
        for i in range(jobs):
            spec = specs[i * len(specs) // max(1, jobs)]
            out.append((uris[name], pictures[m * jobs + i], spec))
    return out


def stage_models(storage: str, paths: dict[str, Path], folder: Path) -> tuple[str, str]:
    """Put the models (and an extra copy nobody preloads) where the worker reads them.

    Returns (models URI prefix, results storage URL). `s3`: the moto bucket;
    `file`: a local folder, for machines without the S3 test server.
    """
    files = {path.name: path for path in paths.values()}
    files["uncached.keras"] = paths["classic"]
    if storage == "file":
        models = folder / "models"
        models.mkdir(exist_ok=True)
        for name, path in files.items():
            shutil.copyfile(path, models / name)
        return models.resolve().as_uri() + "/", (folder / "results").resolve().as_uri()
    import boto3

    bucket = "actviz-bench"
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=bucket)
    for name, path in files.items():
        s3.upload_file(str(path), bucket, f"models/{name}")
    return f"s3://{bucket}/models/", f"s3://{bucket}/r"


def measure_service(
    args: argparse.Namespace, paths: dict[str, Path], images: list[bytes], folder: Path
) -> tuple[dict[tuple[int, int], Load], dict[str, float]]:
    loads: dict[tuple[int, int], Load] = {}
    cold: dict[str, float] = {}
    with services(folder, s3=args.storage == "s3") as env:
        pids = env.pop("pids")
        models_uri, storage_url = stage_models(args.storage, paths, folder)
        uris = {name: f"{models_uri}{path.name}" for name, path in paths.items()}
        settings = Settings(broker_url=env["ACTVIZ_BROKER_URL"], storage_url=storage_url)
        worker_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("ACTVIZ_")},
            **env,
            "ACTVIZ_STORAGE_URL": settings.storage_url,
            "ACTVIZ_MODEL_ALLOW": models_uri,
            "ACTVIZ_LOG_LEVEL": "WARNING",
            # Each job's cpu_ms, for the table by stage (--no-stage-cpu: the bare worker).
            "ACTVIZ_STAGE_CPU": "1" if args.stage_cpu else "0",
            # Celery's task events, as a worker watched by Flower sends them.
            "ACTVIZ_TASK_EVENTS": "1" if args.task_events else "0",
        }
        source = ImageSource(images, args.reuse_images)
        warm = [(uris[m], images[0], spec) for m in uris for spec in args.specs]
        for batch_size in args.batch_sizes:
            env_b = {
                **worker_env,
                "ACTVIZ_BATCH_SIZE": str(batch_size),
                "ACTVIZ_MODEL_CACHE_DIR": str(folder / f"cache-{batch_size}"),
            }
            log = folder / f"worker-b{batch_size}.log"
            worker = Worker(env_b, list(uris.values()), log, args.per_device)
            try:
                cold[f"ready_s_b{batch_size}"] = worker.ready_s
                run_load(settings, warm * 2, 4)  # build the ':8' extractors too
                # Compile every pass size the load will make: each (model, spec) group's
                # programs, one per pass size, at the highest concurrency.
                top = max(args.concurrency)
                groups: dict[tuple, list] = {}
                for item in workload_of(uris, source, 2 * top * len(args.specs), args.specs):
                    groups.setdefault((item[0], item[2]), []).append(item)
                run_load(settings, [i for g in groups.values() for i in g[: 2 * top]], top)
                for concurrency in args.concurrency:
                    workload = workload_of(uris, source, args.jobs, args.specs)
                    procs = {**pids, "producers": os.getpid()}
                    cpu_before = {n: cpu_seconds(pid) for n, pid in procs.items()}
                    tree_before = cpu_tree(worker.proc.pid)
                    before = worker.counters()
                    calls_before = redis_commands(settings.broker_url)
                    seconds, latencies, failed, stages, cpu_stages = run_load(
                        settings, workload, concurrency, not args.delete_results
                    )
                    calls_after = redis_commands(settings.broker_url)
                    after = worker.counters()
                    tree_after = cpu_tree(worker.proc.pid)
                    cpu_ms = {
                        n: (cpu_seconds(pid) - cpu_before[n]) * 1000.0 / len(workload)
                        for n, pid in procs.items()
                    }
                    for role in ("worker", "helpers"):
                        spent = tree_after.get(role, 0.0) - tree_before.get(role, 0.0)
                        cpu_ms[role] = spent * 1000.0 / len(workload)
                    # Of the worker's: its native threads' (the backend's pools).
                    cpu_ms["native"] = (after["native"] - before["native"]) * 1000.0 / len(workload)
                    passes = max(1.0, after["passes"] - before["passes"])
                    loads[(batch_size, concurrency)] = Load(
                        len(workload),
                        seconds,
                        [latency for _, latency in latencies],
                        [group for group, _ in latencies],
                        failed,
                        (after["images"] - before["images"]) / passes,
                        pass_shares(before, after),
                        stages,
                        cpu_ms,
                        cpu_stages,
                        {
                            name: (calls - calls_before.get(name, 0.0)) / len(workload)
                            for name, calls in calls_after.items()
                            if calls > calls_before.get(name, 0.0)
                        },
                        {
                            key[len("threads=") :]: (spent - before.get(key, 0.0))
                            * 1000.0
                            / len(workload)
                            for key, spent in after.items()
                            if key.startswith("threads=")
                        },
                    )
                    print(
                        f"  batch {batch_size:>2} concurrency {concurrency:>2}: "
                        f"{len(workload) / seconds:6.1f} jobs/s",
                        file=sys.stderr,
                    )
                if batch_size == args.batch_sizes[-1]:
                    _, first, _, _, _ = run_load(
                        settings, [(f"{models_uri}uncached.keras", images[1], None)], 1
                    )
                    cold["first_job_uncached_ms"] = first[0][1] * 1000.0
            finally:
                worker.stop()
    return loads, cold


# Thread kinds that do the engine's work (actviz_thread_cpu_seconds): the render pool and,
# on a CPU, the backend's own threads; the rest of a worker's threads serve the jobs.
ENGINE_THREADS = ("actviz-render", "native")


def print_thread_cpu(loads: dict[tuple[int, int], Load]) -> None:
    """The worker's CPU per job by thread kind, and the work of the threads around the
    engine over its render threads': a ratio the machine's speed cancels."""
    kinds = sorted({k for load in loads.values() for k, ms in load.threads.items() if ms >= 0.05})
    if not kinds:
        return
    print()
    print(
        "worker CPU per job by thread (ms, actviz_thread_cpu_seconds; ThreadPoolExecutor-0: "
        "the jobs' pool, MainThread: Celery's consumer, actviz-forward: the batcher):"
    )
    for (batch, conc), load in sorted(loads.items()):
        cells = ", ".join(f"{kind} {load.threads.get(kind, 0.0):.1f}" for kind in kinds)
        render = load.threads.get("actviz-render", 0.0)
        around = sum(ms for k, ms in load.threads.items() if k not in ENGINE_THREADS)
        ratio = f"; around / render {around / render:.2f}" if render > 0 else ""
        print(f"{batch:>5}{conc:>6}  {cells}{ratio}")
    print(
        "(around / render: the CPU of the threads that are not the engine's over the render "
        "threads': a ratio in which the machine's speed mostly cancels)"
    )


# ---- report -------------------------------------------------------------------


def weighted_rate(rates: list[float]) -> float:
    """Images/s of a workload with an equal number of images at each rate."""
    return len(rates) / sum(1.0 / r for r in rates)


def print_floor(
    floors: dict[tuple[str, str], Floor], batches: tuple[int, ...], twice: bool = False
) -> None:
    heads = [f"fwd b={b}" for b in batches] + [f"analyze b={b}" for b in batches]
    when = ", the mean of runs before and after the service rows" if twice else ""
    print(f"in-process, no queue, no storage (images/s{when}):")
    print(f"{'model':<9}{'layers':<9}" + "".join(f"{h:>14}" for h in heads) + f"{'classic':>10}")
    for (model, spec), floor in floors.items():
        cells = [floor.forward[b] for b in batches] + [floor.analyze[b] for b in batches]
        classic = f"{floor.classic:>10.2f}" if floor.classic else f"{'':>10}"
        print(f"{model:<9}{spec:<9}" + "".join(f"{c:>14.1f}" for c in cells) + classic)
    print()
    print("where the time goes per image at the largest batch (ms), and activation memory:")
    print(
        f"{'model':<9}{'layers':<9}{'preprocess':>11}{'forward':>9}{'render':>8}{'stats':>7}"
        + "".join(f"{f'MB b={b}':>10}" for b in batches)
        + f"{'D2H KB/img':>12}"
    )
    for (model, spec), floor in floors.items():
        s = floor.stages
        print(
            f"{model:<9}{spec:<9}{s['preprocess']:>11.1f}{s['forward']:>9.1f}"
            f"{s['render']:>8.1f}{s['stats']:>7.1f}"
            + "".join(f"{floor.activation_mb[b]:>10.1f}" for b in batches)
            + f"{floor.d2h_kb:>12.1f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="jobs per model per run")
    parser.add_argument("--batch-sizes", default="1,8", help="worker batch sizes to compare")
    parser.add_argument("--concurrency", default="1,4,16", help="producer concurrencies")
    parser.add_argument("--repeats", type=int, default=10, help="in-process repeats")
    parser.add_argument("--classic-repeats", type=int, default=3)
    parser.add_argument("--in-process-only", action="store_true", help="engine floor only")
    parser.add_argument(
        "--storage",
        choices=("s3", "file"),
        default="s3",
        help="results and models in the moto S3 server (default) or a local folder",
    )
    parser.add_argument("--models", default="classic,deep", help="models of the workload")
    parser.add_argument("--specs", default=":8,default", help="layer specs of the workload")
    parser.add_argument(
        "--no-stage-cpu",
        dest="stage_cpu",
        action="store_false",
        help="run the worker without measuring each stage's CPU (its clock reads cost a little)",
    )
    parser.add_argument(
        "--task-events",
        action="store_true",
        help="the worker sends Celery's task events (as when Flower watches it)",
    )
    parser.add_argument(
        "--reuse-images",
        action="store_true",
        help=f"cycle the {IMAGES} floor images instead of a new image per job (uploads skipped)",
    )
    parser.add_argument(
        "--keep-results",
        action="store_true",
        help="with --storage file, keep every job's stored files to the end of the run (by "
        "default each producer deletes its job's files once the job is done, so that the "
        "folder does not grow by about 0.7 MB a job: on a virtual machine, writing memory "
        "the guest has not used yet cost the worker's uploads up to ten times more CPU). "
        "The S3 server keeps them always (a delete is a request of its own there)",
    )
    parser.add_argument(
        "--per-device",
        type=int,
        default=0,
        help="worker processes sharing the device (0: the worker's default for this host)",
    )
    args = parser.parse_args()
    if args.per_device <= 0:
        from worker.main import default_per_device, usable_cores, visible_gpus

        args.per_device = default_per_device(usable_cores(), visible_gpus(dict(os.environ)), 1)
    args.models = [m for m in args.models.split(",") if m]
    args.delete_results = args.storage == "file" and not args.keep_results
    args.specs = tuple(None if s == "default" else s for s in args.specs.split(","))
    # SIGTERM unwinds like Ctrl-C, so the worker, Redis and S3 server it started are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.concurrency = [int(c) for c in args.concurrency.split(",")]

    now = datetime.datetime.now(datetime.UTC)
    images = photos(IMAGES)
    service_batch = max(args.batch_sizes)
    batches = SWEEP if args.in_process_only else tuple(sorted({1, service_batch}))
    with tempfile.TemporaryDirectory(prefix="actviz-bench-service-") as tmp:
        folder = Path(tmp)
        paths = {name: path for name, path in save_models(folder).items() if name in args.models}

        def references() -> dict[tuple[str, str], Floor]:
            return {
                (name, spec_name(spec)): measure_floor(path, images, spec, batches, args.repeats)
                for name, path in paths.items()
                for spec in args.specs
            }

        floors = references()
        classic = floors.get(("classic", ":8"))
        if classic is not None:
            classic.classic = measure_classic(paths["classic"], images[0], args.classic_repeats)
        loads, cold = ({}, {})
        drift: list[tuple[Floor, Floor]] = []
        if not args.in_process_only:
            loads, cold = measure_service(args, paths, images, folder)
            later = references()
            drift = [(floors[key], later[key]) for key in floors]
            floors = {key: mean_floor(floors[key], later[key]) for key in floors}

    print(f"actviz service benchmark  {now:%Y-%m-%d %H:%M} UTC")
    print(f"machine: {bench_engine.machine()}")
    print(f"keras {keras.__version__}, backend {keras.backend.backend()}, device {device_name()}")
    print(
        "images: 320x240 JPEGs, "
        + (
            f"the {IMAGES} floor images reused (uploads skipped)"
            if args.reuse_images
            else "a new one per service job (each uploaded)"
        )
        + f"; models: {', '.join(args.models)} "
        f"(150x150x3); layer specs: {', '.join(spec_name(s) for s in args.specs)}"
    )
    print()
    print_floor(floors, batches, twice=bool(drift))
    b = service_batch
    floor_fwd = weighted_rate([f.forward[b] for f in floors.values()])
    floor_all = weighted_rate([f.analyze[b] for f in floors.values()])
    print()
    print(
        f"workload mix (equal jobs per model and layer spec), batch {b}: "
        f"forward {floor_fwd:.1f} images/s, forward + grids {floor_all:.1f} images/s"
    )
    classic = floors.get(("classic", ":8")) or Floor()
    if classic.classic:
        print(
            f"classic recipe (classic CNN, ':8'): {classic.classic:.2f} images/s; "
            f"analyze b=1 / classic = {classic.analyze[1] / classic.classic:.1f}x, "
            f"b={b} / classic = {classic.analyze[b] / classic.classic:.1f}x"
        )
    if not loads:
        return
    print()
    print(
        f"service: Redis + {'moto S3' if args.storage == 's3' else 'local folder'} + actviz worker"
        f" --preload --per-device {args.per_device}; {args.jobs} jobs per model per row "
        f"({len(args.models) * args.jobs} jobs), submit -> result ready"
        + (
            "; each job's files deleted once it is done (--keep-results keeps them)"
            if args.delete_results
            else ""
        )
    )
    print(
        f"{'batch':>5}{'conc':>6}{'jobs/s':>9}{'p50 ms':>9}{'p95 ms':>9}{'p95/p50':>9}"
        f"{'img/fwd':>9}{'vs floor':>10}{'vs fwd':>8}{'failed':>8}"
    )
    for (batch, conc), load in sorted(loads.items()):
        p50, p95 = load.percentile(50), load.percentile(95)
        print(
            f"{batch:>5}{conc:>6}{load.rate:>9.1f}{p50:>9.0f}{p95:>9.0f}{p95 / p50:>9.2f}"
            f"{load.images_per_forward:>9.1f}{load.rate / floor_all:>9.0%}"
            f"{load.rate / floor_fwd:>8.0%}{load.failed:>8}"
        )
    for (batch, conc), load in sorted(loads.items()):
        shares = ", ".join(f"{size} {share:.0%}" for size, share in load.pass_sizes.items())
        print(f"passes by size in images at batch {batch}, concurrency {conc}: {shares}")
    print()
    print(
        "where a job's time goes in the worker (mean ms per job; forward is its batch's pass; "
        "render_wall: from the pass's end to the image's last layer, waits included):"
    )
    names = (
        "batch_wait", "preprocess", "forward", "render", "stats", "render_wall", "report", "upload"
    )  # fmt: skip
    print(f"{'batch':>5}{'conc':>6}" + "".join(f"{n:>12}" for n in names))
    for (batch, conc), load in sorted(loads.items()):
        cells = "".join(f"{load.stages.get(n, 0.0):>12.1f}" for n in names)
        print(f"{batch:>5}{conc:>6}" + cells)
    print()
    engine_cpu = statistics.mean(f.cpu_ms[b] for f in floors.values())
    print(
        f"engine CPU per image in-process (analyze, batch {b}, workload mix): {engine_cpu:.1f} ms"
    )
    if drift:
        cpu = [statistics.mean(pair[i].cpu_ms[b] for pair in drift) for i in (0, 1)]
        rate = [weighted_rate([pair[i].analyze[b] for pair in drift]) for i in (0, 1)]
        print(
            f"  the mean of the in-process references before and after the service rows: "
            f"{cpu[0]:.1f} / {cpu[1]:.1f} ms, {rate[0]:.1f} / {rate[1]:.1f} images/s "
            f"(the machine drifted {abs(cpu[1] / cpu[0] - 1):.0%} between them)"
        )
    print(f"CPU per job by process (ms; the machine has {os.cpu_count() or 1} cores):")
    owners = ("worker", "helpers", "s3 server", "redis", "producers")
    print(f"{'batch':>5}{'conc':>6}" + "".join(f"{n:>11}" for n in owners) + f"{'total':>9}")
    for (batch, conc), load in sorted(loads.items()):
        cells = "".join(f"{load.cpu_ms.get(n, 0.0):>11.1f}" for n in owners)
        print(
            f"{batch:>5}{conc:>6}" + cells + f"{sum(load.cpu_ms.get(n, 0.0) for n in owners):>9.1f}"
        )
    print()
    print(
        "worker CPU per job by stage (ms): the jobs' own cpu_ms (threads doing each stage), "
        "`native`: the worker's threads that Python did not start, measured "
        "(actviz_native_thread_cpu_seconds: the backend's own pools, where a CPU runs the "
        "forward pass and no job's clock sees it), report helpers' processes, and the rest "
        "of the worker processes (Celery's consumer, results, Redis calls, logs, metrics: "
        "queue + bookkeeping)"
    )
    stages = ("fetch", "preprocess", "engine", "encode", "report", "upload")
    heads = (*stages, "native", "helpers", "queue+bk", "total", "/ engine")
    print(f"{'batch':>5}{'conc':>6}" + "".join(f"{n:>11}" for n in heads))
    for (batch, conc), load in sorted(loads.items()):
        staged = sum(load.cpu_stages.get(n, 0.0) for n in stages)
        native = load.cpu_ms.get("native", 0.0)
        rest = load.cpu_ms.get("worker", 0.0) - staged - native
        total = load.cpu_ms.get("worker", 0.0) + load.cpu_ms.get("helpers", 0.0)
        cells = [load.cpu_stages.get(n, 0.0) for n in stages]
        cells += [native, load.cpu_ms.get("helpers", 0.0), rest, total]
        print(
            f"{batch:>5}{conc:>6}"
            + "".join(f"{c:>11.1f}" for c in cells)
            + f"{total / engine_cpu:>10.2f}x"
        )
    print(
        "(/ engine: the worker's CPU per job over the engine's in-process CPU per image; "
        "target <= 1.5x on 2 CPU cores)"
    )
    print_thread_cpu(loads)
    print()
    print(
        "Redis commands per job (INFO commandstats, every client: producers, their result "
        "watcher's MGET every 5 ms, the worker, its heartbeat and restore sweeps):"
    )
    for (batch, conc), load in sorted(loads.items()):
        calls = sorted(load.redis_calls.items(), key=lambda kv: -kv[1])
        top_calls = ", ".join(f"{name} {n:.2f}" for name, n in calls if n >= 0.05)
        print(f"{batch:>5}{conc:>6}  {sum(load.redis_calls.values()):6.1f} in all; {top_calls}")
    print()
    top = max(args.concurrency)
    low = min(args.concurrency)
    best = loads.get((b, top))
    one = loads.get((1, top))
    if best:
        print(
            f"service at concurrency {top}, batch {b}: {best.rate:.1f} jobs/s, "
            f"{best.rate / floor_all:.0%} of the in-process forward + grids rate "
            f"(target >= 85% with the local folder on 2 CPU cores), "
            f"{best.rate / floor_fwd:.0%} of the forward-only rate"
        )
    if best and one and b != 1:
        print(f"batching: batch {b} / batch 1 at concurrency {top} = {best.rate / one.rate:.2f}x")
    for batch in args.batch_sizes:
        load = loads.get((batch, low))
        if load:
            spread, group = load.worst_group_spread()
            print(
                f"latency at concurrency {low}, batch {batch}: p95 / p50 = "
                f"{load.percentile(95) / load.percentile(50):.2f} over the mixed workload, "
                f"at most {spread:.2f} within one model and spec ({group}) (target <= 1.5)"
            )
    ready = ", ".join(
        f"batch {k.rsplit('b', 1)[1]} {v:.1f} s" for k, v in cold.items() if k.startswith("ready")
    )
    print(f"cold start: worker start -> /readyz with its models preloaded: {ready}")
    if "first_job_uncached_ms" in cold and (b, low) in loads:
        print(
            f"cold start: first job of a model not yet loaded {cold['first_job_uncached_ms']:.0f} ms "
            f"(warm p50 at concurrency {low}: {loads[(b, low)].percentile(50):.0f} ms)"
        )
    print()
    print_anchors(classic.classic or 0.0, floor_fwd, floor_all, b, loads, cold, args.storage)
    summary = {f"{k[0]}x{k[1]}": round(v.rate, 2) for k, v in loads.items()}
    print("json: " + json.dumps({"jobs_per_s": summary, "floor": round(floor_all, 2), **cold}))


def print_anchors(
    classic: float,
    forward: float,
    floor: float,
    batch: int,
    loads: dict[tuple[int, int], Load],
    cold: dict[str, float],
    storage: str,
) -> None:
    """Every anchor of the run in one table, each rate against the forward + grids floor."""
    print("all anchors in one table (rates per second; vs floor = rate / forward + grids):")
    print(f"{'what':<52}{'rate':>9}{'vs floor':>10}{'p50 ms':>9}{'p95 ms':>9}")
    rows: list[tuple[str, float, float | None, float | None]] = [
        ("classic recipe, in process (classic CNN, :8)", classic, None, None),
        (f"forward pass alone, in process, batch {batch}", forward, None, None),
        (f"forward + grids (analyze), in process, batch {batch}", floor, None, None),
    ]
    where = "S3 server" if storage == "s3" else "local folder"
    for (size, conc), load in sorted(loads.items()):
        name = f"service ({where}), batch {size}, concurrency {conc}"
        rows.append((name, load.rate, load.percentile(50), load.percentile(95)))
    for name, rate, p50, p95 in rows:
        latency = f"{p50:>9.0f}{p95:>9.0f}" if p50 is not None else ""
        print(f"{name:<52}{rate:>9.2f}{rate / floor:>10.0%}{latency}")
    for key, value in cold.items():
        if key.startswith("ready_s_b"):
            name = f"cold start: --preload to /readyz, batch {key.rsplit('b', 1)[1]}"
            print(f"{name:<52}{value:>8.1f}s")
    if "first_job_uncached_ms" in cold:
        name = "cold start: first job of an unloaded model"
        print(f"{name:<52}{cold['first_job_uncached_ms']:>7.0f}ms")


if __name__ == "__main__":
    main()
