"""The `actviz` command: a thin layer over `Client`; the worker adds `worker` and `demo`.

Results go to stdout (one JSON object with --json); everything else (which
broker and storage, progress) goes to stderr, and progress only on a terminal.
Exit status: 0 success, 1 the job failed, 2 bad input or configuration,
124 timed out waiting.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from producer.client import Client, Job, Result
from producer.contract import (
    CAM_METHODS,
    CAM_REGIONS,
    FINAL_STATES,
    JOB_KINDS,
    MANIFEST_FILE,
    MATCHES,
    NORMALIZATIONS,
    QUEUES,
    REPORT_FILE,
    SCALES,
    STARTED,
    SUCCEEDED,
    census_key,
)
from producer.errors import ActvizError, JobFailed, JobNotFound
from producer.settings import Settings, redact_url
from producer.signed import report_link
from producer.storage import is_s3_uri, source_for

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_TIMEOUT = 0, 1, 2, 124
SUMMARY_WAIT_S = 120.0  # how long a census or diff waits for its summary after its jobs
COMMANDS_GROUP = "actviz.commands"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def err(message: str) -> None:
    """A line on stderr: everything but results goes there."""
    print(message, file=sys.stderr, flush=True)


def _client(args: argparse.Namespace, **overrides: Any) -> Client:
    settings = Settings.from_env(
        broker_url=args.broker, storage_url=args.storage, model_registry=args.registry, **overrides
    )
    client = Client(settings=settings)
    err(f"actviz: {client.describe()}")
    return client


def _show_progress(args: argparse.Namespace) -> bool:
    """Progress goes to stderr, and only to a terminal; stdout (with --json too) stays clean."""
    return sys.stderr.isatty()


def _job_options(args: argparse.Namespace) -> dict[str, Any]:
    options = {
        "layers": args.layers,
        "normalize": args.normalize,
        "scale": args.scale,
        "colormap": args.colormap,
        "top_k": args.top_k,
        "kind": args.kind,
        "mean": args.mean,
        "std": args.std,
    }
    if args.overlay:
        options["overlay"] = True
    if args.gradcam:
        options["gradcam"] = True
    options.update(
        match=getattr(args, "match", None),
        threshold=getattr(args, "threshold", None),
        classes=args.classes,
        top=args.top,
        layer=args.layer,
        method=args.method,
        region=args.region,
        labels=args.labels,
        predictions=args.predictions,
    )
    return {k: v for k, v in options.items() if v is not None}


def _outcome(job: Job, result: Result | None, error: ActvizError | None) -> dict[str, Any]:
    out: dict[str, Any] = {"job_id": job.id}
    if result is not None:
        out["status"] = SUCCEEDED
        out["manifest"] = result.store.uri(result.prefix + MANIFEST_FILE)
        out["report"] = result.url()
    else:
        out["status"] = "failed"
        out["error"] = {"code": error.code, "message": error.message} if error else None
    return out


def wait_for_result(
    job: Job, timeout: float | None, progress: bool
) -> tuple[Result | None, ActvizError]:
    """(Result, None) or (None, error); TimeoutError propagates."""
    try:
        if not progress:
            return job.wait(timeout=timeout), None
        from rich.console import Console

        console = Console(stderr=True)
        deadline = None if timeout is None else time.monotonic() + timeout
        with console.status(f"job {job.id}: queued") as status:
            while True:
                state = job.state()
                if state.state in FINAL_STATES:
                    break
                status.update(f"job {job.id}: {state.stage or state.state}")
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"job {job.id} still {state.state} after {timeout} s")
                time.sleep(0.2)
        return job.wait(timeout=5), None
    except JobFailed as exc:
        return None, exc


def _print_outcome(args: argparse.Namespace, outcome: dict[str, Any]) -> None:
    if args.json:
        print(json.dumps(outcome), flush=True)
    elif outcome["status"] == SUCCEEDED:
        print(f"job {outcome['job_id']} succeeded")
        print(f"  manifest: {outcome['manifest']}")
        print(f"  report:   {outcome['report']}")
    else:
        error = outcome.get("error") or {}
        print(f"job {outcome['job_id']} failed: {error.get('code')}: {error.get('message')}")


# ---- commands ---------------------------------------------------------------


def cmd_submit(args: argparse.Namespace) -> int:
    client = _client(args)
    job = client.submit(
        args.model, args.image, queue=args.queue, priority=args.priority, **_job_options(args)
    )
    wait = args.wait or client.settings.embedded
    if not args.wait and client.settings.embedded:
        err("actviz: embedded mode runs the job in this process; waiting for it")
    if not wait:
        print(json.dumps({"job_id": job.id, "status": "queued"}) if args.json else job.id)
        return EXIT_OK
    try:
        result, error = wait_for_result(job, args.timeout, _show_progress(args))
    except TimeoutError as exc:
        err(f"actviz: {exc}")
        if args.json:
            print(json.dumps({"job_id": job.id, "status": job.status(), "error": None}))
        return EXIT_TIMEOUT
    _print_outcome(args, _outcome(job, result, error))
    return EXIT_OK if result is not None else EXIT_FAILED


def collect_images(paths: list[str]) -> list[str]:
    """Files as given, folders and s3:// prefixes (ending in '/') expanded to their
    image files (sorted), and a .txt file read as a list of images, one per line."""
    images: list[str] = []
    for raw in paths:
        path = Path(raw)
        if is_s3_uri(raw) and raw.endswith("/"):
            store, prefix = source_for(raw)
            images += sorted(
                store.uri(key)
                for key in store.list(prefix)
                if Path(key).suffix.lower() in IMAGE_SUFFIXES
            )
            continue
        if path.suffix.lower() == ".txt" and path.is_file():
            lines = path.read_text(encoding="utf-8").splitlines()
            images += [line.strip() for line in lines if line.strip() and not line.startswith("#")]
            continue
        if is_s3_uri(raw) or not path.is_dir():
            images.append(raw)
            continue
        images += sorted(
            str(p) for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()
        )
    return images


def cmd_census(args: argparse.Namespace) -> int:
    """A census: one job per image, folded by the workers into census.json and census.html."""
    client = _client(args)
    images = collect_images(args.images)
    if not images:
        err("actviz: no images found")
        return EXIT_USAGE
    options = _job_options(args)
    options.pop("top_k", None)
    jobs = client.census(
        args.model,
        images,
        top_k=args.top_k if args.top_k is not None else 9,
        batch_id=args.resume,
        queue=args.queue,
        priority=args.priority,
        **options,
    )
    batch_id = jobs[0].batch_id or ""
    err(f"actviz: census {batch_id}: {len(jobs)} images")
    if not (args.wait or client.settings.embedded):
        print(json.dumps({"batch_id": batch_id, "images": len(jobs)}) if args.json else batch_id)
        return EXIT_OK
    outcomes, failed, page = _wait_for_summary(jobs, images, args, client.census_url)
    census = client.store.uri(census_key(batch_id)) if page else None
    summary = {
        "batch_id": batch_id,
        "images": len(jobs),
        "failed": failed,
        "census": census,
        "page": page,
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"census {batch_id}: {len(jobs) - failed} images folded, {failed} failed")
        print(f"census.json: {census or 'not written yet'}")
        if page:
            print(f"page: {page}")
    return EXIT_OK if failed == 0 and page else EXIT_FAILED


def cmd_diff(args: argparse.Namespace) -> int:
    """Two models, layer by layer, on each image; a summary over them all."""
    client = _client(args)
    images = collect_images(args.images)
    if not images:
        err("actviz: no images found")
        return EXIT_USAGE
    options = _job_options(args)
    options.pop("kind", None)
    jobs = client.diff(
        args.model,
        args.against,
        images,
        queue=args.queue,
        priority=args.priority,
        **options,
    )
    batch_id = jobs[0].batch_id or ""
    if not (args.wait or client.settings.embedded):
        for job in jobs:
            print(json.dumps({"job_id": job.id, "status": "queued"}) if args.json else job.id)
        return EXIT_OK
    outcomes, failed, page = _wait_for_summary(jobs, images, args, client.diff_url)
    summary: dict[str, Any] = {"batch_id": batch_id, "images": len(jobs), "failed": failed}
    if page:
        data = json.loads(client.store.get(census_key(batch_id, "diff.json")))
        summary.update(first_divergent=data["first_divergent"], page=page)
        summary["layers"] = [
            {k: layer[k] for k in ("name", "relative_l2", "mean_correlation")}
            for layer in data["layers"]
        ]
    if args.json:
        print(json.dumps(summary))
    else:
        _print_table(outcomes)
        print(f"first divergent layer: {summary.get('first_divergent') or 'none'}")
        if page:
            print(f"diff: {page}")
    return EXIT_OK if failed == 0 and page else EXIT_FAILED


def _wait_for_summary(
    jobs: list[Job], images: list[str], args: argparse.Namespace, url: Any
) -> tuple[list[dict], int, str | None]:
    """Wait for a batch's jobs, then for the summary its last job's worker writes:
    (outcomes, failed jobs, `url(batch_id)` once it gives a link, or None)."""
    outcomes = _wait_all(jobs, images, args)
    failed = sum(o["status"] != SUCCEEDED for o in outcomes)
    if any(o["status"] == "timeout" for o in outcomes):
        return outcomes, failed, None
    deadline = time.monotonic() + SUMMARY_WAIT_S
    while True:
        found = url(jobs[0].batch_id or "")
        if found or time.monotonic() > deadline:
            return outcomes, failed, found
        time.sleep(0.5)


def cmd_batch(args: argparse.Namespace) -> int:
    client = _client(args)
    images = collect_images(args.images)
    if not images:
        err("actviz: no images found")
        return EXIT_USAGE
    jobs = client.submit_many(
        args.model, images, queue=args.queue, priority=args.priority, **_job_options(args)
    )
    if not (args.wait or client.settings.embedded):
        for job in jobs:
            print(json.dumps({"job_id": job.id, "status": "queued"}) if args.json else job.id)
        return EXIT_OK
    outcomes = _wait_all(jobs, images, args)
    for outcome in outcomes:
        outcome["batch_id"] = jobs[0].batch_id
    timed_out = any(o["status"] == "timeout" for o in outcomes)
    gallery = None if timed_out else _gallery_when_written(client, jobs[0].batch_id or "")
    if args.json:
        for outcome in outcomes:
            print(json.dumps(outcome))
    else:
        _print_table(outcomes)
        if gallery:
            print(f"gallery: {gallery}")
    return EXIT_OK if all(o["status"] == SUCCEEDED for o in outcomes) else EXIT_FAILED


GALLERY_WAIT_S = 30.0  # the last job's worker writes the gallery just after that job


def _gallery_when_written(client: Client, batch_id: str) -> str | None:
    """The gallery's link once it exists: a worker writes it after the batch's last job."""
    deadline = time.monotonic() + GALLERY_WAIT_S
    while True:
        link = client.batch_url(batch_id)
        if link or time.monotonic() >= deadline:
            return link
        time.sleep(0.2)


# Without a recorded end (a job revoked, or refused before it ran) a job is found by a
# sweep that asks every pending job, once the batch has made no progress for this long;
# a sweep that finds nothing doubles the wait, up to SWEEP_MAX_S. A batch that advances
# is never swept: a refresh costs O(1).
SWEEP_EVERY_S = 10.0
SWEEP_MAX_S = 300.0


def _quick_outcome(job: Job) -> dict[str, Any] | None:
    """A finished job's row from its result-backend entry alone (one Redis read, no
    storage): the worker's result names the manifest and the job's files, so the
    report's link is signed without reading anything. None: ask the slow way."""
    state = job.state(check_storage=False)
    info = state.info or {}
    if state.state != SUCCEEDED or not isinstance(info.get("files"), list):
        return None
    link = report_link(job.client.store, job.id, info["files"])
    return {"job_id": job.id, "status": SUCCEEDED, "manifest": info.get("manifest"), "report": link}


