"""A broker that survives losing its primary: Redis Sentinel, a failover mid-stream.

A Redis primary, one replica and three Sentinels on this machine; a worker and a
producer given only the Sentinels (`sentinel://...;sentinel://...`). Jobs stream
in; the primary is SIGKILLed; the Sentinels promote the replica. Every job the
producer submitted, before, during and after the failover, ends succeeded exactly
once, and the gap (kill to the next job finished) is recorded.
"""

from __future__ import annotations

import subprocess
import threading
import time
from pathlib import Path

import harness
import pytest

from producer import Client, Settings

# Intermittent (1 run in 8, after the fixes it found): run by `make test-reliability`.
pytestmark = [pytest.mark.timeout(420), pytest.mark.failover]
MASTER = "actviz-primary"


class Node:
    """One redis-server (a data node or a Sentinel) on its own port and folder."""

    def __init__(self, folder: Path, *args: str, sentinel: str | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.port = harness.free_port()
        self.folder = folder
        log = (folder / "redis.log").open("ab")
        if sentinel is not None:
            conf = folder / "sentinel.conf"
            conf.write_text(
                f"port {self.port}\nbind 127.0.0.1\ndir {folder}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {sentinel} 2\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\n"
                f"sentinel failover-timeout {MASTER} 10000\n"
            )
            command = ["redis-server", str(conf), "--sentinel"]
        else:
            command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1"]
            command += ["--dir", str(folder), "--appendonly", "yes", "--save", "", *args]
        self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
        harness.wait_for(self.ping, 20, f"redis-server on {self.port}")

    def client(self):  # noqa: ANN201
        import redis

        return redis.Redis(port=self.port, socket_timeout=2)

    def ping(self) -> bool:
        try:
            return bool(self.client().ping())
        except Exception:  # noqa: BLE001
            return False

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def stuck_report(
    submitted: list[str], before: int, seen: list[str], producer: threading.Thread, worker
) -> str:
    """What the test saw when no job sent after the kill finished: how many were sent, where
    the producer thread is, and the worker's last lines."""
    import sys
    import traceback

    frame = sys._current_frames().get(producer.ident or -1)
    stack = "".join(traceback.format_stack(frame)[-12:]) if frame else "(the producer has ended)"
    tail = "\n".join(worker.log_text().splitlines()[-25:])
    return (
        f"no job sent after the kill finished: {len(submitted) - before} sent after it; "
        f"last errors: {seen[-3:]}\nproducer thread:\n{stack}\nworker log:\n{tail}"
    )


def test_jobs_streamed_through_a_sentinel_failover_each_end_once(
    bucket: str, models: dict[str, str], tmp_path: Path
) -> None:
    primary = Node(tmp_path / "primary")
    replica = Node(tmp_path / "replica", "--replicaof", "127.0.0.1", str(primary.port))
    sentinels = [Node(tmp_path / f"sentinel{i}", sentinel=str(primary.port)) for i in range(3)]
    nodes = [primary, replica, *sentinels]
    try:

        def replica_known() -> bool:
            found = sentinels[0].client().execute_command("SENTINEL", "REPLICAS", MASTER)
            return bool(found) and all(
                len(s.client().execute_command("SENTINEL", "SENTINELS", MASTER)) == 2
                for s in sentinels
            )

        harness.wait_for(replica_known, 60, "the Sentinels to see the replica and each other")
        url = ";".join(f"sentinel://127.0.0.1:{s.port}/0" for s in sentinels)
        env = harness.worker_env(
            url,
            f"s3://{bucket}/results",
            [f"s3://{bucket}/models/"],
            ACTVIZ_SENTINEL_MASTER=MASTER,
            ACTVIZ_MODEL_CACHE_DIR=str(tmp_path / "cache"),
            ACTVIZ_REDELIVER_AFTER="10",
            ACTVIZ_RECONCILE_AFTER="10",
        )
        worker = harness.start_worker(env, tmp_path / "worker.log")
        client = Client(settings=Settings.from_env(environ=env))
        submitted: list[str] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def produce() -> None:
            seed = 0
            try:
                while not stop.is_set() and seed < 60:
                    job = client.submit(models["tiny"], harness.random_png(9000 + seed, 16, 16))
                    submitted.append(job.id)
                    seed += 1
                    time.sleep(0.2)
            except BaseException as exc:  # noqa: BLE001 (reported by the test)
                errors.append(exc)

        producer = threading.Thread(target=produce)
        producer.start()
        try:
            harness.wait_for(lambda: len(submitted) >= 15, 60, "15 jobs submitted")
            client.job(submitted[5]).wait(timeout=60)
            before = len(submitted)
            killed_at = time.monotonic()
            primary.kill()

            def one_after_the_kill_done() -> bool:
                assert not errors, f"the producer failed: {errors[0]!r}"
                try:
                    return any(
                        client.job(job_id).state(check_storage=False).state == "succeeded"
                        for job_id in submitted[before:]
                    )
                except Exception as exc:  # noqa: BLE001 (the failover is under way)
                    seen.append(repr(exc)[:300])
                    return False

            seen: list[str] = []
            try:
                harness.wait_for(one_after_the_kill_done, 180, "a job sent after the kill", 0.2)
            except TimeoutError:
                pytest.fail(stuck_report(submitted, before, seen, producer, worker))
            gap = time.monotonic() - killed_at
            producer.join(timeout=240)
            assert not producer.is_alive(), "the producer is stuck"
            for job_id in submitted:
                try:
                    client.job(job_id).wait(timeout=120)
                except TimeoutError:
                    seen_by_worker = [
                        ln[:160] for ln in worker.log_text().splitlines() if job_id in ln
                    ]
                    entry = client.redis().hgetall(f"actviz:job:{job_id}")
                    pytest.fail(
                        f"{job_id} never ended; worker: {seen_by_worker}; registry: {entry}"
                    )
            promoted = (
                sentinels[0].client().execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER)
            )
            states = [client.job(job_id).state().state for job_id in submitted]
            log = worker.log_text()
        finally:
            stop.set()
            worker.stop()
    finally:
        for node in nodes:
            node.kill()
    assert int(promoted[1]) == replica.port  # the replica is the primary now
    assert len(submitted) == 60 and len(set(submitted)) == 60
    assert states == ["succeeded"] * 60
    done = {job_id: log.count(f"[{job_id}] job done") for job_id in submitted}
    assert all(count <= 1 for count in done.values()), {k: v for k, v in done.items() if v > 1}
    harness.record(
        "Sentinel failover",
        "jobs streamed through the primary's SIGKILL",
        "60, each succeeded once",
    )
    harness.record(
        "Sentinel failover", "primary killed to a job sent after it finished (s)", round(gap, 1)
    )
