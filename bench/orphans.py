"""How long a SIGKILLed worker's jobs wait before another worker runs them, with default settings.

Its own redis-server, results in a local folder, the classic CNN of
bench_engine. `--jobs` heavy jobs (a 600x800 photo, every layer, a PNG per
channel) are queued; one worker starts, takes them (up to 2 x its batch size
reserved), and is SIGKILLed two seconds after its first job started; a second
worker starts at once. Prints, from the second worker's log, the seconds from
the kill to each held job being received again, and to the last job's success.
ACTVIZ_REDELIVER_AFTER is left at its default (60 s) unless --redeliver-after.

    python bench/orphans.py [--jobs 12] [--redeliver-after 60]
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import bench_engine  # noqa: E402
import bench_service  # noqa: E402

from producer import Client, Settings  # noqa: E402

RECEIVED = re.compile(
    r"^(\S+ \S+) INFO celery\.worker\.strategy .*Task actviz\.extract\[(\w+)\] received"
)


def start(env: dict, log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "producer.cli", "worker"], env=env, stdout=out, stderr=out
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=12)
    parser.add_argument("--redeliver-after", type=int, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="actviz-orphans-") as tmp:
        folder = Path(tmp)
        model = folder / "classic.keras"
        bench_engine.classic_cnn().save(model)
        with bench_service.services(folder, s3=False) as env:
            env.pop("pids", None)
            env = {
                **os.environ,
                **env,
                "ACTVIZ_STORAGE_URL": (folder / "results").as_uri(),
                "ACTVIZ_MODEL_ALLOW": folder.as_uri() + "/",
            }
            if args.redeliver_after is not None:
                env["ACTVIZ_REDELIVER_AFTER"] = str(args.redeliver_after)
            client = Client(settings=Settings.from_env(environ=env))
            images = bench_service.photos(args.jobs, width=800, height=600)
            jobs = [
                client.submit(model.as_uri(), image, layers=None, channel_pngs=True)
                for image in images
            ]
            first = start(env, folder / "first.log")
            while not any(job.state(check_storage=False).state == "started" for job in jobs):
                time.sleep(0.1)
            time.sleep(2)
            first.send_signal(signal.SIGKILL)
            first.wait()
            killed = time.time()
            finished_before = sum(job.status() == "succeeded" for job in jobs)
            second = start(env, folder / "second.log")
            try:
                for job in jobs:
                    job.wait(timeout=900)
                all_done = time.time() - killed
            finally:
                second.send_signal(signal.SIGTERM)
                second.wait(60)
            received = []
            for line in (folder / "second.log").read_text(errors="replace").splitlines():
                match = RECEIVED.match(line)
                if match:
                    stamp = datetime.datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f")
                    when = stamp.timestamp()  # the log writes local time
                    received.append(round(when - killed, 1))
    timeout = args.redeliver_after if args.redeliver_after is not None else 60
    print(f"actviz orphan recovery  {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC")
    print(
        f"{args.jobs} heavy jobs; ACTVIZ_REDELIVER_AFTER {timeout} s; worker SIGKILLed "
        f"with {args.jobs - finished_before} jobs unfinished"
    )
    print(f"seconds from the kill to each job received by the second worker: {received}")
    print(f"seconds from the kill to the last job's success: {all_done:.1f}")


if __name__ == "__main__":
    main()
