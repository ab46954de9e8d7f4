"""What makes a model file unsafe to open, checked before Keras reads it.

Two kinds of danger: code (`Lambda` layers carry Python bytecode, run when
the model is deserialized or called) and size (a file whose parts declare
far more bytes than it stores is a memory bomb). Both are found from the
file's config and metadata alone.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import h5py

from producer.errors import InvalidModel, UnsafeModel

# Bounds checked before anything of a model file is parsed: its config, and how many
# bytes its weights say they hold against how many the file stores (Keras writes
# weights uncompressed; a file declaring far more than it holds is a memory bomb).
MAX_CONFIG_BYTES = 32 * 2**20
MAX_INFLATION = 64
INFLATION_SLACK = 2**20
# Layers that carry arbitrary Python code inside the file.
_CODE_LAYERS = ("Lambda", "TFOpLambda", "SlicingOpLambda")


def refuse_code_layers(config: Any) -> None:
    """Raise UnsafeModel when a model config (any nesting depth) holds a Lambda."""
    found = sorted(set(_code_layers(config)))
    if found:
        raise UnsafeModel(
            f"model contains layers that run arbitrary Python code ({', '.join(found)}); "
            "load it from a trusted source (ACTVIZ_MODEL_TRUSTED prefix) or replace "
            "those layers with built-in Keras layers"
        )


def _code_layers(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        # 'Lambda', 'layers.Lambda', 'keras.layers.Lambda' and 'pkg>Lambda' all name one class.
        names = {
            value.rsplit(">", 1)[-1].rsplit(".", 1)[-1]
            for key in ("class_name", "registered_name")
            if isinstance(value := node.get(key), str)
        }
        found = names & set(_CODE_LAYERS)
        if found:
            cfg = node.get("config")
            name = cfg.get("name") if isinstance(cfg, dict) else None
            kind = sorted(found)[0]
            yield f"{kind} '{name}'" if name else kind
        for value in node.values():
            yield from _code_layers(value)
    elif isinstance(node, list):
        for value in node:
            yield from _code_layers(value)


def check_model_bounds(path: Path, kind: str) -> None:
    """Refuse a model file whose parts would inflate far beyond its size when read.

    A `.keras` archive: members may not expand to more than MAX_INFLATION x the
    archive, config.json may not exceed MAX_CONFIG_BYTES, and every HDF5 member is
    checked as an `.h5` file is: its datasets (weights) may not declare more than
    MAX_INFLATION x the bytes that hold them. Reads metadata only.
    Raises InvalidModel (invalid_model).
    """
    size = path.stat().st_size
    try:
        if kind == "keras":
            with zipfile.ZipFile(path) as archive:
                infos = archive.infolist()
                _check_inflation(path.name, "its members", sum(i.file_size for i in infos), size)
                config = next((i for i in infos if i.filename == "config.json"), None)
                if config is not None and config.file_size > MAX_CONFIG_BYTES:
                    raise InvalidModel(
                        f"'{path.name}' has a config.json of {config.file_size} bytes, "
                        f"above {MAX_CONFIG_BYTES}"
                    )
                for info in infos:
                    if info.filename.endswith(".h5"):
                        with archive.open(info) as member, h5py.File(member, "r") as fh:
                            _check_h5(f"{path.name}:{info.filename}", fh, info.file_size)
        else:
            with h5py.File(path, "r") as fh:
                _check_h5(path.name, fh, size)
    except InvalidModel:
        raise
    except (KeyError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InvalidModel(f"'{path.name}' is not a readable Keras model: {exc}") from exc


def _check_h5(name: str, fh: Any, size: int) -> None:
    declared = 0

    def visit(_: str, obj: Any) -> None:
        nonlocal declared
        if isinstance(obj, h5py.Dataset):
            declared += int(obj.size) * obj.dtype.itemsize

    fh.visititems(visit)
    _check_inflation(name, "its weights", declared, size)
    if "model_config" in fh.attrs:
        config_bytes = fh.attrs.get_id("model_config").get_storage_size()
        if config_bytes > MAX_CONFIG_BYTES:
            raise InvalidModel(
                f"'{name}' has a model config of {config_bytes} bytes, above {MAX_CONFIG_BYTES}"
            )


def _check_inflation(name: str, what: str, declared: int, stored: int) -> None:
    if declared > stored * MAX_INFLATION + INFLATION_SLACK:
        raise InvalidModel(
            f"'{name}' is {stored} bytes but {what} declare {declared} bytes: "
            "refused as a decompression bomb"
        )
