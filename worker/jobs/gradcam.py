"""Grad-CAM: where the model looked for a class, for one image.

Kind 'gradcam'. The same steps as an activations job (worker/jobs/activations.py):
the model warm, the image fetched, one pass shared with the other Grad-CAM jobs
of the same model, layer and classes when batching (worker/engine/cam_pass.py),
the report, the files. What it writes: the model's top predictions and, per
explained class, the heatmap, its overlay on the input and its raw values.
"""

from __future__ import annotations

from celery import Task

from producer.contract import JobSpec
from worker.jobs.activations import run_image_job
from worker.jobs.steps import Output
from worker.runtime import WorkerRuntime


def run(task: Task, spec: JobSpec, runtime: WorkerRuntime) -> Output:
    """The job's Output. Raises InvalidJob, NotDifferentiable, the image's errors,
    or a transient error."""
    return run_image_job(task, spec, runtime)
