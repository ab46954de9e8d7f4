"""The worker's `actviz` commands: `actviz worker` and `actviz demo`.

Plugged into the producer's CLI through the `actviz.commands` entry points
(pyproject.toml), the way Celery's extensions add `celery` subcommands: the
light install never imports this package, and each function here only adds
its subparser; the heavy modules load when the command runs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from producer.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE, err, wait_for_result
from producer.client import Client
from producer.contract import QUEUES
from producer.settings import Settings


def add_worker_command(sub: Any) -> None:
    p = sub.add_parser("worker", help="run a worker (needs a redis:// broker)")
    p.add_argument("--queues", help="comma-separated: gpu,cpu")
    p.add_argument("--preload", action="append", help="model to load and warm first; repeatable")
    p.add_argument("--concurrency", type=int, help="devices (GPUs) to run workers on")
    p.add_argument(
        "--per-device",
        type=int,
        help="worker processes sharing each device (default: 3/4 of the cores per GPU; 1 without a GPU)",
    )
    p.add_argument("--name", help="Celery node name, e.g. gpu0@%%h")
    p.set_defaults(func=cmd_worker)


def add_demo_command(sub: Any) -> None:
    p = sub.add_parser("demo", help="run the builtin demo model on a photo, in-process")
    p.add_argument("--timeout", type=float, default=300)
    p.set_defaults(func=cmd_demo)


def cmd_worker(args: argparse.Namespace) -> int:
    settings = Settings.from_env(
        broker_url=args.broker,
        storage_url=args.storage,
        model_registry=args.registry,
        queues=tuple(q for q in args.queues.split(",") if q) if args.queues else None,
        preload=tuple(args.preload) if args.preload else None,
        concurrency=args.concurrency,
        processes_per_device=args.per_device,
    )
    unknown = [q for q in settings.queues if q not in QUEUES]
    if unknown:
        err(f"actviz worker: unknown queues {', '.join(unknown)}; use {', '.join(QUEUES)}")
        return EXIT_USAGE
    from worker.main import run_worker

    return run_worker(settings, node_name=args.name)


def cmd_demo(args: argparse.Namespace) -> int:
    from worker.demo import image_path

    settings = Settings.from_env(broker_url="memory://", storage_url=args.storage)
    client = Client(settings=settings)
    err(f"actviz demo: {client.describe()}; model builtin:demo")
    job = client.submit("builtin:demo", Path(image_path()))
    result, error = wait_for_result(job, args.timeout, sys.stderr.isatty())
    if result is None:
        err(f"actviz demo: the job failed: {error}")
        return EXIT_FAILED
    print(f"job {job.id} succeeded: {len(result.layers)} layers")
    for name in result.layers:
        print(f"  {name}: {result.url(name)}")
    print(f"report: {result.url()}")
    return EXIT_OK
