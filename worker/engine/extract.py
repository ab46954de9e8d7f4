"""One forward pass that returns the outputs of many layers at once.

An `Extractor` is a single multi-output `keras.Model` over the selected
layers, built once per (model, layer set) and cached on the `LoadedModel`.
The graph is traced again on a fresh `keras.Input`: every layer (and every
layer of every nested model, whose inner layers have no tensor in the outer
graph) is re-called on symbolic tensors, which shares the weights and yields
one tensor per layer.
Only Keras APIs are used, so any Keras backend runs it.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from worker.engine.layers import LayerRef, is_graph_model

KNOWN_SHAPES = 256  # input shapes whose activation bytes an extractor remembers


def _dims(shape: tuple[int | None, ...]) -> list[int]:
    return [1 if d is None else int(d) for d in shape]


class Extractor:
    """`extractor(batch)` -> one float32 array per selected layer.

    `batch` is (N, H, W, C) float32, already preprocessed; each result is
    (N, *layer.output_shape) float32, in the order of `refs`.
    """

    def __init__(self, model: keras.Model, refs: list[LayerRef]) -> None:
        self.model = model
        self.refs = refs
        self._sizes: dict[tuple[int, ...], int] = {}
        self._sizes_lock = threading.Lock()

    def activation_bytes(self, shape: tuple[int, ...]) -> int:
        """Float32 bytes one image of preprocessed `shape` (H, W, C) makes: input + outputs.

        Computed symbolically (no forward pass, nothing allocated) and cached per shape.
        """
        shape = tuple(int(s) for s in shape)
        with self._sizes_lock:
            known = self._sizes.get(shape)
        if known is not None:
            return known
        spec = self.model.compute_output_spec(keras.KerasTensor((1, *shape)))
        outputs = spec if isinstance(spec, (list, tuple)) else [spec]
        total = 4 * (math.prod(shape) + sum(math.prod(_dims(o.shape[1:])) for o in outputs))
        with self._sizes_lock:
            if len(self._sizes) >= KNOWN_SHAPES:
                self._sizes.clear()
            self._sizes[shape] = total
        return total

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        outputs = self.forward(batch)
        return [outputs.host(i) for i in range(len(outputs))]

    def forward(self, batch: np.ndarray) -> LayerOutputs:
        """One forward pass; its outputs stay the backend's until `host(i)` asks for a layer."""
        outputs = self.model(batch, training=False)
        if not isinstance(outputs, (list, tuple)):
            outputs = [outputs]
        return LayerOutputs(list(outputs))


class LayerOutputs:
    """The outputs of one forward pass, copied to host float32 one layer at a time.

    `host(i)` copies layer i (all images of the pass) once and drops the
    backend's tensor; `release(i)` drops the copy. A caller that renders
    layer by layer and releases each layer when done holds, on the host, only
    the layers in flight instead of a float32 copy of every layer. `nbytes`
    is the pass's float32 size (all layers), `peak_bytes` the most host bytes
    held at once so far. Thread-safe.
    """

    def __init__(self, tensors: list[Any]) -> None:
        self._tensors: list[Any] = tensors
        self._host: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()
        self.nbytes = int(sum(4 * math.prod(tuple(t.shape)) for t in tensors))
        self.live_bytes = 0
        self.peak_bytes = 0

    def __len__(self) -> int:
        return len(self._tensors)

    def host(self, i: int) -> np.ndarray:
        with self._lock:
            array = self._host.get(i)
            if array is None:
                tensor = self._tensors[i]
                if tensor is None:
                    raise RuntimeError(f"layer output {i} was released")
                array = np.asarray(keras.ops.convert_to_numpy(tensor), dtype=np.float32)
                self._host[i] = array
                self._tensors[i] = None
                self.live_bytes += array.nbytes
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            return array

    def release(self, i: int) -> None:
        with self._lock:
            array = self._host.pop(i, None)
            self._tensors[i] = None
            if array is not None:
                self.live_bytes -= array.nbytes


def build_extractor(model: keras.Model, refs: list[LayerRef]) -> Extractor:
    """Build the multi-output model for `refs` (LayerRefs of `model`).

    The graph is always traced anew rather than reusing `layer.output`: a
    deserialized Sequential model can carry several stale inbound nodes per
    layer, and a model over those would run some layers many times.
    """
    source = model.inputs[0]
    inputs = keras.Input(shape=tuple(source.shape[1:]), dtype=source.dtype)
    traced: dict[int, Any] = {}
    _trace(model, inputs, traced)
    outputs = [traced[id(ref.layer)] for ref in refs]
    return Extractor(keras.Model(inputs, outputs), refs)


def extract(loaded: Any, batch: np.ndarray, refs: list[LayerRef]) -> list[np.ndarray]:
    """Raw activations of `refs` for a preprocessed (N, H, W, C) float32 batch.

    Uses the cached extractor of `loaded` (a LoadedModel) for that layer set.
    """
    return loaded.extractor([ref.name for ref in refs])(batch)


def _trace(model: keras.Model, inputs: Any, traced: dict[int, Any]) -> Any:
    """Re-call `model`'s layers on `inputs`, recording each layer's output tensor."""
    if isinstance(model, keras.Sequential):
        x = inputs
        for layer in model.layers:
            x = _call(layer, traced)(x)
        return x
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            traced.setdefault(id(layer), inputs)
    # Functional: replay its node graph with our own call for every operation.
    return model._run_through_graph(inputs, operation_fn=lambda op: _call(op, traced))


def _call(layer: keras.layers.Layer, traced: dict[int, Any]) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        nested = is_graph_model(layer)
        output = _trace(layer, args[0], traced) if nested else layer(*args, **kwargs)
        # A shared layer shows its first call; a multi-output layer its first output.
        first = output[0] if isinstance(output, (list, tuple)) else output
        traced.setdefault(id(layer), first)
        return output

    return run
