"""What a tf.keras (Keras 2) model config needs before Keras 3 can build it.

Eight things in the configs of legacy `.h5` files and tf.keras SavedModels
stop Keras 3, though the model is plain:

- **A Sequential as a bare list of layers.** Keras 2.0 to 2.2.2 (the Keras of
  Deep Learning with Python's first edition and its `cats_and_dogs_small_2.h5`)
  wrote a Sequential's config as the list of its layers, the first declaring the
  input (`batch_input_shape`); Keras 3 reads a dict of its name and layers, and
  an `InputLayer` first (tf.keras wrote one), taking `batch_input_shape` on any
  other layer for its input shape, batch axis included.
- **Op layers.** In a tf.keras functional model, TensorFlow called on a Keras
  tensor (`a + b`, `x * 0.5`, `tf.nn.relu6(x)`, `tf.concat([a, b], -1)`)
  becomes a `TFOpLambda` layer naming the TensorFlow function. Keras 3 has no
  such layer, and one could name any TensorFlow function (a file write), so a
  config holding them is refused as code (worker/engine/safety.py). Each one
  whose function is in `OPS` (arithmetic, activations, reductions, concat,
  reshape, a bias, indexing (`x[..., ::-1]`, a `SlicingOpLambda`): functions of
  their tensors alone) becomes a `TFOp`, a Keras 3
  layer calling the same function written with `keras.ops`, with the tensors
  and constants of its one call. Any other is left as it was, and refused.
- **Names with '/'.** tf.keras's MobileNetV3 names layers `Conv/BatchNorm`;
  Keras 3 refuses '/' in a name (and actviz addresses nested layers
  `outer/inner`). Each '/' becomes '_' (another suffix where that name is
  taken). Weights still load: a legacy file's weights go to layers by order.
- **Arguments Keras 3 dropped.** tf.keras wrote `groups: 1` for every
  `DepthwiseConv2D` (MobileNet, EfficientNet) and `SeparableConv2D`
  (Xception, NASNet), with the kernel's initializer, regularizer and
  constraint for the latter, and `rng_type` for its augmentation layers
  (`RandomFlip`, `RandomRotation`); Keras 3 refuses them. Where the class does
  not take one, it is left out: `groups` where it is 1, the others always
  (they act in training alone; a loaded model's weights are in the file).
- **Nested models.** tf.keras gave a Functional, and a Sequential built on an
  Input, a node of their own, so a model calling one (a pretrained base, an
  augmentation block) refers to its node 1; Keras 3, building it from a
  legacy config, gives it none. Those references count from 0 (a model's
  output that is a nested Functional's Keras 3 shifts itself).
- **One input or output as a list of one.** tf.keras wrote a Functional's
  single input and output as `[[layer, 0, 0]]`; Keras 3 reads a list, and the
  model (a pretrained base inside a Sequential) then hands on a list of one
  tensor. They are written as the one reference they are.
- **BatchNormalization's axis as a list** (`[3]`, as tf.keras wrote it for a
  layer inside a nested model): Keras 3 takes one int.
- **Keras's own layers outside `keras.layers`.** ConvNeXt's `LayerScale` and
  `StochasticDepth`, InceptionResNetV2's `CustomScaleLayer`, are named by class
  alone in a legacy config; `custom_objects` supplies Keras's.

tf.keras's MobileNetV3, ConvNeXt and RegNet have most of these; every
tf.keras MobileNet has the third; many models people wrote have the first.
`adapt(config)` returns the config Keras 3 can build, for a config Keras 2
wrote (a Keras 3 `.h5` numbers its nodes its own way); `custom_objects()`
what it needs to build it.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from typing import Any

import keras

ops = keras.ops
CLASS_NAME = "ActvizTFOp"


def _silu(features: Any, beta: float = 1.0) -> Any:
    return features * ops.sigmoid(beta * features)


def _reduce(fn: Callable[..., Any]) -> Callable[..., Any]:
    def reduce(input_tensor: Any, axis: Any = None, keepdims: bool = False) -> Any:
        return fn(input_tensor, axis=axis, keepdims=keepdims)

    return reduce


def _resize(
    images: Any,
    size: Any,
    method: str = "bilinear",
    preserve_aspect_ratio: bool = False,
    antialias: bool = False,
) -> Any:
    if preserve_aspect_ratio:
        raise ValueError("tf.image.resize with preserve_aspect_ratio has no Keras 3 form")
    return ops.image.resize(images, tuple(size), interpolation=str(method), antialias=antialias)


def _expand_dims(input: Any, axis: int) -> Any:  # noqa: A002 (TensorFlow's parameter name)
    return ops.expand_dims(input, axis)


def _squeeze(input: Any, axis: Any = None, squeeze_dims: Any = None) -> Any:  # noqa: A002
    return ops.squeeze(input, axis if squeeze_dims is None else squeeze_dims)


def _transpose(a: Any, perm: Any = None, conjugate: bool = False) -> Any:
    return ops.transpose(a, axes=perm)  # conjugate: of a real tensor, itself


def _bias_add(value: Any, bias: Any, data_format: str | None = None) -> Any:
    if data_format is not None and str(data_format).startswith("NC"):  # NCHW: axis 1
        bias = ops.reshape(ops.convert_to_tensor(bias), (-1, *[1] * (len(value.shape) - 2)))
    return ops.add(value, ops.cast(bias, value.dtype))


def _getitem(tensor: Any, slice_spec: Any) -> Any:
    """`tensor[slice_spec]`, the spec as tf.keras wrote it (`slice_key`)."""
    return tensor[slice_key(slice_spec)]


def slice_key(spec: Any) -> Any:
    """A `SlicingOpLambda`'s written spec as Python's index: slices written as
    {"start", "stop", "step"}, Ellipsis as {"class_name": "__ellipsis__"}, a list of
    them as a tuple; raises ValueError for anything but ints and None in them."""
    if isinstance(spec, (list, tuple)):
        return tuple(slice_key(part) for part in spec)
    if spec is Ellipsis or (isinstance(spec, dict) and spec.get("class_name") == "__ellipsis__"):
        return Ellipsis  # Keras 3 decodes the latter to the former as it builds the layer
    if isinstance(spec, slice):
        spec = {"start": spec.start, "stop": spec.stop, "step": spec.step}
    if isinstance(spec, dict) and set(spec) == {"start", "stop", "step"}:
        parts = [spec["start"], spec["stop"], spec["step"]]
        if all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in parts):
            return slice(*parts)
    if spec is None or (isinstance(spec, int) and not isinstance(spec, bool)):
        return spec
    raise ValueError(f"not an index tf.keras writes: {spec!r}")


# tf.keras's name of each function -> the function, with TensorFlow's parameter names
# and defaults (tf.nn.leaky_relu's alpha is 0.2, Keras's 0.3).
OPS: dict[str, Callable[..., Any]] = {
    "__operators__.add": lambda x, y: ops.add(x, y),
    "math.add": lambda x, y: ops.add(x, y),
    "math.subtract": lambda x, y: ops.subtract(x, y),
    "math.multiply": lambda x, y: ops.multiply(x, y),
    "math.truediv": lambda x, y: ops.divide(x, y),
    "math.divide": lambda x, y: ops.divide(x, y),
    "math.maximum": lambda x, y: ops.maximum(x, y),
    "math.minimum": lambda x, y: ops.minimum(x, y),
    "math.pow": lambda x, y: ops.power(x, y),
    "math.negative": lambda x: ops.negative(x),
    "math.abs": lambda x: ops.abs(x),
    "math.square": lambda x: ops.square(x),
    "math.sqrt": lambda x: ops.sqrt(x),
    "math.exp": lambda x: ops.exp(x),
    "math.sigmoid": lambda x: ops.sigmoid(x),
    "math.tanh": lambda x: ops.tanh(x),
    "nn.relu": lambda features: ops.relu(features),
    "nn.relu6": lambda features: ops.relu6(features),
    "nn.silu": _silu,
    "nn.swish": _silu,
    "nn.gelu": lambda features, approximate=False: ops.gelu(features, approximate=approximate),
    "nn.softmax": lambda logits, axis=None: ops.softmax(logits, axis=-1 if axis is None else axis),
    "math.reduce_mean": _reduce(ops.mean),
    "math.reduce_sum": _reduce(ops.sum),
    "math.reduce_max": _reduce(ops.max),
    "math.reduce_min": _reduce(ops.min),
    "math.log": lambda x: ops.log(x),
    "nn.leaky_relu": lambda features, alpha=0.2: ops.leaky_relu(features, negative_slope=alpha),
    "nn.elu": lambda features: ops.elu(features),
    "nn.softplus": lambda features: ops.softplus(features),
    "image.resize": _resize,
    "expand_dims": _expand_dims,
    "squeeze": _squeeze,
    "compat.v1.squeeze": _squeeze,  # tf.keras's name of tf.squeeze
    "transpose": _transpose,
    "compat.v1.transpose": _transpose,  # tf.keras's name of tf.transpose
    "stack": lambda values, axis=0: ops.stack(values, axis=axis),
    "concat": lambda values, axis: ops.concatenate(values, axis=axis),
    "reshape": lambda tensor, shape: ops.reshape(tensor, shape),
    "clip_by_value": lambda t, clip_value_min, clip_value_max: ops.clip(
        t, clip_value_min, clip_value_max
    ),
    # preprocess_input of ResNet50, VGG and DenseNet: BGR order, then a mean added
    "nn.bias_add": _bias_add,
    "__operators__.getitem": _getitem,  # a SlicingOpLambda: x[..., ::-1], x[:, 0]
}


class TFOp(keras.layers.Layer):
    """One call of a function of `OPS`: `inputs` names the parameter each input tensor
    (or list of `count` tensors) goes to, in order; `constants` the other arguments."""

    def __init__(
        self,
        function: str,
        inputs: list[tuple[str, int | None]],
        constants: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if function not in OPS:
            raise ValueError(f"no Keras 3 form of TensorFlow's {function!r}")
        self.function = function
        self.inputs_layout = [(str(name), count) for name, count in inputs]
        self.constants = dict(constants or {})

    def call(self, inputs: Any) -> Any:
        tensors = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        arguments = dict(self.constants)
        for name, count in self.inputs_layout:
            if count is None:
                arguments[name] = tensors.pop(0)
            else:
                arguments[name], tensors = tensors[:count], tensors[count:]
        return OPS[self.function](**arguments)

    def get_config(self) -> dict[str, Any]:
        return {
            **super().get_config(),
            "function": self.function,
            "inputs": [list(item) for item in self.inputs_layout],
            "constants": self.constants,
        }


def custom_objects() -> dict[str, type]:
    """What Keras needs to build an adapted config: `TFOp`, and Keras's own layers that
    a legacy config names by class alone."""
    found: dict[str, type] = {CLASS_NAME: TFOp}
    try:
        from keras.src.applications.convnext import LayerScale, StochasticDepth
        from keras.src.applications.inception_resnet_v2 import CustomScaleLayer
    except ImportError:  # pragma: no cover (another Keras: such a config fails to load)
        return found
    found.update(
        LayerScale=LayerScale,
        StochasticDepth=StochasticDepth,
        CustomScaleLayer=CustomScaleLayer,
        # tf.keras registered InceptionResNetV2's under the package "Custom"
        **{"Custom>CustomScaleLayer": CustomScaleLayer},
    )
    return found


def adapt(config: Any) -> Any:
    """`config` (a legacy model config) as Keras 3 can build it (see the module doc): a
    new config where anything changed, else `config` itself."""
    adapted = copy.deepcopy(config)
    _adapt(adapted)
    return config if adapted == config else adapted


# Arguments tf.keras wrote that some Keras 3 classes refuse, and the values at which
# leaving one out changes nothing of a loaded model.
DROPPED_ARGUMENTS: dict[str, Callable[[Any], bool]] = {
    "groups": lambda value: value == 1,
    "kernel_initializer": lambda value: True,
    "kernel_regularizer": lambda value: True,
    "kernel_constraint": lambda value: True,
    "rng_type": lambda value: True,  # tf.keras's augmentation layers: inactive in inference
}


def _adapt(node: Any) -> None:
    """Every model config in `node` (a Functional's or a Sequential's: a dict holding
    "layers"), innermost first."""
    if isinstance(node, dict):
        if node.get("class_name") == "Sequential":
            if isinstance(node.get("config"), list):  # Keras 2.0 to 2.2.2
                node["config"] = {"name": "sequential", "layers": node["config"]}
            if isinstance(node.get("config"), dict):
                _declare_input(node["config"].get("layers"))
        for value in node.values():
            _adapt(value)
        layers = node.get("layers")
        if isinstance(layers, list) and all(isinstance(entry, dict) for entry in layers):
            for entry in layers:
                _drop_arguments(entry)
            _rename_slashes(node, layers)
            _count_nested_nodes_from_0(node, layers)
            for key in ("input_layers", "output_layers"):
                refs = node.get(key)
                if isinstance(refs, list) and len(refs) == 1 and isinstance(refs[0], list):
                    node[key] = refs[0]
            names = {_name_of(entry) for entry in layers}
            for i, entry in enumerate(layers):
                if entry.get("class_name") in ("TFOpLambda", "SlicingOpLambda"):
                    layers[i] = _op_layer(entry, names) or entry
    elif isinstance(node, list):
        for value in node:
            _adapt(value)


def _declare_input(layers: Any) -> None:
    """A Sequential's first layer declaring `batch_input_shape` (Keras 2.0 to 2.2 wrote
    no InputLayer before it), given the InputLayer tf.keras would have written: Keras 3
    reads that argument of any other layer as its input shape, batch axis included."""
    if not isinstance(layers, list) or not layers or not isinstance(layers[0], dict):
        return
    first = layers[0]
    config = first.get("config")
    if first.get("class_name") == "InputLayer" or not isinstance(config, dict):
        return
    shape = config.pop("batch_input_shape", None)
    if shape is None:
        return
    declared = {"batch_input_shape": shape, "dtype": config.get("dtype", "float32")}
    declared.update(sparse=False, name=f"{config.get('name', 'sequential')}_input")
    layers.insert(0, {"class_name": "InputLayer", "config": declared})


def _name_of(entry: dict[str, Any]) -> Any:
    config = entry.get("config")
    return entry.get("name", config.get("name") if isinstance(config, dict) else None)


def _drop_arguments(entry: dict[str, Any]) -> None:
    """Leave out of a layer's config the `DROPPED_ARGUMENTS` its Keras 3 class refuses;
    a BatchNormalization's axis of one as an int."""
    config = entry.get("config")
    if entry.get("class_name") == "BatchNormalization" and isinstance(config, dict):
        axis = config.get("axis")
        if isinstance(axis, list) and len(axis) == 1 and isinstance(axis[0], int):
            config["axis"] = axis[0]
    cls = getattr(keras.layers, str(entry.get("class_name")), None)
    if not isinstance(config, dict) or not isinstance(cls, type):
        return
    taken = inspect.signature(cls.__init__).parameters
    for key, neutral in DROPPED_ARGUMENTS.items():
        if key in config and key not in taken and neutral(config[key]):
            del config[key]


