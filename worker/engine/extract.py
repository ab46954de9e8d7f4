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

import functools
import math
import threading
from collections.abc import Callable
from typing import Any

import keras
import numpy as np

from worker.engine.compiled import compile_program, reduces_on_host, run_sized
from worker.engine.graph_ops import step
from worker.engine.host_reduce import reduce_image
from worker.engine.layers import LayerRef, is_graph_model
from worker.engine.layout import channels_first, engine_shape, to_engine, to_model
from worker.engine.reduce import HostLayer, LayerPlan, RenderKey, reduce_outputs

KNOWN_SHAPES = 256  # input shapes whose output shapes an extractor remembers


def _dims(shape: tuple[int | None, ...]) -> list[int]:
    return [1 if d is None else int(d) for d in shape]


class Extractor:
    """The selected layers of one model: one multi-output `keras.Model`.

    `reduce(batch, key)` is the pipeline's pass. On an accelerator, the forward
    pass and the on-device reduction are one compiled program per `RenderKey`,
    with only uint8 grids and statistics coming back; on a CPU, the program is
    the forward pass alone and each (layer, image) is reduced on the host when
    it is taken (worker/engine/host_reduce.py). `extractor(batch)` is a plain
    eager pass that returns every layer as float32 (N, *output_shape), in the
    order of `refs`. `batch` is (N, H, W, C) float32, already preprocessed.
    """

    def __init__(self, model: keras.Model, refs: list[LayerRef]) -> None:
        self.model = model
        self.refs = refs
        self._shapes: dict[tuple[int, ...], list[tuple[int, ...]]] = {}
        self._programs: dict[RenderKey, Any] = {}
        self._radii: dict[tuple[int, ...], list[int | None]] = {}
        self._lock = threading.Lock()

    def output_shapes(self, shape: tuple[int, ...]) -> list[tuple[int, ...]]:
        """Per-image output shape of every selected layer for an input of `shape` (H, W, C).

        Computed symbolically (no forward pass, nothing allocated) and cached per shape.
        """
        shape = tuple(int(s) for s in shape)
        with self._lock:
            known = self._shapes.get(shape)
        if known is not None:
            return known
        spec = self.model.compute_output_spec(keras.KerasTensor((1, *shape)))
        outputs = spec if isinstance(spec, (list, tuple)) else [spec]
        found = [tuple(_dims(o.shape[1:])) for o in outputs]
        with self._lock:
            if len(self._shapes) >= KNOWN_SHAPES:
                self._shapes.clear()
            self._shapes[shape] = found
        return found

    def receptive_radii(self, shape: tuple[int, ...]) -> list[int | None]:
        """Per selected layer, its measured receptive-field radius in input pixels for
        inputs of `shape` (worker/engine/receptive.py); measured once per shape."""
        from worker.engine.receptive import measure_radii

        shape = tuple(int(s) for s in shape)
        with self._lock:
            known = self._radii.get(shape)
        if known is None:
            known = measure_radii(self, shape)
            with self._lock:
                self._radii[shape] = known
        return known

    def output_bytes(self, shape: tuple[int, ...]) -> int:
        """Float32 bytes of every selected layer's output for one image of `shape` (H, W, C)."""
        return 4 * sum(math.prod(o) for o in self.output_shapes(shape))

    def activation_bytes(self, shape: tuple[int, ...]) -> int:
        """Float32 bytes one image of preprocessed `shape` (H, W, C) makes: input + outputs."""
        return 4 * math.prod(int(s) for s in shape) + self.output_bytes(shape)

    def program(self, key: RenderKey | None) -> Any:
        """The compiled forward pass + reduction for `key`, built once per key; for `None`,
        the forward pass alone, every output as float32 (on TensorFlow one trace for
        every pass size: worker/engine/compiled.py `takes_any_batch`)."""
        with self._lock:
            found = self._programs.get(key)
            if found is None:
                tail = _as_float32 if key is None else functools.partial(reduce_outputs, key=key)
                found = self._programs[key] = compile_program(
                    self.model, tail, any_batch=key is None
                )
        return found

    def reduce(self, batch: np.ndarray, key: RenderKey, on_host: bool | None = None) -> ReducedPass:
        """One compiled pass over (N, H, W, C) `batch`, reduced for `key`.

        Reduced in the program, only its results reaching the host, on an
        accelerator; on the host, layer by layer as they are taken, on a CPU
        (`on_host`: see worker/engine/compiled.py `reduces_on_host`). The program
        reduced on the device runs on power-of-two pass sizes only (`run_sized`):
        padded with blank images on an accelerator, split on a CPU. The host's
        program runs whole on TensorFlow, one trace for every pass size.
        """
        plans = [LayerPlan.of(s, key.max_side) for s in self.output_shapes(batch.shape[1:])]
        if not reduces_on_host(on_host):
            outputs = run_sized(self.program(key), (batch,), (0.0,))
            return ReducedPass(outputs, plans, int(batch.shape[0]))
        # Each layer as its images' float32 outputs, views into the passes' own arrays.
        pieces = run_sized(self.program(None), (batch,), (0.0,), join=False)
        layers = [[image for piece in pieces for image in piece[i]] for i in range(len(plans))]
        return ReducedPass(layers, plans, int(batch.shape[0]), key)

    def __call__(self, batch: np.ndarray) -> list[np.ndarray]:
        """Every selected layer's float32 output on the host: the forward pass's program
        alone (`program(None)`), without the pipeline's reduction."""
        return list(run_sized(self.program(None), (batch,), (0.0,)))


