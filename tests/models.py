"""Real Keras test models, built small and saved in the formats users have.

Every builder returns the saved path. Weights are seeded so runs repeat.
Models written by Keras 2 are made in a subprocess by running this file with
`tf_keras` (`python tests/models.py keras2 OUT_DIR`), because Keras 2 and
Keras 3 do not share one process cleanly.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SIDE = 32  # tiny inputs keep the tests fast on a shared CPU
DEAD_CHANNEL = 1  # first conv channel forced to a constant 0 after ReLU


def _keras():
    import keras

    keras.utils.set_random_seed(7)
    return keras


def run_model(model, x):  # noqa: ANN001, ANN201
    """`model`'s outputs on `x`, as a list of numpy arrays, through the engine's compiled
    program: on a CPU, TensorFlow runs a channels-first model there only (under XLA)."""
    from worker.engine.compiled import compile_program, to_host

    return to_host(compile_program(model, lambda outputs: outputs)(x))


def _kill_channel(conv, channel: int = DEAD_CHANNEL) -> None:
    """Zero kernel and negative bias: the ReLU output of `channel` is constant 0."""
    kernel, bias = conv.get_weights()
    kernel[..., channel] = 0.0
    bias[channel] = -1.0
    conv.set_weights([kernel, bias])


def sequential_cnn(side: int = SIDE, channels: int = 3):
    """Conv-pool x2, Flatten, Dense: a Dense-ending CNN; layer 0 has a dead channel."""
    keras = _keras()
    layers = keras.layers
    model = keras.Sequential(
        [
            keras.Input((side, side, channels)),
            layers.Conv2D(4, 3, activation="relu", name="conv2d_1"),
            layers.MaxPooling2D(name="max_pooling2d_1"),
            layers.Conv2D(6, 3, activation="relu", name="conv2d_2"),
            layers.MaxPooling2D(name="max_pooling2d_2"),
            layers.Flatten(name="flatten"),
            layers.Dense(5, activation="relu", name="dense"),
            layers.Dense(1, activation="sigmoid", name="head"),
        ],
        name="seq_cnn",
    )
    _kill_channel(model.get_layer("conv2d_1"))
    return model


def classic_cnn(side: int = 150):
    """The classic cats-vs-dogs CNN, Deep Learning with Python's (section 5.2, the
    model it saves as `cats_and_dogs_small_2.h5`): 4x (Conv2D + MaxPooling2D) on
    150x150x3, Flatten, Dropout, a Dense head. bench/bench_engine.py builds the same
    (the GPU kit carries no tests)."""
    keras = _keras()
    layers = keras.layers
    stack = [keras.Input((side, side, 3))]
    for filters in (32, 64, 128, 128):
        stack += [layers.Conv2D(filters, 3, activation="relu"), layers.MaxPooling2D(2)]
    stack += [
        layers.Flatten(),
        layers.Dropout(0.5),
        layers.Dense(512, activation="relu"),
        layers.Dense(1, activation="sigmoid"),
    ]
    return keras.Sequential(stack, name="classic")


def softmax_cnn(side: int = SIDE, classes: int = 4, gray_hw: bool = False):
    """Conv-pool x2, Flatten, Dense(softmax): a classifier whose head is a softmax.

    gray_hw: MNIST's way, a (batch, H, W) input without a channel axis, reshaped to one
    channel inside the model."""
    keras = _keras()
    layers = keras.layers
    stem = (
        [keras.Input((side, side)), layers.Reshape((side, side, 1), name="add_channel")]
        if gray_hw
        else [keras.Input((side, side, 3))]
    )
    return keras.Sequential(
        [
            *stem,
            layers.Conv2D(6, 3, activation="relu", name="conv_a"),
            layers.MaxPooling2D(name="pool_a"),
            layers.Conv2D(8, 3, activation="relu", name="conv_b"),
            layers.Flatten(name="flatten"),
            layers.Dense(classes, activation="softmax", name="probs"),
        ],
        name="gray_hw_cnn" if gray_hw else "softmax_cnn",
    )


def save_softmax_keras(out: Path) -> Path:
    path = out / "softmax_cnn.keras"
    softmax_cnn().save(path)
    return path


def save_sequential_h5(out: Path) -> Path:
    path = out / "seq_cnn.h5"
    sequential_cnn().save(path)
    return path


def save_gray_keras(out: Path) -> Path:
    """A 1-channel-input CNN, fed RGB images in the tests."""
    path = out / "gray_cnn.keras"
    sequential_cnn(channels=1).save(path)
    return path


def save_gray_hw_h5(out: Path) -> Path:
    """`softmax_cnn(gray_hw=True)` as a legacy .h5, as such models are often shared."""
    path = out / "gray_hw_cnn.h5"
    softmax_cnn(gray_hw=True).save(path)
    return path


def save_uint8_input_keras(out: Path) -> Path:
    """A model that takes uint8 pixels (0..255) and rescales them itself, then a
    softmax head."""
    return _save_rescaling_cnn(out, "uint8_input_cnn", dtype="uint8")


def save_rescaling_keras(out: Path) -> Path:
    """The Keras tutorials' classifier: augmentation, then `Rescaling(1. / 255)` in
    front of the first convolution, so the model takes pixel values 0..255."""
    return _save_rescaling_cnn(out, "rescaling_cnn", augment=True)


def _save_rescaling_cnn(out: Path, name: str, dtype: str = "float32", augment: bool = False):
    keras = _keras()
    layers = keras.layers
    inputs = x = keras.Input((SIDE, SIDE, 3), dtype=dtype)
    if augment:
        x = keras.Sequential([layers.RandomFlip("horizontal")], name="augment")(x)
    x = layers.Rescaling(1 / 255.0, name="rescale")(x)
    x = layers.Conv2D(4, 3, activation="relu", name="conv")(x)
    x = layers.Dense(3, activation="softmax", name="probs")(layers.GlobalAveragePooling2D()(x))
    path = out / f"{name}.keras"
    keras.Model(inputs, x, name=name).save(path)
    return path


def channels_first_cnn(data_format: str = "channels_first"):
    """Functional, every spatial layer in `data_format`: convolutions, BatchNormalization
    on the channel axis, a residual Add, a Concatenate of channels, pooling, Flatten
    and a softmax head. With "channels_last", its twin: the same weights fit both."""
    keras = _keras()
    layers = keras.layers
    first = data_format == "channels_first"
    axis = 1 if first else -1
    inputs = keras.Input((3, SIDE, SIDE) if first else (SIDE, SIDE, 3), name="image")
    fmt = {"data_format": data_format}
    a = layers.Conv2D(6, 3, padding="same", activation="relu", name="conv_a", **fmt)(inputs)
    a = layers.BatchNormalization(axis=axis, name="bn")(a)
    b = layers.Conv2D(6, 3, padding="same", name="conv_b", **fmt)(a)
    x = layers.Concatenate(axis=axis, name="concat")([layers.Add(name="add")([a, b]), a])
    x = layers.MaxPooling2D(name="pool", **fmt)(x)
    x = layers.Conv2D(8, 3, activation="relu", name="conv_c", **fmt)(x)
    x = layers.Flatten(name="flatten", **fmt)(x)
    return keras.Model(inputs, layers.Dense(3, activation="softmax", name="probs")(x))


def channels_last_twin(model, dtype: str = "float32"):  # noqa: ANN001, ANN201
    """`channels_first_cnn`'s twin in channels_last holding `model`'s weights and head, in
    `dtype`: what a channels-first model computes, run by TensorFlow's own CPU kernels
    (which take NHWC only) as an independent reference."""
    keras = _keras()
    policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(dtype)
    try:
        twin = channels_first_cnn("channels_last")
    finally:
        keras.config.set_dtype_policy(policy)
    twin.set_weights([w.astype(dtype) for w in model.get_weights()])
    twin.layers[-1].activation = model.layers[-1].activation
    return twin


def save_channels_first_keras(out: Path) -> Path:
    """`channels_first_cnn` with BatchNormalization statistics that are not 0 and 1."""
    import numpy as np

    model = channels_first_cnn()
    bn = model.get_layer("bn")
    rng = np.random.default_rng(9)
    bn.set_weights([rng.uniform(0.5, 1.5, 6).astype("float32") for _ in bn.get_weights()])
    path = out / "channels_first_cnn.keras"
    model.save(path)
    return path


def segmentation_cnn(classes: int = 4):  # noqa: ANN201
    """A small U-Net: an encoder, a transposed convolution back up, a skip connection,
    and a per-pixel softmax head (a 1 x 1 convolution)."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((32, 32, 3))
    a = layers.Conv2D(6, 3, padding="same", activation="relu", name="conv_a")(inputs)
    b = layers.MaxPooling2D(name="pool")(a)
    b = layers.Conv2D(8, 3, padding="same", activation="relu", name="conv_b")(b)
    up = layers.Conv2DTranspose(6, 2, strides=2, name="up")(b)
    x = layers.Concatenate(name="concat")([a, up])
    x = layers.Conv2D(6, 3, padding="same", activation="relu", name="decode")(x)
    return keras.Model(inputs, layers.Conv2D(classes, 1, activation="softmax", name="seg")(x))


