"""The manifest is written last: a store that records its writes shows the order."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

from producer import contract
from producer.contract import JobSpec
from producer.settings import Settings
from producer.storage import FileStore
from worker.jobs.lifecycle import run_job
from worker.runtime import WorkerRuntime


class RecordingStore(FileStore):
    """A local folder that remembers the order in which keys were written, through the
    worker's upload pool as an S3 store's objects are (their order is the question)."""

    concurrent_puts = True

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.writes: list[str] = []
        self._writes_lock = threading.Lock()

    def put(self, key: str, data: bytes, content_type: str | None = None) -> None:
        super().put(key, data, content_type)
        with self._writes_lock:
            self.writes.append(key)


def test_the_manifest_is_the_last_object_a_job_writes(tmp_path: Path, png_bytes: bytes) -> None:
    settings = Settings(storage_url=tmp_path.as_uri(), batch_size=1)
    runtime = WorkerRuntime(settings)
    store = RecordingStore(tmp_path)
    runtime._store = store
    store.put("inputs/photo.png", png_bytes)
    spec = JobSpec(job_id="order-job", model="builtin:demo", image=store.uri("inputs/photo.png"))
    task = SimpleNamespace(request=SimpleNamespace(id=None, retries=0), backend=None)
    run_job(task, spec, runtime)

    prefix = contract.job_prefix(spec.job_id)
    written = [key for key in store.writes if key.startswith(prefix)]
    manifest = json.loads(store.get(contract.manifest_key(spec.job_id)))
    named = {prefix + name for name in manifest["files"]}
    assert contract.report_key(spec.job_id) in named
    assert written[-1] == contract.manifest_key(spec.job_id)
    assert named <= set(written[:-1])  # every object it names was there before it
