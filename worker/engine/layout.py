"""Channels-first models, seen as channels-last ones.

A model built with `data_format="channels_first"` (Theano's layout, kept by many
models trained on GPUs with Keras 2, and by models converted from PyTorch)
takes (batch, C, H, W) images, and its spatial layers output (batch, C, H, W)
maps. The engine runs such a model as it was built, and sees it as any other:
the (N, H, W, C) images it prepares are transposed to (N, C, H, W) in front of
the model, and every 4-D layer output it reads is transposed to (N, H, W, C),
inside the same compiled program. So shapes in the layer list, the grids, the
statistics, Grad-CAM and the manifest are (H, W, C) for every model.

Its convolutions and poolings (the layers whose `data_format` decides what they
compute) tell a model's layout: channels-first where they all are. A model
with both kinds is refused (InvalidModel): which of its maps are (C, H, W)
could not be told.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import keras

from producer.errors import InvalidModel
from worker.engine.graph_ops import step

CHANNELS_FIRST = "channels_first"
TO_MODEL = (0, 3, 1, 2)  # (N, H, W, C) -> (N, C, H, W)
TO_ENGINE = (0, 2, 3, 1)  # (N, C, H, W) -> (N, H, W, C)


def channels_first(model: keras.Model) -> bool:
    """Whether `model`'s convolutions and poolings (nested models' too) are
    channels-first; raises InvalidModel where some are and some are not."""
    formats = {
        layer.name: layer.data_format
        for layer in _layers(model)
        if isinstance(getattr(layer, "data_format", None), str)
        and (hasattr(layer, "kernel_size") or hasattr(layer, "pool_size"))
    }
    first = sorted(name for name, value in formats.items() if value == CHANNELS_FIRST)
    if not first:
        return False
    last = sorted(name for name, value in formats.items() if value != CHANNELS_FIRST)
    if last:
        raise InvalidModel(
            "the model mixes channels_first layers "
            f"({', '.join(first[:3])}) and channels_last ones ({', '.join(last[:3])}); "
            "which of its maps are (C, H, W) cannot be told: give its convolutions and "
            "poolings one data_format"
        )
    return True


def engine_shape(shape: tuple[Any, ...]) -> tuple[Any, ...]:
    """A channels-first model's map shape (C, H, W) as the engine shows it: (H, W, C);
    any other rank as it is."""
    return (*shape[1:], shape[0]) if len(shape) == 3 else tuple(shape)


def to_model(x: Any) -> Any:
    """(N, H, W, C) images (a Keras tensor) as a channels-first model takes them."""
    return step("nchw", lambda t: keras.ops.transpose(t, TO_MODEL), x)


def to_engine(x: Any) -> Any:
    """A channels-first model's output tensor as the engine reads it: 4-D maps
    (N, C, H, W) transposed to (N, H, W, C), anything else as it is."""
    if len(x.shape) != 4:
        return x
    return step("nhwc", lambda t: keras.ops.transpose(t, TO_ENGINE), x)


def _layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _layers(layer)
