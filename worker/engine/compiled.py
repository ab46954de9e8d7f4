"""One compiled program per (model, tail): the forward pass and what follows it, fused.

`compile_program(model, tail)` returns `run(batch)`: `tail(model(batch))`
compiled by the backend, once per input shape (each backend keeps its own
trace cache keyed by shape):

- JAX: `jax.jit` over `model.stateless_call`, the weights passed in as
  arguments (not baked into the program as constants);
- TensorFlow: `tf.function` without shape relaxation, so every trace sees
  static shapes (the tail's grid geometry needs them); a model whose layer
  names TensorFlow refuses as graph name scopes runs eagerly instead;
- torch: eager under `torch.no_grad()`.

`to_host(tree)` copies a result tree to numpy in one go (one device-to-host
transfer per array on JAX, started together).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

log = logging.getLogger(__name__)

Tail = Callable[[list[Any]], Any]


def _outputs(result: Any) -> list[Any]:
    return list(result) if isinstance(result, (list, tuple)) else [result]


def compile_program(model: keras.Model, tail: Tail) -> Callable[[np.ndarray], Any]:
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        def step(trainable: Any, non_trainable: Any, batch: Any) -> Any:
            result, _ = model.stateless_call(trainable, non_trainable, batch, training=False)
            return tail(_outputs(result))

        jitted = jax.jit(step)

        def run(batch: Any) -> Any:
            # The variables' current arrays, read per call: Keras may replace them
            # (a `predict` on the same model frees and restores its state).
            trainable = [v.value for v in model.trainable_variables]
            non_trainable = [v.value for v in model.non_trainable_variables]
            return jitted(trainable, non_trainable, batch)

        return run
    if backend == "tensorflow":

        def eager(batch: Any) -> Any:
            return tail(_outputs(model(batch, training=False)))

        return tf_function(eager)
    if backend == "torch":
        import torch

        def run(batch: np.ndarray) -> Any:
            with torch.no_grad():
                return tail(_outputs(model(batch, training=False)))

        return run
    return lambda batch: tail(_outputs(model(batch, training=False)))


def tf_function(eager: Callable[..., Any]) -> Callable[..., Any]:
    """`eager` as a `tf.function` with static shapes, or eager itself for a model
    whose layer names TensorFlow refuses as graph name scopes."""
    import tensorflow as tf

    traced = tf.function(eager, autograph=False, reduce_retracing=False)
    chosen: list[Callable[..., Any]] = [traced]

    def run(*args: Any) -> Any:
        try:
            return chosen[0](*args)
        except ValueError as exc:
            # A graph's name scopes must match [A-Za-z0-9_.\/>-]*; Keras opens one per
            # layer name, and a model's layer names are anything its author chose.
            if chosen[0] is eager or "scope name" not in str(exc):
                raise
            log.warning("layer names TensorFlow cannot trace; running this model eagerly")
            chosen[0] = eager
            return eager(*args)

    return run


def to_host(tree: Any) -> Any:
    """The result tree with every tensor as a numpy array."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.device_get(tree)
    return keras.tree.map_structure(keras.ops.convert_to_numpy, tree)
