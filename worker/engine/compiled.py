"""One compiled program per (model, tail): the forward pass and what follows it, fused.

`compile_program(model, tail)` returns `run(batch)`: `tail(model(batch))`
compiled by the backend, once per input shape (each backend keeps its own
trace cache keyed by shape):

- JAX: `jax.jit` over `model.stateless_call`, the weights passed in as
  arguments (not baked into the program as constants);
- TensorFlow: `tf.function` without shape relaxation, so every trace sees
  static shapes (the tail's grid geometry needs them); a model whose layer
  names TensorFlow refuses as graph name scopes runs eagerly instead. A
  channels-first model on the host's CPU is compiled by XLA (`needs_xla`):
  TensorFlow's own CPU kernels for convolutions and poolings take NHWC only,
  unless its oneDNN operations are on (the default on some x86 CPUs, not on
  others), so without XLA such a model would run on some hosts and fail with
  "only supports NHWC" on the rest;
- torch: eager under `torch.no_grad()`.

`to_host(tree)` brings a result tree to numpy in one go (one device-to-host
transfer per array on JAX, started together; a TensorFlow tensor already on
the host is viewed read-only, not copied).

`compile_program(model, tail, any_batch=True)` on TensorFlow traces the
program once per image shape for every pass size, the batch dimension left
unknown to the trace (a tail that needs no static batch size: the host path's
float32 outputs). `run_sized` runs such a program on the whole pass. On 2
cores, the classic CNN's first 8 layers, a pass alone: the same CPU an image
as a program traced for that size, and 12-18% less than the split below for
passes of 5 to 7 images (3.0-3.1 against 3.4-3.7 ms of CPU an image); under
a worker's full load the CPU was the same either way (docs/benchmarks.md).

Otherwise, `run_sized(program, inputs, fills)` runs a program only on
power-of-two pass sizes, so at most log2(batch size) + 1 programs are
compiled per input shape:

- on an accelerator, a pass is padded with blank images up to the next power
  of two and run once: the blanks ride in the same kernels, nearly free;
- on the host's CPU, a blank image costs as much as a real one (a pass of 5
  padded to 8 took 23.4 ms of CPU an image against 13.7 for a pass of 4, the
  classic CNN's first 8 layers on 2 cores), so the pass is run as its binary
  decomposition instead (7 = 4 + 2 + 1) and the pieces' results joined.

`reduces_on_host()` says where a pass's outputs are reduced: by the program
itself on an accelerator, by fused host loops on a CPU (worker/engine/extract.py).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

log = logging.getLogger(__name__)

Tail = Callable[[list[Any]], Any]


def _outputs(result: Any) -> list[Any]:
    return list(result) if isinstance(result, (list, tuple)) else [result]


def compile_program(
    model: keras.Model, tail: Tail, any_batch: bool = False
) -> Callable[[np.ndarray], Any]:
    """`tail(model(batch))`, compiled; see the module's docstring. `any_batch`: one
    TensorFlow trace for every pass size (`takes_any_batch`); other backends ignore it."""
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

        return tf_function(eager, any_batch, xla=needs_xla(model))
    if backend == "torch":
        import torch

        def run(batch: np.ndarray) -> Any:
            with torch.no_grad():
                return tail(_outputs(model(batch, training=False)))

        return run
    return lambda batch: tail(_outputs(model(batch, training=False)))


def needs_xla(model: keras.Model) -> bool:
    """Whether `model`'s programs on TensorFlow are compiled by XLA: a channels-first
    model on the host's CPU (see the module's docstring)."""
    from worker.engine.layout import channels_first

    return keras.backend.backend() == "tensorflow" and not accelerated() and channels_first(model)


def tf_function(
    eager: Callable[..., Any], any_batch: bool = False, xla: bool = False
) -> Callable[..., Any]:
    """`eager` as a `tf.function` with static shapes (with `any_batch`, all but the
    batch dimension), compiled by XLA with `xla`, or eager itself for a model whose
    layer names TensorFlow refuses as graph name scopes."""
    import tensorflow as tf

    if any_batch:
        traced = _batch_free(eager, xla)
    else:
        traced = tf.function(eager, autograph=False, reduce_retracing=False, jit_compile=xla)
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

    run.any_batch = any_batch  # type: ignore[attr-defined]
    return run


def _batch_free(eager: Callable[..., Any], xla: bool = False) -> Callable[..., Any]:
    """`eager` traced once per shape and dtype of its inputs' images, for any number of
    them: the trace's inputs are (None, *image shape)."""
    import tensorflow as tf

    traced: dict[tuple, Callable[..., Any]] = {}
    lock = threading.Lock()

    def run(*args: np.ndarray) -> Any:
        key = tuple((a.shape[1:], a.dtype.str) for a in args)
        found = traced.get(key)
        if found is None:
            with lock:
                found = traced.get(key)
                if found is None:
                    spec = [tf.TensorSpec((None, *a.shape[1:]), a.dtype) for a in args]
                    found = traced[key] = tf.function(
                        eager, autograph=False, input_signature=spec, jit_compile=xla
                    )
        return found(*args)

    return run


