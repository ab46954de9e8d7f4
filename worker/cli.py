"""The worker's `actviz` commands: `actviz worker`, `actviz demo` and `actviz inspect`.

Plugged into the producer's CLI through the `actviz.commands` entry points
(pyproject.toml), the way Celery's extensions add `celery` subcommands: the
light install never imports this package, and each function here only adds
its subparser; the heavy modules load when the command runs.
"""

from __future__ import annotations

import argparse
import json
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


def add_inspect_command(sub: Any) -> None:
    p = sub.add_parser(
        "inspect",
        help="what the engine reads of a model: input, scale, layers, Grad-CAM's layer",
        description="Open a model as a worker does, in-process, and print its input as "
        "jobs prepare it, the scale 'auto' gives it and why, every layer with the name, "
        "class and (H, W, C) shape a --layers spec selects it by (* = shown by default), "
        "and Grad-CAM's default layer.",
    )
    p.add_argument("model", help="a local model file or folder, builtin:demo, or an s3:// URI")
    p.add_argument("--json", action="store_true", help="print it as one JSON object")
    p.add_argument(
        "--trusted",
        action="store_true",
        help="a local model may hold Lambda layers (Python code, which then runs)",
    )
    p.set_defaults(func=cmd_inspect)


def cmd_inspect(args: argparse.Namespace) -> int:
    from producer.errors import ActvizError
    from worker.runtime.native_logs import import_backend

    import_backend()
    from worker.engine import open_model
    from worker.engine.describe import describe_model
    from worker.runtime.fetch import fetch_model

    settings = Settings.from_env(storage_url=args.storage, model_registry=args.registry)
    try:
        if "://" in args.model or args.model.startswith("builtin:"):
            found = fetch_model(args.model, settings)  # the allow-list, as a worker's
            loaded = open_model(found.path, uri=args.model, trusted=found.trusted)
        else:
            loaded = open_model(args.model, trusted=args.trusted)
        described = describe_model(loaded)
    except ActvizError as exc:
        err(f"actviz inspect: {exc.code}: {exc.message}")
        return EXIT_FAILED
    if args.json:
        print(json.dumps(described))
    else:
        _print_description(described)
    return EXIT_OK


def _print_description(d: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    height, width, channels = d["input_shape"]
    side = lambda v: "any" if v is None else str(v)  # noqa: E731
    kind = {1: "gray", 3: "RGB"}[channels]
    scale, cam = d["scale_auto"], d["gradcam"]
    lines = [
        f"model   {d['uri']} ({d['class_name']} '{d['name']}', sha256 {d['sha256'][:16]})",
        f"input   {side(height)} x {side(width)} x {channels} ({kind}, {d['input_dtype']}), "
        f"{d['data_format']}",
        f"scale   auto = {scale['scale']}: {scale['formula']}; {scale['why']}",
        f"weights {d['parameters']:,} parameters, {d['weight_bytes'] / 2**20:.1f} MiB",
        "gradcam "
        + (
            f"default layer {cam['default']}, {cam['classes']} "
            f"class{'es' if cam['classes'] != 1 else ''}"
            + (" per pixel" if cam.get("target") == "pixels" else "")
            + (f" (output {cam['output']})" if "output" in cam else "")
            + f"; {len(cam['layers'])} layers it can use"
            if cam["available"]
            else f"not available: {cam['why']}"
        ),
    ]
    console = Console(width=None if sys.stdout.isatty() else 10_000, highlight=False)
    console.print("\n".join(lines), markup=False)
    table = Table(title=f"{len(d['layers'])} layers (* shown by default)", title_justify="left")
    for column in ("#", "name", "class", "output (H, W, C)", ""):
        table.add_column(column, overflow="fold")
    for layer in d["layers"]:
        shape = " x ".join(side(v) for v in layer["output_shape"]) or "-"
        mark = "*" if layer["default"] else ""
        table.add_row(str(layer["index"]), layer["name"], layer["class_name"], shape, mark)
    console.print(table)
    console.print(
        "select with --layers: indices or slices (:8), names (conv2d_1,conv2d_2), "
        "classes (Conv2D) or regexes ('re:block[12]_.*')",
        markup=False,
    )


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
