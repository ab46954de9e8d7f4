"""TensorFlow SavedModel folders: rebuilt as a Keras model when they allow it.

Keras 3 cannot load SavedModels with their layers. A SavedModel written by
tf.keras (Keras 2) embeds each layer's Keras config in `keras_metadata.pb`.
From it we write the same legacy HDF5 layout that `model.save("m.h5")` would
have written (config + weights read from the SavedModel's variables) and let
Keras load that, so the result is an ordinary Keras 3 model with layers.
Any other SavedModel (a plain `tf.Module`, Keras 3 `model.export()`) holds no
layers to look into and is refused with instructions to convert it.
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import h5py
import keras

from producer.errors import ActvizError, InvalidModel, UnsafeModel
from worker.engine.keras2_config import adapt, custom_objects
from worker.engine.safety import refuse_code_layers

CONVERT_HINT = (
    "load it with the Keras version that wrote it and save it as a .keras file "
    "(model.save('model.keras')) or as HDF5 (model.save('model.h5'))"
)
METADATA = "keras_metadata.pb"
MAX_METADATA_BYTES = 32 * 2**20
_TOP_LAYER = re.compile(r"^layer(_with_weights)?-\d+$")


def is_savedmodel(path: Path) -> bool:
    return (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file()


def load_savedmodel(path: Path, *, trusted: bool = False) -> keras.Model:
    """Rebuild a tf.keras SavedModel as a Keras 3 model.

    Raises InvalidModel (no Keras layers in it, or unreadable), UnsafeModel
    (Lambda layers and not trusted).
    """
    nodes = read_keras_metadata(path)
    root = nodes.get("root")
    if root is None or "config" not in root:
        raise InvalidModel(
            f"SavedModel '{path.name}' has no Keras layers that Keras 3 can rebuild; "
            + CONVERT_HINT
        )
    config = adapt({"class_name": root["class_name"], "config": root["config"]})
    if not trusted:
        refuse_code_layers(config)
    weights = _layer_weights(path, nodes)
    with tempfile.TemporaryDirectory(prefix="actviz-savedmodel-") as tmp:
        h5_path = Path(tmp) / "model.h5"
        _write_legacy_h5(h5_path, config, weights)
        try:
            return keras.saving.load_model(
                h5_path, compile=False, safe_mode=not trusted, custom_objects=custom_objects()
            )
        except ActvizError:
            raise
        except Exception as exc:
            if "safe_mode" in str(exc):
                raise UnsafeModel(f"model refused in safe mode: {exc}") from exc
            raise InvalidModel(
                f"SavedModel '{path.name}' could not be rebuilt as Keras layers ({exc}); "
                + CONVERT_HINT
            ) from exc


def read_keras_metadata(path: Path) -> dict[str, dict[str, Any]]:
    """{node_path: metadata dict} from keras_metadata.pb; {} when there is none.

    The file is a `SavedMetadata` protobuf: repeated field 1 of `SavedObject`
    messages whose field 3 is the node path ("root", "root.layer-0") and
    field 5 the metadata JSON. Read with a minimal wire-format decoder so no
    Keras 2 package is needed.
    """
    file = path / METADATA
    if not file.is_file():
        return {}
    if file.stat().st_size > MAX_METADATA_BYTES:
        raise InvalidModel(
            f"SavedModel '{path.name}' has a {METADATA} above {MAX_METADATA_BYTES} bytes"
        )
    data = file.read_bytes()
    nodes: dict[str, dict[str, Any]] = {}
    try:
        for field, value in _fields(data):
            if field != 1:
                continue
            item = {f: v for f, v in _fields(value) if f in (3, 5)}
            node_path = item.get(3, b"").decode()
            if node_path and 5 in item:
                nodes[node_path] = json.loads(item[5])
    except (ValueError, IndexError, UnicodeDecodeError) as exc:
        raise InvalidModel(f"SavedModel '{path.name}' has a corrupt {METADATA}: {exc}") from exc
    return nodes


def _fields(data: bytes) -> list[tuple[int, Any]]:
    """Decode one protobuf message level: [(field number, int | bytes)]."""
    out: list[tuple[int, Any]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            size, pos = _varint(data, pos)
            value, pos = data[pos : pos + size], pos + size
            if pos > len(data):
                raise ValueError("truncated field")
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        else:
            raise ValueError(f"unsupported wire type {wire}")
        out.append((field, value))
    return out


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _layer_weights(path: Path, nodes: dict[str, dict[str, Any]]) -> list[tuple[str, list[Any]]]:
    """[(top-level layer name, [arrays in Keras 2 `layer.weights` order])].

    Read from the variables checkpoint and its object graph, never by loading
    the SavedModel: `tf.saved_model.load` would run the graph's restore and
    initializer ops, which a crafted SavedModel can make do anything an op can
    (read or write files). The checkpoint reader only reads tensors.
    """
    import tensorflow as tf  # the checkpoint format is TensorFlow's
    from tensorflow.core.protobuf import trackable_object_graph_pb2

    try:
        reader = tf.train.load_checkpoint(str(path / "variables" / "variables"))
        graph = trackable_object_graph_pb2.TrackableObjectGraph()
        graph.ParseFromString(reader.get_tensor("_CHECKPOINTABLE_OBJECT_GRAPH"))
    except Exception as exc:
        raise InvalidModel(f"SavedModel '{path.name}' has no readable variables: {exc}") from exc
    root = _children(graph, 0)
    # The metadata names each top-level layer once, under either of its two
    # attribute names ("layer-3" or "layer_with_weights-1"); match by object.
    names: dict[int, str] = {}
    for node_path, meta in nodes.items():
        attribute = node_path.removeprefix("root.")
        if _TOP_LAYER.match(attribute) and attribute in root:
            names[root[attribute]] = str(meta.get("name"))
    layers = []
    index = 0
    while f"layer-{index}" in root:
        node = root[f"layer-{index}"]
        if node not in names:
            raise InvalidModel(f"SavedModel '{path.name}' has no Keras metadata for layer {index}")
        layers.append((names[node], _variables(reader, graph, node)))
        index += 1
    return layers


def _children(graph: Any, node: int) -> dict[str, int]:
    return {child.local_name: child.node_id for child in graph.nodes[node].children}


def _variables(reader: Any, graph: Any, layer: int) -> list[Any]:
    """A layer's variables in its `variables` order, read from the checkpoint."""
    listed = _children(graph, layer).get("variables")
    if listed is None:
        return []
    order = sorted(_children(graph, listed).items(), key=lambda item: int(item[0]))
    arrays = []
    for _, node in order:
        keys = [
            a.checkpoint_key for a in graph.nodes[node].attributes if a.name == "VARIABLE_VALUE"
        ]
        if not keys:
            raise InvalidModel("a layer variable has no value in the SavedModel's checkpoint")
        arrays.append(reader.get_tensor(keys[0]))
    return arrays


def _write_legacy_h5(path: Path, config: dict[str, Any], weights: list[tuple[str, list]]) -> None:
    """The layout Keras 2 `model.save('m.h5')` writes: config attr + model_weights."""
    with h5py.File(path, "w") as fh:
        fh.attrs["model_config"] = json.dumps(config)
        fh.attrs["keras_version"] = "2.15.0"
        fh.attrs["backend"] = "tensorflow"
        group = fh.create_group("model_weights")
        group.attrs["layer_names"] = [name.encode() for name, _ in weights]
        group.attrs["backend"] = "tensorflow"
        group.attrs["keras_version"] = "2.15.0"
        for name, arrays in weights:
            layer_group = group.create_group(name)
            names = [f"{name}/weight_{i}:0" for i in range(len(arrays))]
            layer_group.attrs["weight_names"] = [n.encode() for n in names]
            for weight_name, array in zip(names, arrays, strict=True):
                layer_group.create_dataset(weight_name, data=array)