def _wait_all(jobs: list[Job], images: list[str], args: argparse.Namespace) -> list[dict]:
    """Wait for every job of a batch, showing done/failed/running/queued on stderr.

    With Redis a refresh reads the batch's progress (producer/batches.py): a few
    requests, plus one result-backend read per job that finished since the last
    refresh (its row needs no storage read, see `_quick_outcome`); pending jobs are
    asked one by one only when the batch stalls (SWEEP_EVERY_S). Without Redis
    (embedded) each refresh asks every pending job.
    """
    from rich.console import Console
    from rich.progress import Progress

    deadline = None if args.timeout is None else time.monotonic() + args.timeout
    pending = dict(zip([j.id for j in jobs], jobs, strict=True))
    done: dict[str, dict[str, Any]] = {}
    batch_id = jobs[0].batch_id if jobs else None
    cursor, swept, advanced, sweep_after = 0, time.monotonic(), time.monotonic(), SWEEP_EVERY_S
    progress_console = Console(stderr=True)

    def finish(job: Job) -> None:
        outcome = _quick_outcome(job) if batch_id else None
        if outcome is None:
            result, error = wait_for_result(job, 5, False)
            outcome = _outcome(job, result, error)
        done[job.id] = outcome
        del pending[job.id]
        progress.advance(bar)

    with Progress(console=progress_console, disable=not _show_progress(args)) as progress:
        bar = progress.add_task("jobs", total=len(jobs))
        while pending:
            look = jobs[0].client.batch_progress(batch_id, cursor) if batch_id else None
            running = 0
            if look is not None:
                cursor = look.cursor
                if look.finished_ids:
                    advanced = time.monotonic()
                for job_id in look.finished_ids:
                    if job_id in pending:
                        finish(pending[job_id])
                running = look.running
            quiet = time.monotonic() - max(swept, advanced)
            if look is None or (pending and quiet >= sweep_after):
                swept = time.monotonic()
                counted, found = 0, 0
                for job in list(pending.values()):
                    state = job.state(check_storage=look is None).state
                    if state in FINAL_STATES:
                        finish(job)
                        found += 1
                    elif state == STARTED:
                        counted += 1
                running = running if look is not None else counted
                sweep_after = SWEEP_EVERY_S if found else min(2 * sweep_after, SWEEP_MAX_S)
            failed = sum(1 for o in done.values() if o["status"] != SUCCEEDED)
            running = min(running, len(pending))
            progress.update(
                bar,
                description=f"done {len(done) - failed} · failed {failed} · "
                f"running {running} · queued {len(pending) - running}",
            )
            if deadline is not None and time.monotonic() > deadline:
                for job_id in pending:
                    done[job_id] = {"job_id": job_id, "status": "timeout", "error": None}
                break
            if pending:
                time.sleep(0.2)
    out = []
    for job, image in zip(jobs, images, strict=True):
        done[job.id]["image"] = image
        out.append(done[job.id])
    return out