class ReducedPass:
    """The host copy of one pass: per layer, per image, a `HostLayer`.

    Each layer is either the program's reduced arrays (a dict, N first), or,
    when `key` is given, its images' float32 outputs (a list), which
    `layer(i, position)` reduces for that image on the calling thread.
    `release(i)` drops layer i once every image has taken it. `d2h_bytes` is
    what the program returned to the host; `activation_bytes` what the pass's
    float32 outputs held where they were computed.
    """

    def __init__(
        self,
        layers: list[Any],
        plans: list[LayerPlan],
        count: int,
        key: RenderKey | None = None,
    ):
        self._layers: list[Any] = list(layers)
        self.plans = plans
        self.count = count
        self.key = key
        parts = (layer if key is not None else layer.values() for layer in layers)
        self.d2h_bytes = int(sum(a.nbytes for part in parts for a in part))
        # What the pass's outputs hold on the device, float32, every layer and image.
        self.activation_bytes = 4 * count * sum(math.prod(p.shape) for p in plans)

    def __len__(self) -> int:
        return len(self.plans)

    def layer(self, i: int, position: int) -> HostLayer:
        arrays = self._layers[i]
        if arrays is None:
            raise RuntimeError(f"layer output {i} was released")
        if self.key is not None:
            return HostLayer(
                plan=self.plans[i], **reduce_image(arrays[position], self.plans[i], self.key)
            )
        picked = {name: array[position] for name, array in arrays.items()}
        return HostLayer(plan=self.plans[i], **picked)

    def release(self, i: int) -> None:
        self._layers[i] = None


def _as_float32(outputs: list[Any]) -> list[Any]:
    return [keras.ops.cast(x, "float32") for x in outputs]


def build_extractor(model: keras.Model, refs: list[LayerRef]) -> Extractor:
    """Build the multi-output model for `refs` (LayerRefs of `model`).

    The graph is always traced anew rather than reusing `layer.output`: a
    deserialized Sequential model can carry several stale inbound nodes per
    layer, and a model over those would run some layers many times.
    """
    inputs, fed = image_input(model)
    traced: dict[int, Any] = {}
    trace(model, fed, traced)
    outputs = [traced[id(ref.layer)] for ref in refs]
    if channels_first(model):
        outputs = [to_engine(output) for output in outputs]
    return Extractor(keras.Model(inputs, outputs), refs)


def image_input(model: keras.Model) -> tuple[Any, Any]:
    """A new `keras.Input` for `model`'s images, (H, W, C), and the tensor to trace its
    graph on: that input, or for a model that takes (batch, H, W) (a grayscale image
    without a channel axis, as MNIST's models often do), that input without its axis of
    one channel; for a channels-first model, that input transposed to (N, C, H, W)
    (worker/engine/layout.py). Every pass the engine builds is fed (N, H, W, C) images
    this way."""
    source = model.inputs[0]
    shape = tuple(source.shape[1:])
    if len(shape) == 2:
        inputs = keras.Input(shape=(*shape, 1), dtype=source.dtype)
        return inputs, step("squeeze", lambda x: keras.ops.squeeze(x, axis=-1), inputs)
    if len(shape) == 3 and channels_first(model):
        inputs = keras.Input(shape=engine_shape(shape), dtype=source.dtype)
        return inputs, to_model(inputs)
    inputs = keras.Input(shape=shape, dtype=source.dtype)
    return inputs, inputs


def extract(loaded: Any, batch: np.ndarray, refs: list[LayerRef]) -> list[np.ndarray]:
    """Raw activations of `refs` for a preprocessed (N, H, W, C) float32 batch.

    Uses the cached extractor of `loaded` (a LoadedModel) for that layer set.
    """
    return loaded.extractor([ref.name for ref in refs])(batch)


# Called with (layer, args, kwargs, output) after each traced call; returns what the
# rest of the graph sees instead of `output` (the recorded tensor stays `output`).
Hook = Callable[[keras.layers.Layer, tuple[Any, ...], dict[str, Any], Any], Any]


def trace(model: keras.Model, inputs: Any, traced: dict[int, Any], hook: Hook | None = None) -> Any:
    """Re-call `model`'s layers on `inputs`, recording each layer's output tensor in
    `traced` (by `id(layer)`); returns the model's output. `hook` may change what
    a layer hands on (Grad-CAM adds its probe there, worker/engine/gradcam.py)."""
    if isinstance(model, keras.Sequential):
        x = inputs
        for layer in model.layers:
            x = _call(layer, traced, hook)(x)
        return x
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            traced.setdefault(id(layer), inputs)
    # Functional: replay its node graph with our own call for every operation.
    return model._run_through_graph(inputs, operation_fn=lambda op: _call(op, traced, hook))


def _call(
    layer: keras.layers.Layer, traced: dict[int, Any], hook: Hook | None = None
) -> Callable[..., Any]:
    def run(*args: Any, **kwargs: Any) -> Any:
        nested = is_graph_model(layer)
        output = trace(layer, args[0], traced, hook) if nested else layer(*args, **kwargs)
        # A shared layer shows its first call; a multi-output layer its first output.
        first = output[0] if isinstance(output, (list, tuple)) else output
        traced.setdefault(id(layer), first)
        return output if hook is None else hook(layer, args, kwargs, output)

    return run
