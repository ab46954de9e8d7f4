"""What one job costs in Redis: every command, by side, and the round trips they take.

Starts its own redis-server, one `actviz worker` (results in a local folder) and a
producer in this process; warms the worker with a few jobs, then records Redis's
MONITOR stream during one more job (submit to result) and prints it, each command
marked with its side (producer or worker, by the process that holds the
connection; "periodic" for the worker's timed sweeps) and the round trip it
belongs to. A MULTI ... EXEC block, or commands of one connection less than
`--gap-us` apart (a pipeline sent at once; a script's own commands bridge the
gap), count as one round trip. The worker's pop of the job precedes the trace;
the pop it sends next is in it. `--progress-after-ms 0` has the job report every
stage (a fast job reports none at the default 250), as one that runs long does.
Never asserts.

    python bench/redis_trace.py [--layers :8] [--gap-us 60] [--full] [--progress-after-ms 0]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_service  # noqa: E402

from producer import Client, Settings  # noqa: E402

LINE = re.compile(r'^(\d+\.\d+) \[\d+ ([^\]]+)\] "(\w+)"(.*)$')
# A worker's timed work, not the job's: kombu's restore sweep (every second) and its
# refresh of the remote-control bindings.
PERIODIC = re.compile(r'"unacked_mutex"|"_kombu\.binding|^ "unacked_index" "[\d.]+" "0" "BYSCORE"')


def socket_ports(pid: int, redis_port: int) -> set[int]:
    """Local TCP ports of `pid`'s connections to 127.0.0.1:`redis_port` (Linux /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local, remote, inode = fields[1], fields[2], fields[9]
            if inode in inodes and int(remote.rsplit(":", 1)[1], 16) == redis_port:
                ports.add(int(local.rsplit(":", 1)[1], 16))
    return ports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default=":8", help="the job's layer spec")
    parser.add_argument("--gap-us", type=float, default=60.0, help="a pipeline's largest gap")
    parser.add_argument("--full", action="store_true", help="print whole command lines")
    parser.add_argument(
        "--progress-after-ms",
        type=int,
        help="the worker's ACTVIZ_PROGRESS_AFTER_MS (0: every stage reported)",
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="actviz-trace-") as tmp:
        folder = Path(tmp)
        paths = {k: v for k, v in bench_service.save_models(folder).items() if k == "classic"}
        with bench_service.services(folder, s3=False) as env:
            env.pop("pids")
            models_uri, storage_url = bench_service.stage_models("file", paths, folder)
            model = models_uri + paths["classic"].name
            worker_env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("ACTVIZ_")},
                **env,
                "ACTVIZ_STORAGE_URL": storage_url,
                "ACTVIZ_MODEL_ALLOW": models_uri,
                "ACTVIZ_LOG_LEVEL": "WARNING",
                "ACTVIZ_MODEL_CACHE_DIR": str(folder / "cache"),
            }
            if args.progress_after_ms is not None:
                worker_env["ACTVIZ_PROGRESS_AFTER_MS"] = str(args.progress_after_ms)
            worker = bench_service.Worker(worker_env, [model], folder / "worker.log")
            try:
                settings = Settings(broker_url=env["ACTVIZ_BROKER_URL"], storage_url=storage_url)
                client = Client(settings=settings)
                images = bench_service.photos(5)
                for image in images[:4]:  # the model, its programs and every connection warm
                    client.submit(model, image, layers=args.layers).wait(timeout=120)
                port = int(env["ACTVIZ_BROKER_URL"].rsplit(":", 1)[1].split("/")[0])
                trace = folder / "monitor.txt"
                with trace.open("w") as out:
                    monitor = subprocess.Popen(
                        ["redis-cli", "-p", str(port), "monitor"], stdout=out
                    )
                    time.sleep(0.5)
                    started = time.time()
                    job = client.submit(model, images[4], layers=args.layers)
                    job.wait(timeout=120)
                    ended = time.time()
                    sides = {p: "producer" for p in socket_ports(os.getpid(), port)}
                    for pid in bench_service.process_tree(worker.proc.pid):
                        sides.update({p: "worker" for p in socket_ports(pid, port)})
                    time.sleep(0.2)
                    monitor.terminate()
                    monitor.wait(10)
            finally:
                worker.stop()
            report(trace.read_text(), sides, started, ended, args)


def report(text: str, sides: dict[int, str], started: float, ended: float, args) -> None:  # noqa: ANN001
    trips: Counter[str] = Counter()
    commands: Counter[str] = Counter()
    last: dict[str, float] = {}
    in_multi: set[str] = set()
    caller = ""  # the connection whose script the server's "lua" lines run
    print(f"one job ({args.layers}), {ended - started:.3f} s from submit to result:")
    for raw in text.splitlines():
        match = LINE.match(raw)
        if match is None:
            continue
        stamp, client, name, rest = float(match[1]), match[2], match[3].upper(), match[4]
        if client == "lua":  # a script's commands: its caller's pipeline goes on after them
            last[caller] = stamp
            continue
        if not started <= stamp <= ended:
            continue
        caller = client
        side = sides.get(int(client.rsplit(":", 1)[1]), "other")
        if side == "worker" and (name == "SCRIPT" or PERIODIC.search(rest)):
            side = "periodic"
        new_trip = client not in in_multi and (
            name == "MULTI" or stamp - last.get(client, 0.0) > args.gap_us / 1e6
        )
        if name == "MULTI":
            in_multi.add(client)
        elif name == "EXEC":
            in_multi.discard(client)
        last[client] = stamp
        trips[side] += new_trip
        commands[side] += name not in ("MULTI", "EXEC")
        shown = rest if args.full else rest[:90]
        print(f"  {'*' if new_trip else ' '} {side:<10}{name:<12}{shown}")
    print("(* starts a round trip)")
    for side in sorted(commands):
        print(f"{side}: {commands[side]} commands in {trips[side]} round trips")


if __name__ == "__main__":
    main()