def _print_table(outcomes: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="actviz batch")
    for column in ("image", "job", "status", "detail"):
        table.add_column(column, overflow="fold")
    for o in outcomes:
        error = o.get("error") or {}
        detail = o.get("report") or f"{error.get('code', '')}: {error.get('message', '')}"
        table.add_row(o["image"], o["job_id"], o["status"], detail)
    # On a terminal the table fits its width; piped or redirected, rows are not wrapped
    # (rich would fold them at 80 columns and split paths).
    Console(width=None if sys.stdout.isatty() else 10_000).print(table)


def cmd_status(args: argparse.Namespace) -> int:
    client = _client(args)
    state = client.job(args.job_id).state()
    if args.json:
        print(json.dumps(state.to_dict()))
    else:
        line = f"{state.job_id} {state.state}"
        if state.stage:
            line += f" ({state.stage})"
        if state.error:
            line += f": {state.error['code']}: {state.error['message']}"
        print(line)
    # An id nobody submitted (a typo, or its results expired) is not a job in progress.
    return EXIT_FAILED if state.state in ("failed", "unknown") else EXIT_OK


def cmd_cancel(args: argparse.Namespace) -> int:
    """Mark jobs cancelled; a job that has already ended is reported as it ended."""
    if not args.job_ids and not args.batch:
        err("actviz cancel: name job ids or --batch ID")
        return EXIT_USAGE
    client = _client(args)
    states = [client.job(job_id).cancel() for job_id in args.job_ids]
    if args.batch:
        states += client.cancel_batch(args.batch)
    for state in states:
        if state.state in FINAL_STATES:
            outcome = f"already {state.state}"
        else:
            outcome = "unknown job id" if state.state == "unknown" else "cancelled"
        if args.json:
            print(json.dumps({"job_id": state.job_id, "cancel": outcome}))
        else:
            print(f"{state.job_id} {outcome}")
    return EXIT_OK


