"""Diff: two checkpoints of one architecture, layer by layer, on one image.

Kind 'diff' (`JobSpec.against` names the second model). Both models are
loaded through the warm model cache, the image is fetched and preprocessed
once, and `worker/engine/diff.py` compares every matched layer. The job folder
gets the grids of A, B and |A - B| per spatial layer, `diff.json` (the
comparison, also the manifest's "diff" section) and `index.html`, the diff
report. A batch of diff jobs also gets `batches/<id>/diff.json` and
`diff.html`, the comparison over all its images (worker/jobs/batches.py).
Diff jobs run in the job's own thread, not in shared batches.
"""

from __future__ import annotations

import json
import time

from celery import Task

from producer.contract import DIFF_FILE, JobSpec, Progress
from worker.jobs.steps import Output, fetch_image, report_stage
from worker.metrics import STAGE_SECONDS
from worker.runtime import WorkerRuntime


def run(task: Task, spec: JobSpec, runtime: WorkerRuntime) -> Output:
    """The job's Output. Raises InvalidJob, UnknownLayer, the models' and the image's
    errors, or a transient error."""
    from worker.engine.diff import diff_image
    from worker.report.diff import render_diff

    assert spec.against is not None  # the contract requires it for this kind
    report_stage(task, Progress.LOADING_MODEL)
    loaded, event, timings = runtime.load_model(spec.model)
    against, against_event, against_timings = runtime.load_model(spec.against)
    image = fetch_image(spec, runtime)
    report_stage(task, Progress.FORWARD)
    outcome = diff_image(loaded, against, image, spec.options, runtime.settings)
    manifest, files = dict(outcome.manifest), dict(outcome.files)
    manifest["diff"]["against"]["uri"] = spec.against
    manifest["job_id"] = spec.job_id  # for the report; the lifecycle fills the rest
    manifest["image"]["uri"] = spec.image
    if spec.image_name:
        manifest["image"]["name"] = spec.image_name
    stage_ms = manifest.setdefault("timings_ms", {})
    for stage in ("download_model", "load"):
        stage_ms[stage] = round(timings[stage] + against_timings[stage], 3)
    report_stage(task, Progress.RENDERING)
    started = time.perf_counter()
    files[DIFF_FILE] = json.dumps(manifest["diff"], separators=(",", ":")).encode()
    manifest["files"] = sorted(files)
    files["index.html"] = render_diff(manifest)
    report_s = time.perf_counter() - started
    STAGE_SECONDS.labels(stage="report").observe(report_s)
    stage_ms["report"] = round(report_s * 1000, 3)
    diff = manifest["diff"]
    first = diff["first_divergent"] or "none"
    summary = f"diff of {len(diff['layers'])} layers, first divergent: {first}"
    return Output(manifest, files, cache_event=f"{event}/{against_event}", summary=summary)
