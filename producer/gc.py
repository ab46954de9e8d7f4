"""Deleting old results: job and batch folders whose newest object is older than a cutoff.

    report = collect(store, older_than_s=7 * 86400)        # `actviz gc --older-than 7d`

A folder (`jobs/<id>/`, `batches/<id>/`) goes whole or not at all, judged by
its newest object, so a job that is still writing is never cut in half.
Content-addressed inputs (`inputs/`) are kept: a new job may reuse an old
upload (the producer skips storing bytes it finds there). S3 deletes 1,000
objects per request; the local folder also removes the folders it empties.
Redis keeps results for `ACTVIZ_RESULT_EXPIRES` seconds on its own.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field

from producer.storage import Store

FOLDERS = ("jobs/", "batches/")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)")
_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


@dataclass
class GcReport:
    folders: list[str] = field(default_factory=list)  # e.g. 'jobs/<id>/'
    objects: int = 0
    bytes: int = 0


def parse_duration(text: str) -> float:
    """'7d', '12h', '30m', '90s', '1w' or plain seconds -> seconds. Raises ValueError."""
    match = _DURATION.fullmatch(text.strip().lower())
    if not match:
        raise ValueError(f"{text!r} is not a duration such as 7d, 12h, 30m or 3600")
    return float(match.group(1)) * _UNIT_S[match.group(2)]


def collect(
    store: Store, older_than_s: float, now: float | None = None, dry_run: bool = False
) -> GcReport:
    """Delete every job and batch folder whose newest object is older than `older_than_s`."""
    cutoff = (time.time() if now is None else now) - older_than_s
    report = GcReport()
    for top in FOLDERS:
        folders: dict[str, list[tuple[str, float, int]]] = {}
        for key, modified, size in store.list_dated(top):
            name = key[len(top) :].split("/", 1)[0]
            folders.setdefault(f"{top}{name}/", []).append((key, modified, size))
        for folder, objects in sorted(folders.items()):
            if max(modified for _, modified, _ in objects) >= cutoff:
                continue
            report.folders.append(folder)
            report.bytes += sum(size for _, _, size in objects)
            keys = [key for key, _, _ in objects]
            report.objects += len(keys) if dry_run else store.delete_many(keys)
    return report
