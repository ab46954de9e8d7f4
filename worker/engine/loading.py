"""Open a saved Keras model safely and keep it warm as a `LoadedModel`.

Three on-disk formats are accepted, recognised by their bytes rather than the
file name: `.keras` zip archives (Keras 3's, and tf.keras's, see
`keras2_archive.py`), legacy HDF5 files written by Keras 2 or tf.keras, and
TensorFlow SavedModel folders written by tf.keras (rebuilt from their embedded
Keras config, see `savedmodel.py`).

Loading never runs code from the file unless the caller says the source is
trusted: the model config is scanned for `Lambda` layers *before* Keras
deserializes anything, and Keras itself runs with `safe_mode=True`. A tf.keras
config is adapted first (`keras2_config.py`): its op layers of pure functions
(`a + b`, `tf.nn.relu6`) become Keras 3 layers; any other is refused as code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import keras
import numpy as np

from producer.errors import ActvizError, InvalidModel, ModelNotFound, UnsafeModel
from worker.engine.extract import Extractor, build_extractor
from worker.engine.gradcam import CamModel, build_cam_model
from worker.engine.input_scale import auto_scale
from worker.engine.keras2_archive import legacy_config, load_keras2_archive
from worker.engine.keras2_config import adapt, custom_objects
from worker.engine.layers import LayerRef, flatten_layers, is_graph_model, select_layers
from worker.engine.layout import channels_first, engine_shape
from worker.engine.preprocess import CLASSIC, AutoScale
from worker.engine.safety import MAX_CONFIG_BYTES, check_model_bounds, refuse_code_layers
from worker.engine.savedmodel import is_savedmodel, load_savedmodel

_ZIP_MAGIC = b"PK\x03\x04"
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
IMAGE_CHANNELS = (1, 3)


@dataclass(eq=False)
class LoadedModel:
    """A model kept warm in a worker, with its extractors cached per layer set.

    `input_shape` is (H, W, C) with None for free spatial dimensions.
    `nbytes` approximates the memory the weights hold.
    `auto_scale` is what the job's scale 'auto' feeds it, and why (input_scale.py).
    `channels_first`: the model takes (C, H, W) images, and the engine sees it as
    channels-last (see layout.py).
    """

    model: keras.Model
    uri: str
    sha256: str
    nbytes: int
    input_shape: tuple[int | None, int | None, int]
    layers: list[LayerRef]
    auto_scale: AutoScale = CLASSIC
    channels_first: bool = False
    _extractors: dict[tuple[str, ...], Extractor] = field(default_factory=dict, repr=False)
    _cams: dict[str | None, CamModel] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def select(self, layer_spec: str | list[str] | None) -> list[LayerRef]:
        """Resolve a layer spec; raises UnknownLayer (see `layers.select_layers`)."""
        return select_layers(self.layers, layer_spec)

    def extractor(self, layer_spec: str | list[str] | None) -> Extractor:
        """The multi-output extractor for the resolved layer set, built once."""
        refs = self.select(layer_spec)
        key = tuple(ref.name for ref in refs)
        with self._lock:
            found = self._extractors.get(key)
            if found is None:
                found = build_extractor(self.model, refs)
                self._extractors[key] = found
        return found

    def cam(self, layer: str | None, region: str = "image") -> CamModel:
        """The Grad-CAM model at `layer` (None: the default layer) for `region`, built once.

        Raises InvalidJob or NotDifferentiable (see `gradcam.build_cam_model`).
        """
        with self._lock:
            found = self._cams.get((layer, region))
            if found is None:
                found = build_cam_model(self.model, self.layers, layer, region)
                self._cams[(layer, region)] = found
        return found


def open_model(path: str | Path, uri: str | None = None, *, trusted: bool = False) -> LoadedModel:
    """Load the model at `path` and wrap it for analysis.

    Raises ModelNotFound (no such file), InvalidModel (not a usable image model),
    UnsafeModel (Lambda layers and not `trusted`).
    """
    path = Path(path)
    model = load_model(path, trusted=trusted)
    input_shape = model_input_shape(model)
    return LoadedModel(
        model=model,
        uri=uri or str(path),
        sha256=hash_path(path),
        nbytes=weight_bytes(model),
        input_shape=input_shape,
        layers=flatten_layers(model),
        auto_scale=auto_scale(model, input_shape[2]),
        channels_first=channels_first(model),
    )


def load_model(path: str | Path, *, trusted: bool = False) -> keras.Model:
    """Deserialize a `.keras`, `.h5`/`.hdf5` file or a SavedModel folder.

    Raises ModelNotFound, InvalidModel or UnsafeModel; never a bare Keras error.
    """
    path = Path(path)
    if not path.exists():
        raise ModelNotFound(f"model file '{path}' does not exist")
    if path.is_dir():
        if not is_savedmodel(path):
            raise InvalidModel(f"'{path}' is a folder but not a TensorFlow SavedModel")
        return load_savedmodel(path, trusted=trusted)
    kind = _sniff(path)
    check_model_bounds(path, kind)
    config, version, backend = _read_config(path, kind)
    if kind == "h5" and version.startswith("1."):
        raise InvalidModel(  # Convolution2D, nb_filter, output_dim: none is Keras 3's
            f"'{path.name}' was written by Keras {version}, whose layers Keras 3 does not "
            "have; load it with Keras 2 (up to tf.keras 2.15), which converts Keras 1 "
            "files, and save it again as .h5"
        )
    # What Keras 2 wrote (an .h5's config, or a Keras 2 archive's in that form); a Keras 3
    # .h5 numbers its nodes its own way.
    keras2_archive = kind == "keras" and version.startswith("2.")
    if keras2_archive:
        adapted = adapt(legacy_config(config))
    else:
        adapted = adapt(config) if kind == "h5" and not version.startswith("3.") else config
    if not trusted:
        refuse_code_layers(adapted)
    try:
        if keras2_archive:
            model = load_keras2_archive(path, adapted, trusted=trusted)
        else:
            suffix = ".keras" if kind == "keras" else ".h5"
            config_copy = adapted if adapted is not config else None
            with _named_for_keras(path, suffix, config_copy) as named:
                model = keras.saving.load_model(
                    named, compile=False, safe_mode=not trusted, custom_objects=custom_objects()
                )
    except ActvizError:
        raise
    except Exception as exc:  # Keras raises anything from ValueError to KeyError
        if "safe_mode" in str(exc) or "arbitrary code" in str(exc):
            raise UnsafeModel(f"model refused in safe mode: {_short(exc)}") from exc
        unknown = sorted(set(_unknown_layer_classes(adapted)))
        if unknown:  # Keras's own message buries it under the model that held them
            raise InvalidModel(
                f"could not load model '{path.name}': it uses layer classes that are not "
                f"Keras's ({', '.join(unknown)}); they are Python code of its author's, "
                "which a worker does not import: rebuild the model with Keras layers"
            ) from exc
        raise InvalidModel(f"could not load model '{path.name}': {_short(exc)}") from exc
    if not isinstance(model, keras.Model):
        raise InvalidModel(f"'{path.name}' holds a {type(model).__name__}, not a Keras model")
    if backend == "theano":
        flip_theano_kernels(model)
    return model


# Layers that read a (batch, steps, features) input as a sequence, besides every "...1D".
SEQUENCE_LAYERS = (
    keras.layers.RNN,
    keras.layers.Bidirectional,
    keras.layers.MultiHeadAttention,
    keras.layers.Attention,
    keras.layers.Embedding,
)

# The layers whose kernels Keras 2 flipped loading a file another backend wrote.
_THEANO_FLIPPED = (
    "Conv1D",
    "Conv2D",
    "Conv3D",
    "Conv1DTranspose",
    "Conv2DTranspose",
    "Conv3DTranspose",
)


def flip_theano_kernels(model: keras.Model) -> None:
    """Each convolution kernel of `model` (nested models' too) turned around in space.

    Theano's convolution is a true one, its kernel turned around; TensorFlow's, JAX's
    and Keras 3's are correlations. Keras 2 turned the kernels of a file Theano's
    backend wrote as it loaded it (its `preprocess_weights_for_loading`); Keras 3
    loads them as they are, and every map after the first convolution would be
    another model's."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            flip_theano_kernels(layer)
        elif type(layer).__name__ in _THEANO_FLIPPED:
            kernel = keras.ops.convert_to_numpy(layer.kernel)
            spatial = tuple(range(kernel.ndim - 2))
            layer.kernel.assign(np.ascontiguousarray(np.flip(kernel, axis=spatial)))


def _sequence_reader(model: keras.Model) -> keras.layers.Layer | None:
    """The first layer that takes `model`'s input as a sequence (a 1-D convolution,
    pooling or padding, a recurrent layer, attention), inside a nested model that
    takes it too; None where none does (an image model without a channel axis,
    MNIST's, reshapes or flattens it first)."""
    source = model.inputs[0]
    for layer in model.layers:
        nodes = getattr(layer, "_inbound_nodes", [])
        if not any(any(t is source for t in node.input_tensors) for node in nodes):
            continue
        if is_graph_model(layer):
            found = _sequence_reader(layer)
        elif isinstance(layer, SEQUENCE_LAYERS) or type(layer).__name__.endswith("1D"):
            found = layer
        else:
            found = None
        if found is not None:
            return found
    return None


def model_input_shape(model: keras.Model) -> tuple[int | None, int | None, int]:
    """(H, W, C) of the single image input; raises InvalidModel otherwise.

    A model that takes (batch, H, W) takes grayscale images without a channel axis:
    (H, W, 1), the images fed without that axis (worker/engine/extract.py
    `image_input`). A channels-first model's (batch, C, H, W) is (H, W, C) too,
    the images fed transposed (worker/engine/layout.py). Raises InvalidModel for
    a model that mixes channels-first and channels-last layers."""
    try:
        inputs = model.inputs
    except (AttributeError, ValueError) as exc:
        inputs = None
        reason = str(exc)
    else:
        reason = ""
    if not inputs:
        raise InvalidModel(
            "model has no defined input: it was saved before being built "
            "(e.g. a Sequential model without an Input layer). Rebuild it with "
            "keras.Input(shape=(H, W, C)) as its first layer and save it again"
            + (f" ({reason})" if reason else "")
        )
    if len(inputs) != 1:
        raise InvalidModel(f"model has {len(inputs)} inputs; an image model needs exactly one")
    shape = tuple(inputs[0].shape)
    if len(shape) == 3:  # (batch, H, W): one channel, without its axis
        reader = _sequence_reader(model)
        if reader is not None:
            raise InvalidModel(
                f"model reads its {shape} input as a sequence: its layer '{reader.name}' "
                f"({type(reader).__name__}) takes {shape[1]} steps of {shape[2]} features, "
                f"not a grayscale {shape[1]} x {shape[2]} image; actviz shows image models"
            )
        shape = (*shape, 1)
    elif len(shape) == 4 and channels_first(model):  # (batch, C, H, W)
        shape = (shape[0], *engine_shape(shape[1:]))
    if len(shape) != 4:
        raise InvalidModel(
            f"model input shape {shape} is not (batch, H, W, C) or (batch, H, W) image input"
        )
    _, height, width, channels = shape
    if channels not in IMAGE_CHANNELS:
        raise InvalidModel(
            f"model input has {channels} channels; images can feed 1 (gray) or 3 (RGB)"
        )
    return (height, width, int(channels))


def _sniff(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(8)
    if head.startswith(_ZIP_MAGIC):
        return "keras"
    if head == _HDF5_MAGIC:
        return "h5"
    raise InvalidModel(
        f"'{path.name}' is not a Keras model: expected a .keras archive, "
        "an HDF5 .h5 file or a SavedModel folder"
    )


def _read_config(path: Path, kind: str) -> tuple[Any, str, str]:
    """The model config JSON, read without deserializing any layer, the version of
    Keras that wrote it and, for an `.h5`, the backend it ran on ('' where the file does
    not say)."""
    try:
        if kind == "keras":
            with zipfile.ZipFile(path) as archive:
                with archive.open("config.json") as member:
                    text = member.read(MAX_CONFIG_BYTES + 1)
                if len(text) > MAX_CONFIG_BYTES:
                    raise InvalidModel(
                        f"'{path.name}' has a config.json above {MAX_CONFIG_BYTES} bytes"
                    )
                version = _archive_version(archive)
            return json.loads(text), version, ""
        with h5py.File(path, "r") as fh:
            raw = fh.attrs.get("model_config")
            if raw is None:
                raise InvalidModel(
                    f"'{path.name}' holds weights only (no model config); "
                    "save the whole model with model.save(...)"
                )
            version = fh.attrs.get("keras_version", "")
            backend = fh.attrs.get("backend", "")
            config = json.loads(raw.decode() if isinstance(raw, bytes) else raw)
        return config, _text(version), _text(backend)
    except InvalidModel:
        raise
    except (KeyError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise InvalidModel(f"'{path.name}' is not a readable Keras model: {exc}") from exc


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _archive_version(archive: zipfile.ZipFile) -> str:
    """metadata.json's keras_version of a .keras archive; '' where it has none."""
    try:
        with archive.open("metadata.json") as member:
            return str(json.loads(member.read(64 * 1024)).get("keras_version", ""))
    except (KeyError, ValueError, AttributeError):
        return ""


def _unknown_layer_classes(node: Any, known: dict[str, type] | None = None) -> Iterator[str]:
    """The class (registered) names of the layers in a model config that neither Keras
    nor actviz's `custom_objects` know: custom classes of the model's author."""
    known = custom_objects() if known is None else known
    if isinstance(node, dict):
        layers = node.get("layers")
        for entry in layers if isinstance(layers, list) else []:
            if not isinstance(entry, dict) or not isinstance(entry.get("class_name"), str):
                continue
            name = entry.get("registered_name") or entry["class_name"]
            module = str(entry.get("module") or "")
            if not (
                module.startswith("keras")
                or hasattr(keras.layers, entry["class_name"])
                or entry["class_name"] in ("Functional", "Model", "Sequential")
                or name in known
                or entry["class_name"] in known
                or keras.saving.get_registered_object(name) is not None
            ):
                yield str(name)
        for value in node.values():
            yield from _unknown_layer_classes(value, known)
    elif isinstance(node, list):
        for value in node:
            yield from _unknown_layer_classes(value, known)


@contextlib.contextmanager
def _named_for_keras(path: Path, suffix: str, config: Any = None) -> Iterator[str]:
    """Keras picks the format by file extension; give it one without copying. With
    `config` (an `.h5` file's model config, adapted: worker/engine/keras2_config.py), a copy of
    the file that holds it instead of its own; the file itself is never changed."""
    accepted = (".h5", ".hdf5") if suffix == ".h5" else (suffix,)
    if config is None and path.suffix.lower() in accepted:
        yield str(path)
        return
    with tempfile.TemporaryDirectory(prefix="actviz-model-") as tmp:
        named = Path(tmp) / ("model" + suffix)
        if config is None:
            named.symlink_to(path.resolve())
        else:
            shutil.copyfile(path, named)
            with h5py.File(named, "r+") as fh:
                fh.attrs["model_config"] = json.dumps(config)
        yield str(named)


def hash_path(path: Path) -> str:
    """sha256 of a file, or of a folder's files (relative names and bytes, sorted)."""
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        if path.is_dir():
            digest.update(str(file.relative_to(path)).encode() + b"\0")
        with open(file, "rb") as fh:
            for chunk in iter(lambda fh=fh: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def weight_bytes(model: keras.Model) -> int:
    """Bytes held by the model's weights (a lower bound of its memory)."""
    total = 0
    for weight in model.weights:
        total += int(np.prod(weight.shape)) * np.dtype(weight.dtype).itemsize
    return total


def _short(exc: BaseException, limit: int = 400) -> str:
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
