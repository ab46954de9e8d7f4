"""Class names for Grad-CAM and predictions: a list, or a labels file.

A labels file is text with one class name per line, in class-index order
(the ImageNet `synset words` style; blank lines at the end are ignored), or a
JSON list of strings (`.json`). The names travel in the job message, so the
worker needs no file of its own.
"""

from __future__ import annotations

import json
from pathlib import Path

from producer.contract import MAX_LABEL_CHARS, MAX_LABELS
from producer.errors import InvalidJob

MAX_LABELS_FILE_BYTES = 4 * 2**20


def read_labels(source: str | Path | list[str]) -> list[str]:
    """The class names in `source` (a list passes through). Raises InvalidJob for a
    file that cannot be read or is not a list of names."""
    if isinstance(source, list):
        return source
    path = Path(source).expanduser()
    try:
        if path.stat().st_size > MAX_LABELS_FILE_BYTES:
            raise InvalidJob(f"labels file {path} is above {MAX_LABELS_FILE_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc)
        raise InvalidJob(f"labels file {path} cannot be read: {reason}") from None
    if path.suffix.lower() == ".json":
        try:
            labels = json.loads(text)
        except ValueError as exc:
            raise InvalidJob(f"labels file {path} is not valid JSON: {exc}") from None
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise InvalidJob(f"labels file {path} must hold a JSON list of strings")
    else:
        labels = text.splitlines()
        while labels and not labels[-1].strip():
            labels.pop()
        labels = [line.strip() for line in labels]
    if len(labels) > MAX_LABELS or any(len(x) > MAX_LABEL_CHARS for x in labels):
        raise InvalidJob(
            f"labels file {path} has {len(labels)} names; at most {MAX_LABELS}, "
            f"each of at most {MAX_LABEL_CHARS} characters"
        )
    return labels
