"""Activations: what each layer of a CNN sees, for one image.

The default kind. Loads the model warm, runs the engine (one shared forward
pass when batching), renders the report, and returns the grids, statistics
and manifest; with `gradcam=True` the job's Grad-CAM too (worker/jobs/gradcam.py),
in one report. A job delivered again after its worker died runs in the
quarantine process instead (worker/runtime/quarantine.py).

`run_image_job` is every one-image kind's body: the kind only changes what
`WorkerRuntime.compute` computes.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import Task

from producer.contract import JobSpec, Progress
from worker.engine.forward_pass import cpu_clock
from worker.jobs.steps import Output, fetch_image, redelivered, report_stage
from worker.metrics import STAGE_SECONDS
from worker.report import render_report
from worker.runtime import WorkerRuntime, running

log = logging.getLogger(__name__)


def run(task: Task, spec: JobSpec, runtime: WorkerRuntime) -> Output:
    """The job's Output. Raises the engine's ActvizError or a transient error."""
    return run_image_job(task, spec, runtime)


def run_image_job(task: Task, spec: JobSpec, runtime: WorkerRuntime) -> Output:
    """Fetch, compute (`runtime.compute` for the job's kind), report: the job's Output."""
    report_stage(task, Progress.LOADING_MODEL)
    fetch_cpu_ms: float | None = None
    if runtime.quarantine is not None and redelivered(task):
        # A worker died running it: run it in a process of its own, so that a job that
        # kills its process fails alone and takes no other job with it. A death of this
        # worker meanwhile is not charged to it (worker/jobs/deliveries.py).
        image = fetch_image(spec, runtime)
        report_stage(task, Progress.FORWARD)
        log.warning("a worker died running this job before; it runs in the quarantine process")
        outcome, cache_event, timings = runtime.quarantine.run(
            spec.model, image, spec.options, spec.kind
        )
    else:
        runtime.expect_image()
        measure = runtime.settings.stage_cpu
        cpu_started = cpu_clock(runtime.settings)
        try:
            loaded, cache_event, timings = runtime.load_model(spec.model)
            image = fetch_image(spec, runtime)
        except BaseException:
            runtime.drop_image()
            raise
        fetch_cpu_ms = (cpu_clock(runtime.settings) - cpu_started) * 1000.0 if measure else None
        report_stage(task, Progress.FORWARD)
        if runtime.batcher is None:  # run alone, here; a batcher marks its passes' jobs
            running.mark_running([spec.job_id])
        outcome = runtime.compute(spec.kind, loaded, image, spec.options)
    manifest = dict(outcome.manifest)
    files = dict(outcome.files)
    stage_ms = manifest.setdefault("timings_ms", {})
    for stage in ("preprocess", "forward", "render"):
        if stage_ms.get(stage) is not None:
            STAGE_SECONDS.labels(stage=stage).observe(stage_ms[stage] / 1000)
    for stage, ms in timings.items():
        stage_ms[stage] = round(ms, 3)

    report_stage(task, Progress.RENDERING)
    measure = runtime.settings.stage_cpu
    started, cpu_started = time.perf_counter(), cpu_clock(runtime.settings)
    files.update(report_files(manifest, runtime))
    report_s = time.perf_counter() - started
    STAGE_SECONDS.labels(stage="report").observe(report_s)
    stage_ms["report"] = round(report_s * 1000, 3)
    if measure:
        cpu = manifest.setdefault("cpu_ms", {})
        cpu["report"] = round((cpu_clock(runtime.settings) - cpu_started) * 1000.0, 3)
        if fetch_cpu_ms is not None:
            cpu["fetch"] = round(fetch_cpu_ms, 3)
    summary = describe(manifest)
    return Output(manifest, files, cache_event=cache_event, summary=summary)


def describe(manifest: dict[str, Any]) -> str:
    """A few words for the job's log line: '8 layers', 'Grad-CAM of 2 classes', both."""
    parts = []
    if manifest.get("layers"):
        parts.append(f"{len(manifest['layers'])} layers")
    if manifest.get("gradcam"):
        cam = manifest["gradcam"]
        parts.append(f"Grad-CAM of {len(cam['classes'])} classes at {cam['layer']}")
    return ", ".join(parts) or "0 layers"


def report_files(manifest: dict[str, Any], runtime: WorkerRuntime) -> dict[str, bytes]:
    """index.html and depth.svg; by the report helper processes when batching."""
    if runtime.reports is not None:
        return runtime.reports.render(manifest)
    return render_report(manifest)