def cmd_gc(args: argparse.Namespace) -> int:
    """Delete (or, with --dry-run, list) job and batch folders older than --older-than."""
    from producer.gc import collect, parse_duration

    older_than = parse_duration(args.older_than)  # ValueError: usage error, exit 2
    client = _client(args)
    report = collect(client.store, older_than, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    if args.json:
        print(
            json.dumps(
                {
                    "dry_run": args.dry_run,
                    "folders": report.folders,
                    "objects": report.objects,
                    "bytes": report.bytes,
                }
            )
        )
    else:
        for folder in report.folders:
            print(folder)
        print(
            f"{verb} {len(report.folders)} folders, {report.objects} objects, "
            f"{report.bytes / 2**20:.1f} MB from {redact_url(client.settings.storage_url)}"
        )
    return EXIT_OK


def cmd_fetch(args: argparse.Namespace) -> int:
    client = _client(args)
    result = client.result(args.job_id)
    out = result.download(Path(args.out))
    print(out / REPORT_FILE if (out / REPORT_FILE).exists() else out)
    return EXIT_OK


def cmd_open(args: argparse.Namespace) -> int:
    client = _client(args)
    print(client.result(args.job_id).url(expires=args.expires))
    return EXIT_OK


def cmd_config(args: argparse.Namespace) -> int:
    settings = Settings.from_env(
        broker_url=args.broker, storage_url=args.storage, model_registry=args.registry
    )
    data = settings.redacted()
    if args.json:
        print(json.dumps(data, indent=2, default=list))
    else:
        for key, value in data.items():
            if isinstance(value, tuple):
                value = ",".join(value)
            print(f"{key} = {value}")
    return EXIT_OK


# ---- parser -----------------------------------------------------------------


def _add_job_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="s3:// URI, file path, or registry name")
    p.add_argument("--kind", choices=JOB_KINDS, default=JOB_KINDS[0], help="what the job computes")
    p.add_argument(
        "--layers",
        help="layer spec: names, indices, slices, classes or re: patterns, comma-separated; "
        "e.g. ':8', 'Conv2D', 're:conv' or 'block1_conv1,block2_conv1'",
    )
    p.add_argument(
        "--normalize",
        choices=NORMALIZATIONS,
        help="how a grid maps values to colours: per channel min..max (default), one "
        "min..max for the layer, mean/std x 64 + 128, or percentile clipping",
    )
    p.add_argument(
        "--scale",
        choices=SCALES,
        help="pixel scaling before the model: auto (default: raw 0..255 where the model "
        "rescales its own input, preprocess_input's for Keras's applications, else x/255), "
        "x/255, raw 0..255, -1..1, (x/255 - mean) / std with --mean and --std, or "
        "caffe (VGG's and ResNet's: BGR, ImageNet's means subtracted)",
    )
    p.add_argument(
        "--mean", type=_floats, help="per-channel means for --scale meanstd, e.g. 0.485,0.456,0.406"
    )
    p.add_argument(
        "--std", type=_floats, help="per-channel stds for --scale meanstd, e.g. 0.229,0.224,0.225"
    )
    p.add_argument("--colormap", help="a matplotlib colormap name (default viridis)")
    p.add_argument(
        "--top-k", type=int, dest="top_k", help="channels per layer listed by mean (default 8)"
    )
    p.add_argument("--overlay", action="store_true", help="also render overlays on the input")
    cam = p.add_argument_group(
        "Grad-CAM", "with --kind gradcam, or --gradcam for an activations job with Grad-CAM"
    )
    cam.add_argument(
        "--gradcam", action="store_true", help="an activations job that also runs Grad-CAM"
    )
    cam.add_argument(
        "--class",
        dest="classes",
        type=int,
        action="append",
        metavar="N",
        help="explain class index N (repeat for several; default: the top-1 prediction)",
    )
    cam.add_argument(
        "--top", type=int, metavar="K", help="explain the K top predicted classes (1..16)"
    )
    cam.add_argument(
        "--layer",
        help="the layer Grad-CAM weighs (a name such as 'block5_conv3' or 'outer/inner', or "
        "an index; default: the last (H, W, C) layer before the head, larger than 1 x 1)",
    )
    cam.add_argument("--method", choices=CAM_METHODS, help="gradcam (default) or gradcam++")
    cam.add_argument(
        "--region",
        choices=CAM_REGIONS,
        help="a segmentation model's pixels each class is explained over: image (default, "
        "every pixel) or predicted (those the model assigns to the class)",
    )
    cam.add_argument(
        "--labels",
        metavar="FILE",
        help="class names, one per line in class order (or a JSON list); the model "
        "registry's labels otherwise",
    )
    cam.add_argument(
        "--predictions", type=int, metavar="P", help="top predictions listed (default 5)"
    )
    p.add_argument("--queue", choices=QUEUES, help="gpu (default) or cpu")
    p.add_argument("--priority", type=int, help="0..9 on Redis; lower is served first")
    p.add_argument("--wait", action="store_true", help="wait for the result")
    p.add_argument("--json", action="store_true", help="print JSON on stdout")
    p.add_argument("--timeout", type=float, help="seconds to wait at most")