def takes_any_batch(program: Callable[..., Any]) -> bool:
    """Whether `program` runs a pass of any size as it is (`compile_program`'s `any_batch`
    on TensorFlow): `run_sized` then neither pads nor splits it."""
    return bool(getattr(program, "any_batch", False))


def to_host(tree: Any) -> Any:
    """The result tree with every tensor as a numpy array."""
    if keras.backend.backend() == "jax":
        import jax

        return jax.device_get(tree)
    if keras.backend.backend() == "tensorflow":
        # A host tensor's buffer, viewed (read-only), not copied: `convert_to_numpy`'s
        # np.array copied a CPU pass's float32 outputs into fresh pages, 47 MB for the
        # classic CNN's 8 layers at batch 8, about 10 ms of the forward thread a pass.
        # A device tensor is copied to the host either way.
        return keras.tree.map_structure(np.asarray, tree)
    return keras.tree.map_structure(keras.ops.convert_to_numpy, tree)


@functools.cache
def accelerated() -> bool:
    """Whether the backend's programs run on an accelerator (a GPU), not the host's CPU."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return jax.default_backend() != "cpu"
    if backend == "tensorflow":
        import tensorflow as tf

        return bool(tf.config.list_physical_devices("GPU"))
    if backend == "torch":
        import torch

        return bool(torch.cuda.is_available())
    return False


def pads(pad: bool | None = None) -> bool:
    """Whether a pass is padded to one program (`pad`, default: on an accelerator)."""
    return accelerated() if pad is None else pad


def reduces_on_host(on_host: bool | None = None) -> bool:
    """Whether a pass's outputs come to the host as float32 and are reduced there
    (worker/engine/host_reduce.py): on the host's CPU, unless `on_host` says. An
    accelerator reduces them in the pass's own program (worker/engine/reduce.py)."""
    return not accelerated() if on_host is None else on_host


def padded_size(count: int) -> int:
    """The power of two a pass of `count` images is padded to on an accelerator."""
    return 1 << max(0, count - 1).bit_length()


def split_sizes(count: int) -> list[int]:
    """`count` as distinct powers of two, largest first: the passes a CPU runs a program
    of fixed pass sizes as (7 -> 4, 2, 1)."""
    return [1 << bit for bit in range(count.bit_length() - 1, -1, -1) if count >> bit & 1]


def run_sized(
    program: Callable[..., Any],
    inputs: tuple[np.ndarray, ...],
    fills: tuple[float, ...],
    pad: bool | None = None,
    join: bool = True,
) -> Any:
    """`program(*inputs)` as a host tree, every leaf N first: whole for a program that
    `takes_any_batch`, else run on power-of-two sizes only.

    `inputs` share their first dimension N; `fills` is each one's blank value.
    Padded to one pass where `pads(pad)` (on an accelerator, unless `pad` says);
    otherwise N is split into passes of distinct powers of two. With `join`
    False, the pieces' trees come as a list, in order, instead of joined (no copy).
    """
    if takes_any_batch(program):
        result = to_host(program(*inputs))
        return result if join else [result]
    count = int(inputs[0].shape[0])
    if pads(pad):
        size = padded_size(count)
        if size > count:
            inputs = tuple(
                np.concatenate([x, np.full((size - count, *x.shape[1:]), fill, x.dtype)])
                for x, fill in zip(inputs, fills, strict=True)
            )
            result = to_host(keras.tree.map_structure(lambda t: t[:count], program(*inputs)))
        else:
            result = to_host(program(*inputs))
        return result if join else [result]
    pieces, start = [], 0
    for size in split_sizes(count):
        pieces.append(to_host(program(*(x[start : start + size] for x in inputs))))
        start += size
    if not join:
        return pieces
    if len(pieces) == 1:
        return pieces[0]
    return keras.tree.map_structure(lambda *parts: np.concatenate(parts), *pieces)
