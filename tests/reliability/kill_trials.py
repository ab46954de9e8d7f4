"""Kill trials: SIGKILL workers at random moments under a stream of jobs; nothing is lost.

    python tests/reliability/kill_trials.py --kills 1000      # `make test-reliability`
    python tests/reliability/kill_trials.py --kills 5 --workers 2

A private redis-server, a local-folder store, the reliability suite's tiny
model, and `--workers` real `actviz worker` processes with default settings
(ACTVIZ_REDELIVER_AFTER and ACTVIZ_RECONCILE_AFTER at 60 s) and JSON logs. A
producer keeps about `--queue` jobs outstanding, cycling over 8 images whose
reference results are computed first by a worker nobody kills. Every
`--gap` seconds (uniform between its two bounds) a random worker is SIGKILLed
and a new one started. Each worker widens kombu's pop-then-record window by
ACTVIZ_TEST_POP_DELAY_S (`--pop-delay`, 0.05 s), so some kills land inside it:
the job it had popped is then in no queue and held by no worker, and only the
job registry's reconciler brings it back.

After the last kill the stream stops and every job is waited for. The trial
prints, and `run_trials` returns:

  lost          jobs that never succeeded
  duplicated    jobs run to completion more than once ("job done" twice)
  different     jobs whose grids differ from the reference run of their image, or
                whose manifest does (ids and timings aside; statistics beyond
                float32 rounding, see `same_outputs`)
  recovered     jobs delivered more than once (held by a killed worker), and of
                those, sent again by the reconciler (lost in the window)
  kill -> again p50/p95 seconds from a kill to the next delivery of each job
                the killed worker held or had popped

Nothing here is timed against a threshold but the p95 (the promise is 60 s).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

import harness  # noqa: E402

IMAGES = 8


@dataclass
class Trial:
    kills: int = 0
    in_window: int = 0  # kills after which the reconciler sent a job again
    jobs: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    different: list[str] = field(default_factory=list)
    recovered: int = 0
    resent: int = 0
    # Why the lost jobs did not succeed: their state (and error code) at the end.
    lost_as: dict[str, int] = field(default_factory=dict)
    back_s: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def percentile(self, q: float) -> float:
        if not self.back_s:
            return float("nan")
        ordered = sorted(self.back_s)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def lines(self) -> list[str]:
        return [
            f"kills {self.kills} · jobs {self.jobs} · {self.seconds / 60:.1f} min",
            f"lost {len(self.lost)} {self.lost_as or ''} · duplicated {len(self.duplicated)} · "
            f"different from an independent run {len(self.different)}",
            f"recovered {self.recovered} (delivered again), of which {self.resent} sent again "
            "by the reconciler (lost between pop and record)",
            f"kill -> delivered again: p50 {self.percentile(0.5):.1f} s, "
            f"p95 {self.percentile(0.95):.1f} s, max {max(self.back_s, default=float('nan')):.1f} s "
            f"over {len(self.back_s)} jobs",
        ]


def _ts(text: str) -> float:
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def read_events(logs: list[Path]) -> dict[str, list]:
    """Per job id: [(time, log, 'received' | 'done')] from the workers' JSON logs."""
    events: dict[str, list] = {}
    for log in logs:
        for line in log.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            message = entry.get("message", "")
            if message.startswith("Task actviz.extract[") and message.endswith("received"):
                job_id = message.split("[", 1)[1].split("]", 1)[0]
                events.setdefault(job_id, []).append((_ts(entry["ts"]), log, "received"))
            elif message.startswith("job done") and entry.get("job_id"):
                events.setdefault(entry["job_id"], []).append((_ts(entry["ts"]), log, "done"))
    for items in events.values():
        items.sort(key=lambda item: item[0])
    return events


def comparable(manifest: dict) -> dict:
    drop = ("job_id", "timings_ms", "cpu_ms", "worker", "batch", "image")
    return {k: v for k, v in manifest.items() if k not in drop}


def outputs(store: Path, job_id: str) -> tuple[dict, dict[str, bytes]]:
    folder = store / "jobs" / job_id
    manifest = json.loads((folder / "manifest.json").read_text())
    grids = {p.name: p.read_bytes() for p in sorted((folder / "layers").glob("*.png"))}
    return comparable(manifest), grids


def same_outputs(got: tuple[dict, dict[str, bytes]], want: tuple[dict, dict[str, bytes]]) -> bool:
    """Grids byte for byte, manifests equal with statistics to float32 rounding.

    On a CPU, oneDNN's convolutions are not bitwise repeatable under load: the
    last image of an unpadded pass of 4 has come out with a few statistics a
    float32 ulp or two away from the same image's elsewhere (its grids equal).
    """
    return got[1] == want[1] and _close(got[0], want[0])


def _close(a: object, b: object) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    return a == b