def plugin_commands() -> dict[str, metadata.EntryPoint]:
    """Commands other packages add (the worker's `worker` and `demo`), by name."""
    return {entry.name: entry for entry in metadata.entry_points(group=COMMANDS_GROUP)}


def _global_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--broker", help="overrides ACTVIZ_BROKER_URL")
    parser.add_argument("--storage", help="overrides ACTVIZ_STORAGE_URL")
    parser.add_argument("--registry", help="overrides ACTVIZ_MODEL_REGISTRY")


def _command_of(argv: list[str] | None) -> str | None:
    pre = argparse.ArgumentParser(add_help=False)
    _global_options(pre)
    pre.add_argument("command", nargs="?")
    known, _ = pre.parse_known_args(argv)
    return known.command


def _floats(text: str) -> list[float]:
    """'0.485,0.456,0.406' -> [0.485, 0.456, 0.406]."""
    try:
        return [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a comma-separated list of numbers"
        ) from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("actviz")
    except PackageNotFoundError:
        return "unknown (not installed)"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser. A plugin command is imported only when it is `command`."""
    parser = argparse.ArgumentParser(prog="actviz", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"actviz {_version()}")
    _global_options(parser)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("submit", help="submit one (model, image) job")
    _add_job_options(p)
    p.add_argument("--image", required=True, help="local path or s3:// URI")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("batch", help="submit one job per image")
    _add_job_options(p)
    p.add_argument("images", nargs="+", help="image files, folders of images, s3:// URIs")
    p.set_defaults(func=cmd_batch)

    p = sub.add_parser(
        "census", help="per-channel statistics of a model's layers over a dataset of images"
    )
    _add_job_options(p)
    p.add_argument(
        "images",
        nargs="+",
        help="image files, folders, s3://bucket/prefix/ (trailing slash), or a .txt list",
    )
    p.add_argument(
        "--resume",
        metavar="BATCH_ID",
        help="submit the census of this batch id again: finished jobs and folds are kept",
    )
    p.set_defaults(func=cmd_census)

    p = sub.add_parser("diff", help="compare two models layer by layer on images")
    _add_job_options(p)
    p.add_argument("--against", required=True, help="the second model (URI, path or name)")
    p.add_argument(
        "--match",
        choices=MATCHES,
        help="pair layers by name (default) or by position in the flattened layer list",
    )
    p.add_argument(
        "--threshold",
        type=float,
        help="relative L2 distance from which a layer counts as divergent (default 0.01)",
    )
    p.add_argument("images", nargs="+", help="image files, folders, s3:// prefixes, .txt lists")
    p.set_defaults(func=cmd_diff)

    p = sub.add_parser("status", help="state of a job")
    p.add_argument("job_id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("cancel", help="cancel jobs, or every job of a batch")
    p.add_argument("job_ids", nargs="*", metavar="JOB_ID")
    p.add_argument("--batch", help="cancel every job of this batch id")
    p.add_argument("--json", action="store_true", help="one JSON object per job on stdout")
    p.set_defaults(func=cmd_cancel)

    p = sub.add_parser("gc", help="delete job and batch folders older than a duration")
    p.add_argument("--older-than", required=True, help="e.g. 7d, 12h, 30m or seconds")
    p.add_argument("--dry-run", action="store_true", help="say what would go; delete nothing")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("fetch", help="download every object of a finished job")
    p.add_argument("job_id")
    p.add_argument("--out", required=True, help="folder to write the job's files into")
    p.set_defaults(func=cmd_fetch)

    p = sub.add_parser("open", help="print a link to a job's HTML report")
    p.add_argument("job_id")
    p.add_argument("--expires", type=int, default=3600)
    p.set_defaults(func=cmd_open)

    for name, entry in plugin_commands().items():
        if name == command:
            entry.load()(sub)  # the full parser of the command that runs
        else:
            sub.add_parser(name, help=f"from the worker package; see 'actviz {name} --help'")

    p = sub.add_parser("config", help="print the effective settings (redacted)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    command = _command_of(argv)
    try:
        parser = build_parser(command)
    except ModuleNotFoundError as exc:
        err(f"actviz {command}: {exc.name} is missing; it needs pip install 'actviz[worker]'")
        return EXIT_USAGE
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except JobNotFound as exc:
        err(f"actviz: {exc}")
        return EXIT_FAILED
    except JobFailed as exc:
        err(f"actviz: job {exc.job_id} failed: {exc}")
        return EXIT_FAILED
    except ActvizError as exc:
        if getattr(args, "json", False):
            print(json.dumps({"status": "rejected", "error": exc.to_dict()}))
        err(f"actviz: {exc}")
        return EXIT_USAGE
    except ModuleNotFoundError as exc:
        err(f"actviz: {exc.name} is missing; workers need pip install 'actviz[worker]'")
        return EXIT_USAGE
    except (ValueError, OSError) as exc:
        err(f"actviz: {redact_url(str(exc))}")
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