def save_segmentation_keras(out: Path) -> Path:
    path = out / "segmentation.keras"
    segmentation_cnn().save(path)
    return path


def vgg_like(side: int = 64, top: bool = True):
    """VGG16's first blocks, named as keras.applications names them: a functional model
    (Keras 2's `Model`), with its classifier or, `top=False`, as a convolutional base."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((side, side, 3), name="input_1")
    x = inputs
    for block, filters in ((1, 8), (2, 16)):
        for conv in (1, 2):
            x = layers.Conv2D(
                filters, 3, padding="same", activation="relu", name=f"block{block}_conv{conv}"
            )(x)
        x = layers.MaxPooling2D(2, name=f"block{block}_pool")(x)
    if top:
        x = layers.Flatten(name="flatten")(x)
        x = layers.Dense(32, activation="relu", name="fc1")(x)
        x = layers.Dense(5, activation="softmax", name="predictions")(x)
    return keras.Model(inputs, x, name="vgg16")


def transfer_cnn(side: int = 64):
    """Deep Learning with Python's feature extraction (section 5.3): a convolutional
    base (`vgg_like(top=False)`) inside a Sequential, then a classifier."""
    keras = _keras()
    layers = keras.layers
    base = vgg_like(side, top=False)
    head = [
        layers.Flatten(),
        layers.Dense(16, activation="relu"),
        layers.Dense(1, activation="sigmoid"),
    ]
    return keras.Sequential([keras.Input((side, side, 3)), base, *head])


KERAS_2_0 = ("sequential", "functional", "nested")  # what `save_keras_2_0_h5` writes


def save_keras_2_0_h5(
    out: Path,
    kind: str = "sequential",
    side: int = 150,
    backend: str = "tensorflow",
    version: str = "2.0.8",
) -> tuple[Path, object]:
    """A model as Keras 2.0.8 (Deep Learning with Python's Keras, on TensorFlow 1) wrote
    it to `.h5`, with random weights; returns (path, the Keras 3 twin holding them).

    - "sequential": section 5.2's `cats_and_dogs_small_2.h5` (`classic_cnn`), which its
      section 5.4 opens to show intermediate activations: a Sequential's config as a
      bare list of layers, the first holding `batch_input_shape`, the layers named from
      `conv2d_1`.
    - "functional": `vgg_like`, a `Model` (VGG16, which section 5.4 explains with
      Grad-CAM), its layers' inbound nodes and the model's inputs and outputs as
      lists.
    - "nested": section 5.3's `transfer_cnn`, a `Model` inside a Sequential, its
      weights in the Sequential's group for it.

    Written with h5py field for field as Keras 2.0.8's `save_model`,
    `Container.get_config` and the layers' own `get_config` write them (Keras 2.0
    runs on no TensorFlow of today), with the RMSprop training config the book
    compiles with. `backend="theano"`: as Keras 2.0 on Theano wrote it, whose
    convolution is a true one: each kernel stored turned around in space, so that the
    file computes what its twin does. `version="2.2.4"`: a Sequential's config as
    Keras 2.2.3 to 2.2.5 wrote it, a dict of its name and layers (still no InputLayer).
    """
    import json

    import h5py
    import numpy as np

    keras = _keras()
    twin = {"sequential": classic_cnn, "functional": vgg_like, "nested": transfer_cnn}[kind](side)
    rng = np.random.default_rng(13)
    twin.set_weights([rng.normal(0, 0.05, w.shape).astype("float32") for w in twin.get_weights()])
    base = twin.layers[0] if kind == "nested" else twin
    kept = set() if kind == "sequential" else {base.name, *(layer.name for layer in base.layers)}
    names = _Keras20Names(kept)
    if isinstance(twin, keras.Sequential):
        top = twin.layers
        entries = [_keras_2_0_entry(layer, names, first=i == 0) for i, layer in enumerate(top)]
        listed = version < "2.2.3"
        config = {
            "class_name": "Sequential",
            "config": entries if listed else {"name": "sequential_1", "layers": entries},
        }
    else:
        top = twin.layers
        config = _keras_2_0_entry(twin, names, first=True)
    path = out / {"sequential": "cats_and_dogs_small_2.h5"}.get(kind, f"keras_2_0_{kind}.h5")
    with h5py.File(path, "w") as f:
        f.attrs["keras_version"] = version.encode()
        f.attrs["backend"] = backend.encode()
        f.attrs["model_config"] = json.dumps(config).encode("utf8")
        group = f.create_group("model_weights")
        group.attrs["layer_names"] = [names.of(layer).encode("utf8") for layer in top]
        group.attrs["backend"] = backend.encode()
        group.attrs["keras_version"] = version.encode()
        for layer in top:
            g = group.create_group(names.of(layer))
            inner = layer.layers if isinstance(layer, keras.Model) else [layer]
            weights = [
                (f"{names.of(part)}/{w}:0".encode(), value)
                for part in inner
                for w, value in zip(("kernel", "bias"), part.get_weights(), strict=False)
            ]
            g.attrs["weight_names"] = [name for name, _ in weights]
            for name, value in weights:
                if backend == "theano" and value.ndim == 4:  # a Conv2D's kernel
                    value = np.ascontiguousarray(value[::-1, ::-1])
                g.create_dataset(name, data=value)
        f.attrs["training_config"] = json.dumps(
            {
                "optimizer_config": {
                    "class_name": "RMSprop",
                    "config": {"lr": 9.999999747378752e-05, "rho": 0.8999999761581421,
                               "decay": 0.0, "epsilon": 1e-07},
                },
                "loss": "binary_crossentropy",
                "metrics": ["acc"],
                "sample_weight_mode": None,
                "loss_weights": None,
            }
        ).encode("utf8")  # fmt: skip
    return path, twin


class _Keras20Names:
    """Keras 2.0's layer names, `conv2d_1`, `max_pooling2d_1`, ... counted per class from
    1, for the twin's layers Keras named; the names in `kept` (VGG16's `block1_conv1`)
    as they are."""

    BASES = {"Conv2D": "conv2d", "MaxPooling2D": "max_pooling2d"}

    def __init__(self, kept: set[str]) -> None:
        self.kept, self.names, self.counts = kept, {}, {}

    def of(self, layer) -> str:  # noqa: ANN001
        if id(layer) not in self.names:
            if layer.name in self.kept:
                self.names[id(layer)] = layer.name
            else:
                base = self.BASES.get(type(layer).__name__, type(layer).__name__.lower())
                self.counts[base] = self.counts.get(base, 0) + 1
                self.names[id(layer)] = f"{base}_{self.counts[base]}"
        return self.names[id(layer)]


def _keras_2_0_entry(layer, names: _Keras20Names, first: bool = False) -> dict:  # noqa: ANN001
    """{"class_name", "config"} of `layer` as Keras 2.0.8's `get_config` wrote it."""
    keras = _keras()
    kind = type(layer).__name__
    glorot = {
        "class_name": "VarianceScaling",
        "config": {"scale": 1.0, "mode": "fan_avg", "distribution": "uniform", "seed": None},
    }
    zeros = {"class_name": "Zeros", "config": {}}
    empty = {
        "kernel_regularizer": None, "bias_regularizer": None, "activity_regularizer": None,
        "kernel_constraint": None, "bias_constraint": None,
    }  # fmt: skip
    if isinstance(layer, keras.Model):
        return {"class_name": "Model", "config": _keras_2_0_model(layer, names)}
    entry: dict = {"name": names.of(layer), "trainable": True}
    if kind == "InputLayer":
        shape = [None, *layer.batch_shape[1:]]
        return {
            "class_name": kind,
            "config": {"batch_input_shape": shape, "dtype": "float32", "sparse": False,
                       "name": names.of(layer)},
        }  # fmt: skip
    if first:
        entry.update(batch_input_shape=[None, *layer.input.shape[1:]], dtype="float32")
    if kind == "Conv2D":
        entry.update(
            filters=layer.filters, kernel_size=list(layer.kernel_size), strides=[1, 1],
            padding=layer.padding, data_format="channels_last", dilation_rate=[1, 1],
            activation=layer.activation.__name__, use_bias=True, kernel_initializer=glorot,
            bias_initializer=zeros, **empty,
        )  # fmt: skip
    elif kind == "MaxPooling2D":
        entry.update(
            pool_size=list(layer.pool_size), padding="valid", strides=list(layer.strides),
            data_format="channels_last",
        )  # fmt: skip
    elif kind == "Dropout":
        entry.update(rate=layer.rate)
    elif kind == "Dense":
        entry.update(
            units=layer.units, activation=layer.activation.__name__, use_bias=True,
            kernel_initializer=glorot, bias_initializer=zeros, **empty,
        )  # fmt: skip
    elif kind != "Flatten":
        raise ValueError(f"no Keras 2.0 form of {kind} here")
    return {"class_name": kind, "config": entry}