def run_trials(
    folder: Path,
    kills: int,
    workers: int = 2,
    queue: int = 12,
    gap: tuple[float, float] = (3.0, 9.0),
    pop_delay: float = 0.05,
    seed: int = 0,
    say=print,  # noqa: ANN001
    wait_ready: bool = True,
) -> Trial:
    from producer import Client, Settings
    from producer.contract import job_key

    rng = random.Random(seed)
    started = time.monotonic()
    model = harness.build_models(folder)["tiny"]
    store = folder / "store"
    (folder / "redis").mkdir(exist_ok=True)
    redis_server = harness.RedisServer(folder / "redis")
    redis_server.start()
    env = harness.worker_env(
        redis_server.url,
        store.as_uri(),
        [model.parent.as_uri() + "/"],
        ACTVIZ_MODEL_CACHE_DIR=str(folder / "cache"),
        ACTVIZ_LOG_JSON="1",
    )
    client = Client(settings=Settings.from_env(environ=env))
    images = [harness.random_png(seed * 100 + i, 16, 16) for i in range(IMAGES)]
    uri = model.as_uri()
    logs: list[Path] = []
    live: list = []

    def start(n: int, delay: float, wait: bool = True) -> None:
        log = folder / f"worker-{n:04d}.log"
        logs.append(log)
        worker_env = {**env, "ACTVIZ_TEST_POP_DELAY_S": str(delay)}
        live.append(harness.start_worker(worker_env, log, wait=wait))

    trial = Trial()
    kill_log: list[tuple[float, Path]] = []
    try:
        start(0, 0.0)  # the reference runs, by a worker nobody kills
        reference = {}
        for index, image in enumerate(images):
            job = client.submit(uri, image)
            job.wait(timeout=120)
            reference[index] = outputs(store, job.id)
        live.pop().stop()
        for n in range(1, workers + 1):
            start(n, pop_delay)
        submitted: list[tuple[str, int]] = []
        stop = threading.Event()

        def produce() -> None:
            index = 0
            while not stop.is_set():
                waiting = client.redis().llen("gpu")
                if waiting < queue:
                    job = client.submit(uri, images[index % IMAGES])
                    submitted.append((job.id, index % IMAGES))
                    index += 1
                else:
                    time.sleep(0.05)

        producer = threading.Thread(target=produce, daemon=True)
        producer.start()
        for number in range(1, kills + 1):
            time.sleep(rng.uniform(*gap))
            victim = live.pop(rng.randrange(len(live)))
            kill_log.append((time.time(), victim.log))
            victim.kill()
            start(workers + number, pop_delay, wait=wait_ready)
            if number % 10 == 0 or number == kills:
                say(f"  {number} kills, {len(submitted)} jobs submitted")
        stop.set()
        producer.join()
        trial.kills = kills
        trial.jobs = len(submitted)
        deadline = time.monotonic() + 300
        for job_id, _ in submitted:
            try:
                client.job(job_id).wait(timeout=max(1.0, deadline - time.monotonic()))
            except Exception as exc:  # noqa: BLE001 (counted as lost below)
                trial.lost.append(job_id)
                why = getattr(exc, "code", None) or type(exc).__name__
                trial.lost_as[str(why)] = trial.lost_as.get(str(why), 0) + 1
        redis = client.redis()
        resent = {job_id for job_id, _ in submitted if redis.hget(job_key(job_id), "resent")}
    finally:
        for worker in live:
            worker.stop()
        redis_server.stop()
    events = read_events(logs)
    for job_id, image in submitted:
        seen = events.get(job_id, [])
        if sum(kind == "done" for _, _, kind in seen) > 1:
            trial.duplicated.append(job_id)
        if sum(kind == "received" for _, _, kind in seen) > 1 or job_id in resent:
            trial.recovered += 1
        if job_id not in trial.lost and not same_outputs(outputs(store, job_id), reference[image]):
            trial.different.append(job_id)
    trial.resent = len(resent)
    windows = set()
    for killed_at, log in kill_log:
        for job_id, seen in events.items():
            before = [e for e in seen if e[0] <= killed_at]
            after = [e for e in seen if e[0] > killed_at and e[2] == "received"]
            held = bool(before) and before[-1][1] == log and before[-1][2] == "received"
            # popped, never recorded nor logged: the reconciler's; its kill is the last one
            # before its next delivery
            popped = (
                job_id in resent
                and after
                and not before
                and (killed_at, log)
                == max((k for k in kill_log if k[0] <= after[0][0]), default=None)
            )
            if (held or popped) and after:
                trial.back_s.append(after[0][0] - killed_at)
                if popped:
                    windows.add(killed_at)
    trial.in_window = len(windows)
    trial.seconds = time.monotonic() - started
    return trial


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--kills", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--queue", type=int, default=12)
    parser.add_argument("--gap", default="3,9", help="seconds between kills: MIN,MAX")
    parser.add_argument("--pop-delay", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--no-wait",
        action="store_true",
        help="start each replacement worker without waiting for it to be ready: kills then "
        "come every --gap seconds (some while a worker starts), not every gap + start-up",
    )
    args = parser.parse_args()
    low, high = (float(x) for x in args.gap.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        trial = run_trials(
            Path(tmp),
            args.kills,
            args.workers,
            args.queue,
            (low, high),
            args.pop_delay,
            args.seed,
            wait_ready=not args.no_wait,
        )
    print("\n".join(trial.lines()))
    ok = not (trial.lost or trial.duplicated or trial.different) and trial.percentile(0.95) <= 60
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
