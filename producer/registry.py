"""Model references: URIs, local paths and registry names, normalized to one URI.

The registry is a small JSON or TOML file (path in `settings.model_registry`)
mapping a short name to a model URI:

    {"vgg16": "s3://models/vgg16.keras"}          # JSON
    vgg16 = "s3://models/vgg16.keras"              # TOML

A TOML file may also nest the table as `[models]`. A name may instead map to a
table with the model's class names for Grad-CAM (a list, or a path to a
labels file, relative to the registry file):

    {"vgg16": {"uri": "s3://models/vgg16.keras", "labels": "imagenet.txt"}}
    [models.vgg16]
    uri = "s3://models/vgg16.keras"
    labels = "imagenet.txt"
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from producer.errors import ModelNotFound
from producer.storage import FILE_SCHEME, S3_SCHEME, is_file_uri

URI_SCHEMES = (S3_SCHEME, FILE_SCHEME, "builtin:")
MODEL_SUFFIXES = (".keras", ".h5", ".hdf5")


def load_registry(path: str | None) -> dict[str, str]:
    """Name -> URI from a JSON or TOML file; {} when no registry is configured.

    Raises ModelNotFound (model_not_found) when the file is missing or malformed.
    """
    return {name: entry["uri"] for name, entry in load_entries(path).items()}


def registry_labels(path: str | None, name: str) -> list[str] | None:
    """The class names the registry gives model `name`, or None.

    Raises ModelNotFound for a malformed registry, InvalidJob for a labels file
    that cannot be read.
    """
    from producer.labels import read_labels

    entry = load_entries(path).get(str(name))
    if entry is None or entry.get("labels") is None:
        return None
    labels = entry["labels"]
    if isinstance(labels, str):
        base = Path(path or ".").expanduser().parent
        labels = base / Path(labels).expanduser()
    return read_labels(labels)


def load_entries(path: str | None) -> dict[str, dict]:
    """Name -> {"uri", "labels"?} from the registry file (see the module doc)."""
    if not path:
        return {}
    file = Path(path).expanduser()
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ModelNotFound(f"model registry {path} cannot be read: {exc.strerror}") from None
    try:
        if file.suffix.lower() == ".toml":
            import tomllib

            data = tomllib.loads(text)
            data = data.get("models", data)
        else:
            data = json.loads(text)
    except ValueError as exc:
        raise ModelNotFound(f"model registry {path} is not valid: {exc}") from None
    entries: dict[str, dict] = {}
    for name, value in data.items() if isinstance(data, dict) else []:
        if isinstance(value, str):
            entries[name] = {"uri": value}
        elif (
            isinstance(value, dict)
            and isinstance(value.get("uri"), str)
            and isinstance(value.get("labels"), (str, list, type(None)))
        ):
            entries[name] = {"uri": value["uri"], "labels": value.get("labels")}
        else:
            entries = {}
            break
    if not isinstance(data, dict) or len(entries) != len(data):
        raise ModelNotFound(
            f"model registry {path} must map names to URI strings, or to tables with "
            "a 'uri' and optional 'labels'"
        )
    return entries


def resolve_model(model: str | Path, registry: dict[str, str] | None = None) -> str:
    """Turn what a user typed into a model URI the worker understands.

    's3://b/m.keras' and 'builtin:demo' pass through; 'file://rel/m.h5' and
    './m.h5' become absolute file:// URIs; a registry name becomes its URI.
    Raises ModelNotFound (model_not_found) for a name that is none of these.
    """
    text = str(model)
    registry = registry or {}
    if text in registry:
        return resolve_model(registry[text])
    if is_file_uri(text):
        return _file_uri(text[len(FILE_SCHEME) :])
    if text.startswith(URI_SCHEMES):
        return text
    if "://" in text:
        raise ModelNotFound(f"model URI {text!r} has an unsupported scheme; use s3:// or file://")
    if isinstance(model, Path) or "/" in text or text.endswith(MODEL_SUFFIXES):
        return _file_uri(text)
    names = ", ".join(sorted(registry)) or "none configured (ACTVIZ_MODEL_REGISTRY)"
    raise ModelNotFound(
        f"model {text!r} is not a URI, a path or a registry name; registry names: {names}"
    )


def _file_uri(path: str) -> str:
    # abspath also folds '..', so allow-list prefixes compare against the real location.
    return Path(os.path.abspath(os.path.expanduser(path))).as_uri()