def _count_nested_nodes_from_0(model: dict[str, Any], layers: list[dict[str, Any]]) -> None:
    """References in `model` to a nested Functional, or Sequential built on an Input, one
    node lower; in its output layers, a Sequential's only (Keras 3 lowers a Functional's)."""
    functional = {
        _name_of(entry) for entry in layers if entry.get("class_name") in ("Functional", "Model")
    }
    sequential = {
        _name_of(entry)
        for entry in layers
        if entry.get("class_name") == "Sequential" and _built_on_input(entry.get("config"))
    }

    def lower(ref: list[Any]) -> list[Any]:
        return [ref[0], ref[1] - 1, *ref[2:]] if ref[1] >= 1 else ref

    _rewrite_refs(model, layers, functional | sequential, lower, ())
    _rewrite_refs(model, [], sequential, lower, ("output_layers",))


def _built_on_input(config: Any) -> bool:
    """A Sequential config whose first layer is an InputLayer or declares its input."""
    layers = config.get("layers") if isinstance(config, dict) else None
    if not isinstance(layers, list) or not layers or not isinstance(layers[0], dict):
        return False
    first = layers[0]
    inner = first.get("config") if isinstance(first.get("config"), dict) else {}
    return first.get("class_name") == "InputLayer" or "batch_input_shape" in inner