def _keras_2_0_model(model, names: _Keras20Names) -> dict:  # noqa: ANN001
    """A chain-shaped functional model's config as Keras 2.0.8's `Container.get_config`
    wrote it: each layer with its inbound nodes, the inputs and outputs as lists."""
    entries, previous = [], None
    for layer in model.layers:
        entry = _keras_2_0_entry(layer, names)
        entry["name"] = names.of(layer)
        entry["inbound_nodes"] = [] if previous is None else [[[names.of(previous), 0, 0, {}]]]
        entries.append(entry)
        previous = layer
    return {
        "name": model.name,
        "layers": entries,
        "input_layers": [[names.of(model.layers[0]), 0, 0]],
        "output_layers": [[names.of(model.layers[-1]), 0, 0]],
    }


def residual_separable():
    """Functional: Conv2D, SeparableConv2D, residual Add, BatchNorm, pooling, Dense."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((SIDE, SIDE, 3), name="image")
    x = layers.Conv2D(6, 3, padding="same", activation="relu", name="stem")(inputs)
    y = layers.SeparableConv2D(6, 3, padding="same", activation="relu", name="block1_sep")(x)
    y = layers.BatchNormalization(name="block1_bn")(y)
    x = layers.Add(name="block1_add")([x, y])
    y = layers.SeparableConv2D(6, 3, padding="same", name="block2_sep")(x)
    x = layers.Add(name="block2_add")([x, y])
    x = layers.MaxPooling2D(name="pool")(x)
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(3, name="logits")(x)
    model = keras.Model(inputs, outputs, name="residual")
    bn = model.get_layer("block1_bn")
    # Non-trivial moving statistics so inference mode differs from training mode.
    gamma, beta, mean, var = bn.get_weights()
    bn.set_weights([gamma * 1.5, beta + 0.1, mean + 0.2, var * 2.0])
    return model


def save_residual_keras(out: Path) -> Path:
    path = out / "residual.keras"
    residual_separable().save(path)
    return path


def nested():
    """A Functional feature extractor used as one layer inside a Sequential model."""
    keras = _keras()
    layers = keras.layers
    inner_in = keras.Input((SIDE - 2, SIDE - 2, 4), name="features_in")
    z = layers.Conv2D(5, 3, activation="relu", name="inner_conv_a")(inner_in)
    z = layers.Conv2D(5, 3, activation="relu", name="inner_conv_b")(z)
    inner = keras.Model(inner_in, z, name="features")
    return keras.Sequential(
        [
            keras.Input((SIDE, SIDE, 3)),
            layers.Conv2D(4, 3, activation="relu", name="stem"),
            inner,
            layers.GlobalAveragePooling2D(name="gap"),
            layers.Dense(2, name="out"),
        ],
        name="nested",
    )


def save_nested_keras(out: Path) -> Path:
    path = out / "nested.keras"
    nested().save(path)
    return path


def fully_convolutional():
    """(None, None, 3) input: keeps the image's own size."""
    keras = _keras()
    layers = keras.layers
    inputs = keras.Input((None, None, 3))
    x = layers.Conv2D(3, 3, padding="same", activation="relu", name="fc_conv1")(inputs)
    x = layers.Conv2D(2, 3, strides=2, padding="same", name="fc_conv2")(x)
    return keras.Model(inputs, x, name="fully_conv")


