"""Census benchmark: a census of N images against the same N images as plain jobs.

Its own redis-server, results in a local folder, one `actviz worker` (batch
size --batch) with the classic CNN of bench_engine preloaded, default layers
(every spatial layer). The same N photo-like JPEGs go through:

  batch    client.submit_many: N activations jobs and their gallery
  census   client.census: N census jobs (peaks and receptive fields too), then
           the fold of every manifest into census.json and census.html

Prints images/s of each (submit to the last job's result), the census's rate
against the plain jobs', and the fold's seconds (last job's result to
census.html). Never asserts.

    python bench/bench_census.py [--images 1000] [--batch 8]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import bench_service  # noqa: E402

from producer import Client, Settings  # noqa: E402
from producer.contract import census_key  # noqa: E402


def run(client: Client, submit, count: int) -> tuple[list, float]:  # noqa: ANN001
    started = time.perf_counter()
    jobs = submit()
    for job in jobs:
        job.wait(timeout=3600)
    elapsed = time.perf_counter() - started
    assert len(jobs) == count
    return jobs, elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    images = bench_service.photos(args.images)
    with tempfile.TemporaryDirectory(prefix="actviz-census-") as tmp:
        folder = Path(tmp)
        model = bench_service.save_models(folder)["classic"]
        results = folder / "results"
        with bench_service.services(folder, s3=False) as env:
            env.pop("pids", None)
            env = {
                **os.environ,
                **env,
                "ACTVIZ_STORAGE_URL": results.as_uri(),
                "ACTVIZ_MODEL_ALLOW": folder.as_uri() + "/",
                "ACTVIZ_BATCH_SIZE": str(args.batch),
            }
            uri = model.as_uri()
            worker = bench_service.Worker(env, [uri], folder / "worker.log")
            try:
                client = Client(settings=Settings.from_env(environ=env))
                _, batch_s = run(client, lambda: client.submit_many(uri, images), args.images)
                jobs, census_s = run(client, lambda: client.census(uri, images), args.images)
                batch_id = jobs[0].batch_id or ""
                done = time.perf_counter()
                bench_service.wait_until(lambda: client.census_url(batch_id), 600, "census")
                fold_s = time.perf_counter() - done
            finally:
                worker.stop()
            census = json.loads((results / census_key(batch_id)).read_bytes())
            size = (results / census_key(batch_id)).stat().st_size

    cores = len(os.sched_getaffinity(0))
    print(f"actviz census benchmark  {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(
        f"machine: {cores} cores, {platform.processor() or platform.machine()}; batch {args.batch}"
    )
    print(
        f"model: classic CNN 150x150x3, default layers ({len(census['layers'])} layers); "
        f"{args.images} JPEGs 320x240"
    )
    print()
    print(f"{'run':<34}{'seconds':>10}{'images/s':>10}")
    print(f"{'batch (plain activations jobs)':<34}{batch_s:>10.1f}{args.images / batch_s:>10.1f}")
    print(f"{'census jobs':<34}{census_s:>10.1f}{args.images / census_s:>10.1f}")
    print(f"{'census fold (after the last job)':<34}{fold_s:>10.1f}")
    total = census_s + fold_s
    print(f"{'census, jobs + fold':<34}{total:>10.1f}{args.images / total:>10.1f}")
    print()
    print(f"census rate / plain jobs' rate = {batch_s / total:.2f}")
    print(
        f"census.json: {size / 1024:.0f} KB, {census['images']} images, {census['failed']} failed"
    )


if __name__ == "__main__":
    main()