def _rename_slashes(model: dict[str, Any], layers: list[dict[str, Any]]) -> None:
    """Each layer name with '/' in `model`'s layers, and every reference to it there
    (inbound nodes, the model's input and output layers), with '_' instead."""
    taken = {_name_of(entry) for entry in layers}
    renamed: dict[str, str] = {}
    for entry in layers:
        old = _name_of(entry)
        if not isinstance(old, str) or "/" not in old:
            continue
        new, suffix = old.replace("/", "_"), 1
        while new in taken:
            new, suffix = f"{old.replace('/', '_')}_{suffix}", suffix + 1
        taken.add(new)
        renamed[old] = new
        if "name" in entry:
            entry["name"] = new
        if isinstance(entry.get("config"), dict) and entry["config"].get("name") == old:
            entry["config"]["name"] = new
    if renamed:
        _rewrite_refs(model, layers, set(renamed), lambda ref: [renamed[ref[0]], *ref[1:]])


def _rewrite_refs(
    model: dict[str, Any],
    layers: list[dict[str, Any]],
    names: set[Any],
    rewrite: Callable[[list[Any]], list[Any]],
    keys: tuple[str, ...] = ("input_layers", "output_layers"),
) -> None:
    """Each tensor reference to a layer in `names`, in `layers`' inbound nodes and in
    `model`'s `keys`, replaced by `rewrite(reference)`."""
    for entry in layers:
        if "inbound_nodes" in entry:
            entry["inbound_nodes"] = _map_refs(entry["inbound_nodes"], names, rewrite)
    for key in keys:
        if key in model:
            model[key] = _map_refs(model[key], names, rewrite)