def save_fully_conv_keras(out: Path) -> Path:
    path = out / "fully_conv.keras"
    fully_convolutional().save(path)
    return path


def wide(channels: int = 40, side: int = 64):
    """One conv layer with a large grid, for the max_grid_side tests."""
    keras = _keras()
    inputs = keras.Input((side, side, 3))
    x = keras.layers.Conv2D(channels, 1, name="wide_conv")(inputs)
    return keras.Model(inputs, x, name="wide")


def save_wide_keras(out: Path) -> Path:
    path = out / "wide.keras"
    wide().save(path)
    return path


def save_wide_dense_keras(out: Path, units: int = 4100) -> Path:
    """An image model ending in a Dense layer too wide for a strip image."""
    keras = _keras()
    model = keras.Sequential(
        [
            keras.Input((8, 8, 1)),
            keras.layers.Conv2D(2, 3, name="small_conv"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(units, name="wide_dense"),
        ]
    )
    path = out / "wide_dense.keras"
    model.save(path)
    return path


def save_lambda_models(out: Path) -> tuple[Path, Path]:
    """The same Lambda model as .keras and .h5 (Keras 3)."""
    keras = _keras()
    model = keras.Sequential(
        [
            keras.Input((SIDE, SIDE, 3)),
            keras.layers.Conv2D(2, 3, name="conv"),
            keras.layers.Lambda(lambda t: t * 2.0, name="double"),
        ]
    )
    paths = (out / "lambda.keras", out / "lambda.h5")
    for path in paths:
        model.save(path)
    return paths


def save_unbuilt_keras(out: Path) -> Path:
    """A Sequential model saved before it ever saw an input shape."""
    keras = _keras()
    path = out / "unbuilt.keras"
    keras.Sequential([keras.layers.Conv2D(2, 3), keras.layers.Flatten()]).save(path)
    return path


def save_tf_module_savedmodel(out: Path) -> Path:
    """A SavedModel of a plain tf.Module: a graph with no Keras layers to rebuild."""
    import tensorflow as tf

    class Doubler(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, SIDE, SIDE, 3], tf.float32)])
        def __call__(self, x):
            return x * 2.0

    path = out / "plain_savedmodel"
    tf.saved_model.save(Doubler(), str(path))
    return path


