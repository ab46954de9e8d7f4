"""Steps the engine adds to a model's graph, named so that no layer of the model
shares a name with them.

A `keras.ops` call on symbolic tensors becomes an operation of the model built
over them, named after the op: the first `keras.ops.add` of a process is "add".
A model loaded from a file keeps its own layers' names, and Keras names the
first `Add` layer of a model "add" too: a graph holding both is refused ("The
name "add" is used 2 times in the model"). So every step the engine adds (the
Grad-CAM probe, a logits head, a squeeze, a transpose) is a layer of its own,
named `actviz_<what>_<n>`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras


class Step(keras.layers.Layer):
    """`function` of a call's tensors, as a layer of the engine's own name."""

    def __init__(self, function: Callable[..., Any], what: str) -> None:
        uid = keras.backend.get_uid(f"actviz_{what}")
        # autocast off: a step hands on the dtype it is given (float16 maps, uint8 pixels).
        super().__init__(name=f"actviz_{what}_{uid}", autocast=False)
        self.function = function

    def call(self, *tensors: Any) -> Any:
        return self.function(*tensors)


def step(what: str, function: Callable[..., Any], *tensors: Any) -> Any:
    """`function(*tensors)` on symbolic tensors, added to their graph as one `Step`."""
    return Step(function, what)(*tensors)