def _map_refs(node: Any, names: set[Any], rewrite: Callable[[list[Any]], list[Any]]) -> Any:
    """`node` with each tensor reference [layer, node, tensor(, kwargs)] to a layer in
    `names` replaced by `rewrite(reference)`, its kwargs' references too."""
    if isinstance(node, list):
        if _is_tensor(node, names):
            node = rewrite(node)
            return [*node[:3], *(_map_refs(value, names, rewrite) for value in node[3:])]
        return [_map_refs(value, names, rewrite) for value in node]
    if isinstance(node, dict):
        return {key: _map_refs(value, names, rewrite) for key, value in node.items()}
    return node


def _op_layer(entry: dict[str, Any], names: set[Any]) -> dict[str, Any] | None:
    """The TFOp layer for one TFOpLambda `entry`, or None where its function is not in
    `OPS` or its call is not one this module can read."""
    config = entry.get("config")
    nodes = entry.get("inbound_nodes")
    if not isinstance(config, dict) or not isinstance(nodes, list) or len(nodes) != 1:
        return None
    function, node = config.get("function"), nodes[0]
    if function not in OPS or not isinstance(node, list) or not node:
        return None
    # The call's first argument: one tensor, its node written [layer, node, tensor,
    # kwargs] (or as a list of that one entry), or a list of tensors, one entry each.
    entries = [node] if isinstance(node[0], str) else node
    if not all(_is_tensor(e, names) for e in entries):
        return None
    kwargs = entries[-1][3] if len(entries[-1]) > 3 else {}
    if not isinstance(kwargs, dict):
        return None
    params = list(inspect.signature(OPS[function]).parameters)
    inbound = [[*e[:3], {}] for e in entries]
    layout: list[list[Any]] = [[params[0], len(entries) if len(entries) > 1 else None]]
    constants: dict[str, Any] = {}
    for name, value in kwargs.items():
        if name == "name":
            continue
        if name not in params[1:]:
            return None
        if isinstance(value, dict) and value.get("class_name") == "__tuple__":
            value = value.get("items")  # a tuple, as a SavedModel's metadata writes it
        if _is_tensor(value, names):
            inbound.append([*value[:3], {}])
            layout.append([name, None])
        elif _is_constant(value) or (name == "slice_spec" and _is_slice_spec(value)):
            constants[name] = value
        else:
            return None
    return {
        **{key: value for key, value in entry.items() if key != "config"},
        "class_name": CLASS_NAME,
        "config": {
            "name": config.get("name", entry.get("name")),
            "trainable": bool(config.get("trainable", False)),
            "dtype": config.get("dtype", "float32"),
            "function": function,
            "inputs": layout,
            "constants": constants,
        },
        "inbound_nodes": [inbound],
    }


def _is_tensor(value: Any, names: set[Any]) -> bool:
    """[layer name, node index, tensor index(, kwargs)] naming a layer of this model."""
    return (
        isinstance(value, list)
        and len(value) in (3, 4)
        and isinstance(value[0], str)
        and value[0] in names
        and all(isinstance(i, int) and not isinstance(i, bool) for i in value[1:3])
    )


def _is_slice_spec(value: Any) -> bool:
    try:
        slice_key(value)
    except ValueError:
        return False
    return True


def _is_constant(value: Any) -> bool:
    """A number, a bool, a string (a data format, a method), None, or a list of numbers
    (a shape, axes)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    return isinstance(value, list) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value
    )
