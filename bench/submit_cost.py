"""What a submit costs the producer: CPU ms per `Client.submit`, no worker running.

Starts its own redis-server; submits `--rounds` x `--jobs` jobs, each with an image
of its own (320x240 JPEG, uploaded to a local folder as a user's would be), and
prints the producer's CPU per submit (this thread's clock: Python, the image's
digest and copy, the registry's transaction, Celery's message and the LPUSH),
the median and spread of the rounds. Never asserts.

    python bench/submit_cost.py [--jobs 200] [--rounds 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_service  # noqa: E402

from producer import Client, Settings  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=200, help="submits per round")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    images = bench_service.photos(args.jobs * args.rounds + 1, first=1000)
    with tempfile.TemporaryDirectory(prefix="actviz-submit-") as tmp:
        folder = Path(tmp)
        with bench_service.services(folder, s3=False) as env:
            settings = Settings(
                broker_url=env["ACTVIZ_BROKER_URL"], storage_url=(folder / "results").as_uri()
            )
            client = Client(settings=settings)
            model = "file:///models/classic_cnn.keras"  # not read: no worker runs
            client.submit(model, images[0], layers=":8")  # connections and app built
            rounds, cursor = [], iter(images[1:])
            for _ in range(args.rounds):
                started = time.thread_time()
                for _ in range(args.jobs):
                    client.submit(model, next(cursor), layers=":8")
                rounds.append((time.thread_time() - started) * 1000.0 / args.jobs)
    print(
        f"producer CPU per submit (ms), {args.rounds} rounds of {args.jobs}: "
        f"median {statistics.median(rounds):.3f}, "
        f"rounds {' '.join(f'{r:.3f}' for r in sorted(rounds))}"
    )


if __name__ == "__main__":
    main()