# ---- models whose Lambda layer runs code: what only a trusted source may load ----

# Kills its own process (as a crashing forward pass would) when a batch holds an
# all-white image. The worker runs the forward pass compiled (tf.function, jax.jit),
# where a Lambda's Python sees no values: the check runs on the host through the
# backend's callback (tf.numpy_function, jax.debug.callback), once per batch.
# Building and loading call the Lambda on KerasTensors, which pass through.
_KILL_IF_WHITE = (
    "lambda a: (__import__('os').kill(__import__('os').getpid(), 9) "
    "if (__import__('numpy').asarray(a).reshape(a.shape[0], -1).min(axis=1) > 0.999).any() "
    "else None, __import__('numpy').float32(0))[1]"
)
TRIPWIRE = (
    "lambda x: x if type(x).__name__ == 'KerasTensor' else ("
    "x + 0.0 * __import__('tensorflow').reduce_sum(__import__('tensorflow').numpy_function("
    f"{_KILL_IF_WHITE}, [x], 'float32', stateful=True)) "
    "if __import__('keras').backend.backend() == 'tensorflow' else "
    f"(__import__('jax').debug.callback({_KILL_IF_WHITE}, x), x)[1])"
)


def touch_on_call(marker: Path) -> str:
    """Lambda source that creates `marker` when a job's forward pass runs it: proof that code ran.

    Building and loading the model call it on tensors of no batch size, which leave
    no marker; a worker's job runs it on a batch of real size (its compiled pass
    traces it so), which does.
    """
    touch = f"__import__('pathlib').Path({str(marker)!r}).touch()"
    return f"lambda x: ({touch} if x.shape[0] is not None else None, x)[1]"


