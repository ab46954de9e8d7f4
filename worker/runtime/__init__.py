"""What a worker process keeps between jobs: warm models, the batcher, helper processes.

runtime = WorkerRuntime(settings)          # one per process, `app.actviz`
loaded, event, timings = runtime.load_model("s3://models/vgg16.keras")
artifacts = runtime.analyze(loaded, image_bytes, options)
"""

from worker.runtime.process import WorkerRuntime

__all__ = ["WorkerRuntime"]
