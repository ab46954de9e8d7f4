"""Scale benchmark: what a job costs around it as batches grow from 100 to 10,000 jobs.

One redis-server on a free port, a local-folder store, one `actviz worker`
subprocess; this process is the producer. For each batch size N (`--sizes`),
a batch of N distinct small PNGs through `builtin:demo` (layers `--layers`),
submitted with `Client.submit_many` and waited on with the code `actviz batch
--wait` runs (producer/cli.py `_wait_all`). Per job it prints:

  redis/job      Redis commands this process sent (submit + wait), counted in
                 redis-py (kombu's publishing included), pipelines by command
  store/job      storage requests this process made (submit + wait)
  refresh s      interval between the wait's progress reads over its last 20
                 (0.2 s of it is the loop's sleep)
  worker ms      worker CPU (the worker and its helpers) per job
  redis B/job    Redis memory (INFO used_memory) added per job, results kept
  bytes/job      bytes stored per job (its folder, and its share of the gallery)
  x artifacts    bytes/job over what the job's grids and manifest take alone
                 (and over grids + input + manifest, the job's own artifacts)
  gallery        the batch gallery written again in this process: ms per job,
                 and its tracemalloc peak MB

and the ratio of the largest N to the smallest for each figure (flat = 1.0).
Then 16 concurrent 24 MP JPEGs through the same worker: its peak RSS (all its
processes, sampled every 20 ms) above its idle RSS.

    python bench/bench_scale.py [--sizes 100,1000,10000] [--layers :2]

Never asserts; prints one table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import sys
import tempfile
import threading
import time
import tracemalloc
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import redis as redis_lib  # noqa: E402
from bench_service import Worker, cpu_tree, process_tree, services, wait_until  # noqa: E402
from PIL import Image  # noqa: E402
from redis.client import Pipeline  # noqa: E402

from producer import cli  # noqa: E402
from producer.client import Client  # noqa: E402
from producer.settings import Settings  # noqa: E402

STORE_METHODS = ("get", "get_at_most", "head", "exists", "put", "list", "download")


class Counter:
    """Redis commands and storage requests this process makes, while `on`."""

    def __init__(self) -> None:
        self.redis = 0
        self.store = 0
        self.on = False
        self.progress_at: list[float] = []

    def install(self, client: Client) -> None:
        counter = self
        single, pipelined = redis_lib.Redis.execute_command, Pipeline.execute

        def command(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            counter.redis += counter.on
            return single(self, *args, **kwargs)

        def execute(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
            counter.redis += counter.on * len(self.command_stack)
            return pipelined(self, *args, **kwargs)

        redis_lib.Redis.execute_command = command
        Pipeline.execute = execute
        for name in STORE_METHODS:
            method = getattr(client.store, name)

            def counted(*args, _method=method, **kwargs):  # noqa: ANN002, ANN003, ANN202
                counter.store += counter.on
                return _method(*args, **kwargs)

            setattr(client.store, name, counted)
        progress = client.batch_progress

        def timed(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
            counter.progress_at.append(time.monotonic())
            return progress(*args, **kwargs)

        client.batch_progress = timed

    def take(self) -> tuple[int, int]:
        out = (self.redis, self.store)
        self.redis = self.store = 0
        return out


def small_pngs(count: int, first: int) -> list[bytes]:
    """`count` distinct 64x64 PNGs (a gradient with a moving square)."""
    base = np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None].repeat(64, 0).repeat(3, 2)
    out = []
    for i in range(first, first + count):
        pixels = base.copy()
        y, x = (i * 7) % 48, (i * 13) % 48
        pixels[y : y + 16, x : x + 16] = (i % 251, (i // 251) % 251, 128)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def big_jpeg(seed: int, size: tuple[int, int] = (6000, 4000)) -> bytes:
    """A 24 MP JPEG of smooth content (a camera photo's size, not its noise)."""
    width, height = size
    small = np.random.default_rng(seed).integers(0, 256, (height // 200, width // 200, 3))
    image = Image.fromarray(small.astype(np.uint8)).resize(size, Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def folder_bytes(root: Path) -> tuple[int, int, int]:
    """(all bytes, grids + manifest bytes, input.png bytes) under a folder."""
    total = grids = inputs = 0
    for path in root.rglob("*"):
        if not path.is_file():
            continue
        size = path.stat().st_size
        total += size
        if path.name == "manifest.json" or path.parent.name == "layers":
            grids += size
        elif path.name == "input.png":
            inputs += size
    return total, grids, inputs


def rss_bytes(root: int) -> int:
    """Resident bytes of `root` and its descendants (/proc)."""
    total, page = 0, os.sysconf("SC_PAGE_SIZE")
    for pid in process_tree(root):
        with contextlib.suppress(OSError, IndexError, ValueError):  # a process just ended
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * page
    return total


def run_batch(
    client: Client,
    counter: Counter,
    worker: Worker,
    store_root: Path,
    n: int,
    first: int,
    layers: str,
    redis: redis_lib.Redis,
) -> dict:
    images = small_pngs(n, first)
    memory_before = int(redis.info("memory")["used_memory"])
    cpu_before = sum(cpu_tree(worker.proc.pid).values())
    counter.progress_at.clear()
    counter.take()
    counter.on = True
    started = time.monotonic()
    jobs = client.submit_many("builtin:demo", images, layers)
    submit_s = time.monotonic() - started
    submit_redis, submit_store = counter.take()
    args = argparse.Namespace(timeout=None, json=True)
    outcomes = cli._wait_all(jobs, [str(i) for i in range(n)], args)
    wait_s = time.monotonic() - started - submit_s
    wait_redis, wait_store = counter.take()
    counter.on = False
    failed = sum(o["status"] != "succeeded" for o in outcomes)
    batch_id = jobs[0].batch_id or ""
    wait_until(lambda: client.batch_url(batch_id) is not None, 600, "the batch gallery")
    cpu_s = sum(cpu_tree(worker.proc.pid).values()) - cpu_before
    memory = int(redis.info("memory")["used_memory"]) - memory_before
    stamps = counter.progress_at[-21:]
    intervals = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    total = grids = inputs = 0
    for job in jobs:
        t, g, i = folder_bytes(store_root / "jobs" / job.id)
        total, grids, inputs = total + t, grids + g, inputs + i
    gallery_bytes = folder_bytes(store_root / "batches" / batch_id)[0]

    from worker.jobs.batches import write_gallery

    tracemalloc.start()
    gallery_started = time.monotonic()
    write_gallery(batch_id, [job.id for job in jobs], client.store)
    gallery_s = time.monotonic() - gallery_started
    gallery_peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "n": n,
        "failed": failed,
        "jobs/s": n / (submit_s + wait_s),
        "redis/job": (submit_redis + wait_redis) / n,
        "redis submit": submit_redis / n,
        "redis wait": wait_redis / n,
        "store/job": (submit_store + wait_store) / n,
        "store wait": wait_store / n,
        "refresh s": statistics.median(intervals) if intervals else float("nan"),
        "worker ms": cpu_s * 1000 / n,
        "redis B/job": memory / n,
        "bytes/job": (total + gallery_bytes) / n,
        "x grids+manifest": (total + gallery_bytes) / grids,
        "x artifacts": (total + gallery_bytes) / (grids + inputs),
        "gallery ms/job": gallery_s * 1000 / n,
        "gallery MB": gallery_peak / 2**20,
    }


def peak_rss(client: Client, worker: Worker, count: int = 16) -> tuple[float, float, float]:
    """(idle MB, peak MB above idle, seconds) for `count` concurrent 24 MP JPEG jobs."""
    images = [big_jpeg(seed) for seed in range(count)]
    uris = [client.upload_image(image) for image in images]
    time.sleep(2)
    idle = rss_bytes(worker.proc.pid)
    peak, stop = [idle], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_bytes(worker.proc.pid))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    jobs = [client.submit("builtin:demo", uri, ":2") for uri in uris]
    for job in jobs:
        job.wait(timeout=600)
    seconds = time.monotonic() - started
    stop.set()
    sampler.join()
    return idle / 2**20, (peak[0] - idle) / 2**20, seconds


COLUMNS = (
    "redis/job",
    "redis submit",
    "redis wait",
    "store/job",
    "store wait",
    "refresh s",
    "worker ms",
    "redis B/job",
    "bytes/job",
    "x grids+manifest",
    "x artifacts",
    "gallery ms/job",
    "gallery MB",
    "jobs/s",
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    parser.add_argument("--layers", default=":2", help="layer spec of every job")
    parser.add_argument("--big", type=int, default=16, help="concurrent 24 MP JPEG jobs (0: none)")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        store_root = folder / "store"
        with services(folder, s3=False) as env:
            env = {k: v for k, v in env.items() if k != "pids"} | {
                "ACTVIZ_STORAGE_URL": store_root.as_uri(),
                "PATH": os.environ["PATH"],
            }
            worker = Worker(env, ["builtin:demo"], folder / "worker.log")
            settings = Settings(
                broker_url=env["ACTVIZ_BROKER_URL"], storage_url=env["ACTVIZ_STORAGE_URL"]
            )
            client = Client(settings=settings)
            counter = Counter()
            counter.install(client)
            redis = redis_lib.Redis.from_url(env["ACTVIZ_BROKER_URL"])
            rows, first = [], 0
            try:
                for n in sizes:
                    rows.append(
                        run_batch(client, counter, worker, store_root, n, first, args.layers, redis)
                    )
                    first += n
                    print(
                        f"  batch of {n}: {rows[-1]['failed']} failed, {rows[-1]['jobs/s']:.1f} jobs/s",
                        file=sys.stderr,
                    )
                big = peak_rss(client, worker, args.big) if args.big else None
            finally:
                worker.stop()
    print(
        f"actviz scale benchmark · builtin:demo, layers {args.layers} · one worker, Redis, local folder"
    )
    print(f"{'N':>8} " + " ".join(f"{c:>16}" for c in COLUMNS))
    for row in rows:
        print(f"{row['n']:>8} " + " ".join(f"{row[c]:>16.3f}" for c in COLUMNS))
    if len(rows) > 1:
        ratio = {c: rows[-1][c] / rows[0][c] if rows[0][c] else float("nan") for c in COLUMNS}
        label = f"{rows[-1]['n']}/{rows[0]['n']}"
        print(f"{label:>8} " + " ".join(f"{ratio[c]:>16.2f}" for c in COLUMNS))
    if big:
        idle, above, seconds = big
        print(
            f"{args.big} concurrent 24 MP JPEGs: worker idle RSS {idle:.0f} MB, peak {above:.0f} MB above idle, {seconds:.1f} s"
        )


if __name__ == "__main__":
    main()