def code_lambda_model(path: Path, source: str, side: int = 16) -> Path:
    """Input -> Lambda(eval(source)) named 'code' -> Conv2D 'conv', saved as `.keras`."""
    keras = _keras()
    model = keras.Sequential(
        [
            keras.Input((side, side, 3)),
            keras.layers.Lambda(eval(source), name="code"),  # noqa: S307 (test source)
            keras.layers.Conv2D(4, 3, name="conv"),
        ]
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    model.save(path)
    return path


# ---- Keras 2 (tf_keras) files, written in a subprocess -----------------------

KERAS2_FILES = (
    "keras2_cnn.h5",
    "keras2_lambda.h5",
    "keras2_savedmodel",
    # What Keras 3 cannot build from a tf.keras config as it is (worker/engine/keras2_config.py)
    "keras2_ops.h5",
    "keras2_ops_savedmodel",
    "keras2_mobilenet_v3.h5",
    "keras2_transfer_functional.h5",
    "keras2_transfer_sequential.h5",
    "keras2_unknown_op.h5",
    "keras2_v3.keras",
    # tf.keras's own .keras archives (worker/engine/keras2_archive.py)
    "keras2_cnn.keras",
    "keras2_lambda.keras",
    "keras2_mobilenet_v3.keras",
    "keras2_transfer_functional.keras",
    "keras2_transfer_sequential.keras",
    "keras2_channels_first.keras",
    "keras2_torch_preprocess.keras",
    "keras2_channels_first.h5",
    "keras2_caffe_preprocess.h5",
    "keras2_torch_preprocess.h5",
    "keras2_outputs.npz",  # each model's outputs under tf_keras, for KERAS2_INPUT
)
KERAS2_SIDE = 32


def keras2_input():
    """The images the Keras 2 models' outputs were computed on (keras2_outputs.npz)."""
    import numpy as np

    return np.random.default_rng(5).random((2, KERAS2_SIDE, KERAS2_SIDE, 3), dtype=np.float32)


def save_keras2_models(out: Path) -> dict[str, Path]:
    """Run this file under tf_keras; returns {name: path} for KERAS2_FILES."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "keras2", str(out)],
        check=True,
        env=env,
        capture_output=True,
        timeout=240,
    )
    return {name: out / name for name in KERAS2_FILES}


def _write_keras2(out: Path) -> None:
    import tf_keras

    tf_keras.utils.set_random_seed(7)
    layers = tf_keras.layers
    cnn = tf_keras.Sequential(
        [
            layers.Conv2D(4, 3, activation="relu", input_shape=(SIDE, SIDE, 3), name="conv2d_1"),
            layers.MaxPooling2D(name="max_pooling2d_1"),
            layers.Conv2D(6, 3, activation="relu", name="conv2d_2"),
            layers.MaxPooling2D(name="max_pooling2d_2"),
            layers.Flatten(name="flatten"),
            layers.Dense(1, activation="sigmoid", name="head"),
        ]
    )
    cnn.save(out / "keras2_cnn.h5", save_format="h5")
    cnn.save(out / "keras2_cnn.keras", save_format="keras")
    cnn.save(out / "keras2_savedmodel", save_format="tf")
    lam = tf_keras.Sequential(
        [
            layers.Conv2D(2, 3, input_shape=(SIDE, SIDE, 3), name="conv"),
            layers.Lambda(lambda t: t * 2.0, name="double"),
        ]
    )
    lam.save(out / "keras2_lambda.h5", save_format="h5")
    lam.save(out / "keras2_lambda.keras", save_format="keras")
    _write_keras2_adapted(out)


def _write_keras2_adapted(out: Path) -> None:
    """tf.keras models whose configs Keras 3 cannot build as they are: op layers
    (TensorFlow called on Keras tensors), a nested Sequential built on an Input, depthwise
    and separable convolutions (their `groups` argument), names with '/'; tf.keras's own
    MobileNetV3 (all of them); a pretrained base in a Functional (with augmentation) and
    in a Sequential; one op actviz does not rebuild; most also as tf.keras's own `.keras`."""
    import numpy as np
    import tensorflow as tf
    import tf_keras

    layers = tf_keras.layers
    side = KERAS2_SIDE
    inputs = tf_keras.Input((side, side, 3), name="image")
    stem = tf_keras.Sequential(
        [tf_keras.Input((side, side, 3)), layers.Conv2D(6, 3, name="stem_conv")], name="stem"
    )
    x = stem(inputs)
    a = layers.DepthwiseConv2D(3, padding="same", name="block/depthwise")(x)
    b = layers.SeparableConv2D(6, 3, padding="same", name="block/separable")(x)
    y = tf.nn.relu6(a + b * 0.5 - 1.0) / 6.0  # add, multiply, subtract, relu6, truediv
    y = tf.concat([y, tf.math.sigmoid(x)], axis=-1)
    y = tf.reshape(tf.reshape(y, (-1, (side - 2) * (side - 2) * 12)), (-1, side - 2, side - 2, 12))
    y = tf.nn.leaky_relu(tf.transpose(tf.image.resize(y, (side, side)), (0, 2, 1, 3)))
    y = tf.squeeze(tf.expand_dims(y, 1), 1)
    pooled = tf.math.reduce_mean(y, axis=[1, 2])
    ops_model = tf_keras.Model(inputs, layers.Dense(3, name="head")(pooled), name="ops_model")
    ops_model.save(out / "keras2_ops.h5", save_format="h5")
    ops_model.save(out / "keras2_ops_savedmodel", save_format="tf")
    ops_model.save(out / "keras2_v3.keras", save_format="keras")
    mobilenet = tf_keras.applications.MobileNetV3Small(
        weights=None, input_shape=(side, side, 3), classes=4
    )
    mobilenet.save(out / "keras2_mobilenet_v3.h5", save_format="h5")
    mobilenet.save(out / "keras2_mobilenet_v3.keras", save_format="keras")
    # Transfer learning as the tutorials write it: augmentation, the base's own
    # preprocess_input (op layers), a pretrained base called with training=False.
    base = tf_keras.applications.MobileNetV2(
        include_top=False, weights=None, input_shape=(side, side, 3), alpha=0.35
    )
    augment = tf_keras.Sequential(
        [layers.RandomFlip("horizontal"), layers.RandomRotation(0.1)], name="augment"
    )
    h = tf_keras.applications.mobilenet_v2.preprocess_input(augment(inputs))
    h = layers.GlobalAveragePooling2D()(base(h, training=False))
    transfer = tf_keras.Model(inputs, layers.Dense(2, name="head")(h), name="transfer")
    transfer.save(out / "keras2_transfer_functional.h5", save_format="h5")
    transfer.save(out / "keras2_transfer_functional.keras", save_format="keras")
    stacked = tf_keras.Sequential(
        [
            tf_keras.Input((side, side, 3)),
            layers.Rescaling(1 / 127.5, offset=-1),
            tf_keras.applications.MobileNetV2(
                include_top=False, weights=None, input_shape=(side, side, 3), alpha=0.35
            ),
            layers.GlobalAveragePooling2D(),
            layers.Dense(2, name="head"),
        ],
        name="stacked",
    )
    stacked.save(out / "keras2_transfer_sequential.h5", save_format="h5")
    stacked.save(out / "keras2_transfer_sequential.keras", save_format="keras")
    # Channels-first, as Keras 2 on a GPU wrote it. TensorFlow runs its convolutions on a
    # GPU only, so its outputs are its channels-last twin's, with the same weights.
    twins = []
    for data_format in ("channels_first", "channels_last"):
        first = data_format == "channels_first"
        twins.append(
            tf_keras.Sequential(
                [
                    tf_keras.Input((3, side, side) if first else (side, side, 3)),
                    layers.Conv2D(5, 3, activation="relu", data_format=data_format),
                    layers.BatchNormalization(axis=1 if first else -1),
                    layers.MaxPooling2D(data_format=data_format),
                    layers.Conv2D(4, 3, data_format=data_format),
                    layers.Flatten(data_format=data_format),
                    layers.Dense(2, name="head"),
                ],
                name="channels_first" if first else "channels_last",
            )
        )
    rng = np.random.default_rng(11)
    twins[1].set_weights(  # biases and BatchNormalization's statistics not 0 and 1
        [rng.uniform(0.5, 1.5, w.shape) if w.ndim == 1 else w for w in twins[1].get_weights()]
    )
    twins[0].set_weights(twins[1].get_weights())
    twins[0].save(out / "keras2_channels_first.h5", save_format="h5")
    twins[0].save(out / "keras2_channels_first.keras", save_format="keras")
    # Transfer learning from ResNet50 or VGG (caffe: BGR order, a mean subtracted as a
    # bias: a SlicingOpLambda and nn.bias_add), and from DenseNet (torch: / 255, a mean,
    # / std), the base's preprocess_input inside the model.
    preprocessed = {}
    for mode, preprocess in (
        ("caffe", tf_keras.applications.resnet50.preprocess_input),
        ("torch", tf_keras.applications.densenet.preprocess_input),
    ):
        h = layers.Conv2D(4, 3, activation="relu", name="conv")(preprocess(inputs))
        h = layers.Dense(3, activation="softmax", name="head")(layers.GlobalAveragePooling2D()(h))
        preprocessed[mode] = tf_keras.Model(inputs, h, name=f"{mode}_preprocess")
        preprocessed[mode].save(out / f"keras2_{mode}_preprocess.h5", save_format="h5")
        if mode == "torch":  # tf.keras cannot write the other's slice (an Ellipsis) there
            preprocessed[mode].save(out / f"keras2_{mode}_preprocess.keras", save_format="keras")
    unknown = tf_keras.Model(inputs, tf.math.cumsum(layers.Conv2D(2, 3, name="conv")(inputs)))
    unknown.save(out / "keras2_unknown_op.h5", save_format="h5")
    x = keras2_input()
    np.savez(
        out / "keras2_outputs.npz",
        ops=ops_model(x, training=False).numpy(),
        mobilenet_v3=mobilenet(x * 255.0, training=False).numpy(),
        transfer_functional=transfer(x * 255.0, training=False).numpy(),
        transfer_sequential=stacked(x * 255.0, training=False).numpy(),
        channels_first=twins[1](x, training=False).numpy(),
        caffe_preprocess=preprocessed["caffe"](x * 255.0, training=False).numpy(),
        torch_preprocess=preprocessed["torch"](x * 255.0, training=False).numpy(),
    )


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "keras2":
        _write_keras2(Path(sys.argv[2]))
    else:
        sys.exit("usage: python tests/models.py keras2 OUT_DIR")
