"""Celery's own command line against a real worker, through `producer.celery_app`.

`celery -A producer.celery_app ...` as an operator runs it: `inspect ping` and
`inspect active` answer while the worker runs a long job, `purge -Q gpu` empties
every priority list of the queue, and `events --dump` shows the job's events once
`control enable_events` asked for them (workers send none unless asked).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis as redis_py
import yaml
from stack import noise_png, start_worker, subprocess_env, wait_for

from producer import Client, Settings
from producer.job_registry import forget

REDIS_DB = 11
CELERY = Path(sys.executable).parent / "celery"
ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def env(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    import keras

    folder = tmp_path_factory.mktemp("celery-tools")
    keras.utils.set_random_seed(3)
    layers = keras.layers
    heavy = keras.Sequential(
        [keras.Input((None, None, 3))]
        + [layers.Conv2D(48, 3, padding="same", activation="relu") for _ in range(6)],
        name="heavy",
    )
    heavy.save(folder / "heavy.keras")
    return subprocess_env(
        ACTVIZ_BROKER_URL=redis_url,
        ACTVIZ_STORAGE_URL=(folder / "results").as_uri(),
        ACTVIZ_MODEL_ALLOW=folder.as_uri() + "/",
        MODEL=(folder / "heavy.keras").as_uri(),
    )


def celery(env: dict[str, str], *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(CELERY), "-A", "producer.celery_app", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_inspect_answers_while_a_long_job_runs_and_events_show_it(
    env: dict[str, str], tmp_path: Path
) -> None:
    client = Client(settings=Settings.from_env(environ=env))
    worker = start_worker(env, tmp_path / "worker.log", "--name", "tools")
    events = subprocess.Popen(
        [str(CELERY), "-A", "producer.celery_app", "events", "--dump"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        # Workers send task events only when asked, as Flower asks (one of the few remote
        # control commands they answer); asked before the job, its events reach the dump.
        wait_for(
            lambda: (
                "task events enabled" in celery(env, "control", "enable_events", "--json").stdout
            ),
            90,
            "the worker to turn on its task events",
        )
        # Seconds each on 2 cores: 6 wide convolutions at 768 x 768, a PNG per channel.
        # Their activations (680 MB each) fill a forward pass alone, so the three run one
        # after the other: one is still running while the two commands start and answer.
        jobs = [
            client.submit(env["MODEL"], noise_png(4 + i, 768, 768), layers=None, channel_pngs=True)
            for i in range(3)
        ]
        job = jobs[0]
        wait_for(lambda: job.status() == "started", 90, "the job to start")
        # Addressed to the one worker, each command returns at its reply rather than after
        # the second it otherwise waits for other workers' replies.
        active = celery(env, "inspect", "active", "-d", "celery@tools", "--json")
        answered = datetime.now(UTC)
        ping = celery(env, "inspect", "ping", "-d", "celery@tools", "--json")
        for each in jobs:
            each.wait(timeout=180)
        ended = {j.id: client.app.AsyncResult(j.id).date_done for j in jobs}
        time.sleep(2)  # the events of the job's end reach the dump
    finally:
        events.terminate()
        dumped, _ = events.communicate(timeout=30)
        worker.stop()
    assert ping.returncode == 0, ping.stderr
    replies = json.loads(ping.stdout)
    assert replies == {"celery@tools": {"ok": "pong"}}, replies
    assert active.returncode == 0, active.stderr
    held = [task["id"] for tasks in json.loads(active.stdout).values() for task in tasks]
    # Listed as running, and ended after the reply was in: the worker answered in the
    # middle of a job, not between two.
    unfinished = {id_ for id_, end in ended.items() if end > answered}
    assert unfinished & set(held), (answered, ended, held)
    assert f"actviz.extract[{job.id}]" in dumped or job.id in dumped
    assert "task succeeded" in dumped.lower() or "task-succeeded" in dumped.lower()


def test_purge_empties_every_priority_list_of_the_queue(
    env: dict[str, str], redis_url: str
) -> None:
    client = Client(settings=Settings.from_env(environ=env))
    image = noise_png(5)
    jobs = [  # five jobs on five of Redis's per-priority lists
        client.submit(env["MODEL"], image, priority=priority) for priority in (0, 2, 5, 7, 9)
    ]
    conn = redis_py.Redis.from_url(redis_url)
    lists = [key for key in conn.keys("gpu*") if conn.type(key) == b"list"]
    assert sum(conn.llen(key) for key in lists) == 5 and len(lists) >= 5
    done = celery(env, "purge", "-Q", "gpu", "-f")
    assert done.returncode == 0, done.stderr
    assert "5 messages" in done.stdout, done.stdout
    assert sum(conn.llen(key) for key in lists) == 0
    # Purge empties the queues, not the job registry: a later worker's reconciler would
    # send these again after ACTVIZ_RECONCILE_AFTER (docs/reliability.md). Drop them, as
    # `actviz cancel` would have, so the next test's worker starts with nothing to hold.
    for job in jobs:
        forget(conn, job.id)


def test_the_jobs_a_worker_holds_are_exported_for_autoscaling(
    env: dict[str, str], tmp_path: Path
) -> None:
    """`actviz_jobs_held` counts what the queue lists no longer show: taken, unacknowledged
    jobs (the KEDA ScaledObject adds it to the lists); back to 0 once they are done."""
    import re
    import urllib.request

    from stack import free_port

    port = free_port()
    env = {**env, "ACTVIZ_METRICS_PORT": str(port), "ACTVIZ_REDELIVER_AFTER": "4"}  # 2/3 s beats
    client = Client(settings=Settings.from_env(environ=env))

    def held() -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        return float(re.search(r"^actviz_jobs_held (\S+)$", text, re.M).group(1))

    jobs = [
        client.submit(env["MODEL"], noise_png(6 + i, 512, 512), layers=None, channel_pngs=True)
        for i in range(3)
    ]
    worker = start_worker(env, tmp_path / "worker.log")
    try:
        most = wait_for(lambda: held() >= 2 and held(), 90, "held jobs in the metrics", 0.2)
        for job in jobs:
            job.wait(timeout=180)
        wait_for(lambda: held() == 0, 30, "the gauge back to 0", 0.2)
    finally:
        worker.stop()
    assert 2 <= most <= 3


def test_flower_counts_every_queued_job_of_every_priority(
    env: dict[str, str], redis_url: str
) -> None:
    """Flower started as the compose file starts it (`celery -A producer.celery_app flower`,
    basic auth) reads the ten priority steps from the app: its queue view counts all seven
    jobs. With Celery's defaults (steps 0, 3, 6, 9: a bare `celery flower`) it counted one."""
    import base64
    import urllib.request

    from stack import free_port

    conn = redis_py.Redis.from_url(redis_url)
    for key in conn.keys("gpu*"):
        conn.delete(key)
    client = Client(settings=Settings.from_env(environ=env))
    image = noise_png(7)
    jobs = [  # none on Celery's default steps but 0
        client.submit(env["MODEL"], image, priority=priority) for priority in (0, 1, 2, 4, 5, 7, 8)
    ]
    port = free_port()
    # The compose file's command, on a free port of this host.
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["flower"]
    argv = [a.replace("--port=5555", f"--port={port}") for a in compose["entrypoint"]]
    assert argv[0] == "celery"
    flower = subprocess.Popen(
        [str(CELERY), *argv[1:], "--address=127.0.0.1"],
        env={**env, "FLOWER_BASIC_AUTH": "admin:flower-test"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    request = urllib.request.Request(f"http://127.0.0.1:{port}/api/queues/length")
    token = base64.b64encode(b"admin:flower-test").decode()
    request.add_header("Authorization", f"Basic {token}")

    def lengths() -> dict[str, int] | None:
        try:
            with urllib.request.urlopen(request, timeout=5) as resp:
                body = json.loads(resp.read())
        except OSError:  # not listening yet
            return None
        return {q["name"]: q["messages"] for q in body["active_queues"]}

    try:
        counted = wait_for(lengths, 60, "Flower's queue view", interval=0.5)
    finally:
        flower.terminate()
        flower.wait(30)
        for key in conn.keys("gpu*"):
            conn.delete(key)
        for job in jobs:
            forget(conn, job.id)
    assert counted["gpu"] == 7, counted
