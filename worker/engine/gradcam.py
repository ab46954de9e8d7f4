"""Grad-CAM: where a model looked for a class, in one compiled forward and backward pass.

    cam = loaded.cam("block5_conv3")     # built once per (model, layer), kept warm
    result = cam.run(pixels, requested, CamKey(count=1, method="gradcam", predictions=5))

A `CamModel` is the model traced again (as the extractor is, so nested models
and legacy files work the same) with a probe at the chosen layer: the rest of
the graph sees the layer's output A plus P, a zero tensor fed as a second
input. The gradient of a class score with respect to P, at P = 0, is its
gradient with respect to A, on every backend and wherever the layer sits (an
inner layer of a nested base model has no tensor in the outer graph at which
the model could be split in two).

Scores: when the head ends in a softmax (a Dense or Activation with
activation='softmax', or a Softmax layer) the gradient is the class's logit's,
the softmax's input (the score y^c of the Grad-CAM paper and of Chollet's
recipe), and the predictions are the probabilities. Otherwise the model's own
outputs serve for both, and the manifest says 'raw'. A per-pixel output
(batch, H, W, classes), a segmentation model's, is explained as Seg-Grad-CAM
(Vinogradova et al., 2020) with the whole image as the region, as
pytorch-grad-cam's `SemanticSegmentationTarget` with a mask of ones: the
gradient is that of the class's score (its logit under a softmax head, a
convolution's too) summed over every pixel; its shown score, the mean over
every pixel (for probabilities, the share of the image the class takes).

Heatmaps, for each image n and class slot k (`cam_maps`):

    gradcam:   w_c = mean_ij dy/dA_ijc
    gradcam++: w_c = sum_ij relu(g_ijc) * g_ijc^2 / (2 g_ijc^2 + sum_ab A_abc g_ijc^3)
    map = relu(sum_c w_c A_ijc) / max_ij(...)      (0 where the maximum is 0)

One program per (`CamKey`, input shape), each backend's own way:

- JAX: `jax.jit` over `jax.vjp` of `model.stateless_call`; the K classes'
  cotangents go through one `vmap`ped pullback;
- TensorFlow: a `tf.function` around a persistent `GradientTape`, one gradient
  per class slot (eager for layer names TensorFlow cannot trace);
- torch: `torch.autograd.grad` per class slot, the graph retained between them.

`requested` is (N, K) int32: a class index per image and slot, or -1 for
"the slot's rank among the top predictions" (slot 0: the top-1 class). Only
the heatmaps at the layer's resolution, the classes and the top predictions
come back to the host.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np

from producer.errors import InvalidJob, NotDifferentiable
from worker.engine.compiled import needs_xla, run_sized, tf_function
from worker.engine.extract import KNOWN_SHAPES, image_input, trace
from worker.engine.graph_ops import step
from worker.engine.layers import LayerRef, select_layers
from worker.engine.layout import channels_first, to_engine, to_model


@dataclass(frozen=True)
class CamKey:
    """What one compiled Grad-CAM program depends on besides the input shape.

    `count`: class slots per image (K); `predictions`: top predictions returned (P).
    """

    count: int
    method: str
    predictions: int


class CamModel:
    """One model with a probe at one layer; see the module doc.

    `ref` is the layer, `classes` the explained output's size (M), `softmax`
    whether its head ends in a softmax (then the gradient is the logit's), `output`
    the name of that output's layer where the model has several (`explained_output`),
    `pixels` whether it is per pixel (a segmentation model's; see the module doc).
    """

    def __init__(
        self,
        graph: keras.Model,
        features: keras.Model,
        ref: LayerRef,
        classes: int,
        softmax: bool,
        output: str | None = None,
        pixels: bool = False,
    ) -> None:
        self.graph = graph
        self.features = features
        self.ref = ref
        self.classes = classes
        self.softmax = softmax
        self.output = output
        self.pixels = pixels
        self._shapes: dict[tuple[int, ...], tuple[int, ...]] = {}
        self._programs: dict[CamKey, Any] = {}
        self._lock = threading.Lock()

    def feature_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """(h, w, C) of the layer's output for an input of `shape` (H, W, C); symbolic, cached."""
        shape = tuple(int(s) for s in shape)
        with self._lock:
            found = self._shapes.get(shape)
        if found is None:
            spec = self.features.compute_output_spec(keras.KerasTensor((1, *shape)))
            found = tuple(int(d) for d in spec.shape[1:])
            with self._lock:
                if len(self._shapes) >= KNOWN_SHAPES:
                    self._shapes.clear()
                self._shapes[shape] = found
        return found

    def image_bytes(self, shape: tuple[int, ...], count: int) -> int:
        """Float32 bytes one image of `shape` needs beyond the forward pass's own:
        the input, the layer's output, and one gradient of it per class slot."""
        return 4 * (math.prod(shape) + (1 + count) * math.prod(self.feature_shape(shape)))

    def check_classes(self, classes: list[int] | None) -> None:
        """Raise InvalidJob for a class index the model does not have."""
        for index in classes or []:
            if index >= self.classes:
                raise InvalidJob(
                    f"class {index} is out of range: the model has {self.classes} "
                    f"class{'es' if self.classes != 1 else ''} (0..{self.classes - 1})"
                )

    def key(self, classes: list[int] | None, top: int | None, method: str, predictions: int):
        """(CamKey, requested row) for one image's options; raises InvalidJob (see check_classes)."""
        self.check_classes(classes)
        row = list(classes) if classes else [-1] * min(top or 1, self.classes)
        count = len(row)
        shown = min(self.classes, max(predictions, count))
        return CamKey(count=count, method=method, predictions=shown), row

    def program(self, key: CamKey) -> Any:
        with self._lock:
            found = self._programs.get(key)
            if found is None:
                found = self._programs[key] = _compile(self, key)
        return found

    def run(self, batch: np.ndarray, requested: np.ndarray, key: CamKey) -> dict[str, np.ndarray]:
        """One pass over (N, H, W, C) `batch`; host arrays keyed by name, N first:

        maps (N, K, h, w) float32 in [0, 1], peaks (N, K) (each map's maximum
        before normalizing), classes (N, K), class_scores (N, K),
        top_classes (N, P), top_scores (N, P).
        It runs on power-of-two pass sizes only, as the extractor's pass does
        (worker/engine/compiled.py `run_sized`); a blank image requests no class (-1).
        """
        requested = np.asarray(requested, dtype=np.int32)
        host = run_sized(self.program(key), (batch, requested), (0.0, -1))
        return {name: np.asarray(array) for name, array in host.items()}


def cam_candidates(model: keras.Model, refs: list[LayerRef]) -> tuple[list[LayerRef], Any, int]:
    """The layers Grad-CAM can use (an (H, W, C) output on the way to the model's
    output it explains, `explained_output`, other than the layer making that output: a
    per-pixel head's), in model order; that output as traced, and its index."""
    _, fed = image_input(model)
    traced: dict[int, Any] = {}
    outputs = keras.tree.flatten(trace(model, fed, traced))
    index = explained_output(model, outputs)
    output, head = outputs[index], head_layer(model, index)
    upstream = _ancestors(output)
    found = [
        ref
        for ref in refs
        if ref.spatial
        and not ref.is_input
        and not ref.container
        and ref.layer is not head
        and id(traced.get(id(ref.layer))) in upstream
    ]
    return found, output, index


def build_cam_model(
    model: keras.Model, refs: list[LayerRef], layer: str | None, region: str = "image"
) -> CamModel:
    """The CamModel of `model` at `layer` (a name, 'outer/inner', or an index); None
    picks the last layer with an (H, W, C) output on the way to the output, larger than
    1 x 1 where one is (`default_layer`).

    Raises InvalidJob for a layer that is not (H, W, C), not on the way to the
    output, a model whose output is neither (batch, classes) nor per pixel, or a
    `region` other than "image" for a model whose output is not per pixel;
    NotDifferentiable for a model whose output is not floating point.
    """
    transposed = channels_first(model)  # the probe and features are (H, W, C) all the same
    candidates, output, index = cam_candidates(model, refs)
    check_output(output, transposed)
    ref = choose_layer(refs, candidates, layer)
    head = head_layer(model, index)
    softmax = _ends_in_softmax(head)
    pixels = output_kind(output, transposed) == "pixels"
    if region != "image" and not pixels:
        raise InvalidJob(
            f"region {region!r} applies to a per-pixel (segmentation) output; this model's "
            f"is {tuple(output.shape)}: leave region out"
        )
    classes = output_classes(output, transposed)
    inputs, fed = image_input(model)
    # The layer's own dtype: the model's input may be integer (uint8 pixels), its maps not.
    dtype = getattr(ref.layer, "compute_dtype", None) or keras.config.floatx()
    probe = keras.Input(shape=tuple(ref.output_shape), dtype=dtype, name="actviz_probe")
    seen: dict[str, Any] = {}

    def hook(layer: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
        if layer is ref.layer and "features" not in seen:
            seen["features"] = to_engine(out) if transposed else out
            return step("probe", keras.ops.add, out, to_model(probe) if transposed else probe)
        if layer is head and softmax and "logits" not in seen:
            seen["logits"] = _logits(layer, args[0])
        return out

    probs = keras.tree.flatten(trace(model, fed, {}, hook))[index]
    scores = seen["logits"] if softmax else probs
    if pixels:  # each class's scores summed over the region; shown, their mean
        axes, axis = ((2, 3), 1) if transposed else ((1, 2), -1)

        def summed(scores: Any, probs: Any) -> Any:
            if region == "predicted":  # each pixel counts for the class it is assigned
                winner = keras.ops.argmax(probs, axis=axis)
                mask = keras.ops.one_hot(winner, classes, axis=axis, dtype=scores.dtype)
                scores = scores * mask
            return keras.ops.sum(scores, axis=axes)

        outputs = [
            seen["features"],
            step("class_sums", summed, scores, probs),
            step("class_means", lambda t: keras.ops.mean(t, axis=axes), probs),
        ]
    else:
        outputs = [seen["features"], scores, probs] if softmax else [seen["features"], probs]
    graph = keras.Model([inputs, probe], outputs, name=f"{model.name}_gradcam")
    features = keras.Model(inputs, seen["features"])
    named = head.name if len(model.outputs) > 1 else None
    return CamModel(graph, features, ref, classes, softmax, named, pixels)


def cam_maps(acts: Any, grads: Any, method: str) -> tuple[Any, Any]:
    """(maps (N, K, h, w) in [0, 1], peaks (N, K)) from acts (N, h, w, C) and grads
    (K, N, h, w, C), with keras.ops (every backend; see the module doc)."""
    ops = keras.ops
    g = ops.transpose(grads, (1, 0, 2, 3, 4))
    if method == "gradcam++":
        g2 = g * g
        total = ops.sum(acts, axis=(1, 2))[:, None, None, None, :]
        denom = 2.0 * g2 + total * g2 * g
        safe = ops.where(denom != 0, denom, ops.ones_like(denom))
        alpha = ops.where(g != 0, g2 / safe, ops.zeros_like(g))
        weights = ops.sum(alpha * ops.relu(g), axis=(2, 3))
    else:
        weights = ops.mean(g, axis=(2, 3))
    cam = ops.relu(ops.einsum("nhwc,nkc->nkhw", acts, weights))
    peaks = ops.max(cam, axis=(2, 3))
    scale = ops.where(peaks > 0, peaks, ops.ones_like(peaks))[:, :, None, None]
    return cam / scale, peaks


# ---- building ---------------------------------------------------------------


def explained_output(model: keras.Model, outputs: list[Any] | None = None) -> int:
    """Which of the model's outputs (flattened as `keras.tree.flatten` orders them, a
    dict's by key) Grad-CAM explains: a (batch, classes) one before a per-pixel
    (batch, H, W, classes) one (`output_kind`), and of each kind one whose layer ends
    in a softmax first; the first output where none qualifies (`check_output` then
    refuses it, saying why). A detector's or multi-task model's class head, not its
    box regression."""
    outputs = list(model.outputs) if outputs is None else outputs
    first = channels_first(model)
    ranked = [
        (output_kind(out, first) != "classes", not _ends_in_softmax(head_layer(model, i)), i)
        for i, out in enumerate(outputs)
        if output_kind(out, first) is not None
    ]
    return min(ranked)[2] if ranked else 0


def output_kind(output: Any, first: bool = False) -> str | None:
    """What a floating-point output is: "classes" for (batch, classes), "pixels" for a
    per-pixel (batch, H, W, classes) ((batch, classes, H, W) on a channels-first model,
    `first`); None for anything else."""
    if not str(output.dtype).startswith(("float", "bfloat")):
        return None
    if len(output.shape) == 2 and output.shape[-1] is not None:
        return "classes"
    if len(output.shape) == 4 and output_classes(output, first) is not None:
        return "pixels"
    return None


def output_classes(output: Any, first: bool = False) -> int | None:
    """The number of classes of a (batch, classes) or per-pixel output; None where free."""
    size = output.shape[1] if len(output.shape) == 4 and first else output.shape[-1]
    return None if size is None else int(size)


def _ancestors(tensor: Any) -> set[int]:
    """ids of every symbolic tensor `tensor` is computed from, itself included."""
    seen: set[int] = set()
    stack = [tensor]
    while stack:
        current = stack.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        history = getattr(current, "_keras_history", None)
        if history is None:
            continue
        operation, node_index, _ = history
        stack.extend(operation._inbound_nodes[node_index].input_tensors)
    return seen


def check_output(output: Any, first: bool = False) -> None:
    """Raise InvalidJob for an output that is neither (batch, classes) nor per-pixel
    (batch, H, W, classes), NotDifferentiable for one that is not floating point."""
    if len(output.shape) in (2, 4) and not str(output.dtype).startswith(("float", "bfloat")):
        raise NotDifferentiable(
            f"the model's output is {output.dtype}: a class score must be floating point "
            "for its gradient to exist (an argmax or a cast at the head has none)"
        )
    if output_kind(output, first) is None:
        raise InvalidJob(
            f"Grad-CAM explains a classifier's scores: the model's output must be "
            f"(batch, classes), or (batch, H, W, classes) per pixel, and this one is "
            f"{tuple(output.shape)}"
        )


def choose_layer(refs: list[LayerRef], candidates: list[LayerRef], layer: str | None) -> LayerRef:
    valid = ", ".join(ref.name for ref in candidates) or "none"
    if layer is None:
        if not candidates:
            raise InvalidJob(
                "the model has no layer with an (H, W, C) output on the way to its output; "
                "Grad-CAM needs one"
            )
        return default_layer(candidates)
    from producer.errors import UnknownLayer

    try:
        found = select_layers(refs, layer)
    except UnknownLayer as exc:
        raise InvalidJob(
            f"Grad-CAM layer: {exc.message}. Layers Grad-CAM can use: {valid}"
        ) from None
    if len(found) != 1:
        raise InvalidJob(
            f"Grad-CAM layer {layer!r} selects {len(found)} layers; name one of: {valid}"
        )
    ref = found[0]
    if ref not in candidates:
        why = (
            f"its output is {tuple(ref.output_shape)}, not (H, W, C)"
            if not ref.spatial or ref.container or ref.is_input
            else "it is not on the way to the model's output"
        )
        raise InvalidJob(
            f"Grad-CAM cannot use layer '{ref.name}': {why}. Layers it can use: {valid}"
        )
    return ref


def default_layer(candidates: list[LayerRef]) -> LayerRef:
    """The last candidate whose map is more than one pixel (a free side counts as more):
    heads such as MobileNetV3's pool to 1 x 1 and go on with 1 x 1 convolutions, on
    which a heatmap is one value. The last candidate where every map is 1 x 1."""
    wide = [ref for ref in candidates if tuple(ref.output_shape[:2]) != (1, 1)]
    return (wide or candidates)[-1]


def head_layer(model: keras.Model, index: int = 0) -> Any:
    """The layer that makes the model's output `index` (`model.outputs`' order), inside
    nested models too (a nested model's first)."""
    from worker.engine.layers import is_graph_model

    if isinstance(model, keras.Sequential):
        layer = model.layers[-1]
    else:
        layer = model.outputs[index]._keras_history[0]
    return head_layer(layer) if is_graph_model(layer) else layer


def _ends_in_softmax(layer: Any) -> bool:
    """A Softmax layer, or a Dense, Activation or convolution (a per-pixel head's) with
    activation='softmax'."""
    if isinstance(layer, keras.layers.Softmax):
        return True
    activation = getattr(layer, "activation", None)
    kinds = (keras.layers.Dense, keras.layers.Activation)
    if not ((isinstance(layer, kinds) or _is_convolution(layer)) and activation):
        return False
    return getattr(activation, "__name__", "") == "softmax"


def _is_convolution(layer: Any) -> bool:
    """A Conv1D/2D/3D (Keras's convolutions that compute `convolution_op` + bias)."""
    return callable(getattr(layer, "convolution_op", None)) and hasattr(layer, "kernel")


def _logits(layer: Any, x: Any) -> Any:
    """The input of `layer`'s softmax for input `x` (the layer ends in one)."""
    if isinstance(layer, keras.layers.Dense):
        kernel, bias = layer.kernel, layer.bias if layer.use_bias else None

        def logits(x: Any) -> Any:
            out = keras.ops.matmul(x, kernel)
            return out if bias is None else keras.ops.add(out, bias)

        return step("logits", logits, x)
    if _is_convolution(layer):  # what Keras's convolution computes before its activation
        kernel, bias = layer.kernel, layer.bias if layer.use_bias else None
        last = layer.data_format == "channels_last"
        shape = (1,) * (layer.rank + 1) + (-1,) if last else (1, -1) + (1,) * layer.rank

        def conv_logits(x: Any) -> Any:
            out = layer.convolution_op(x, kernel)
            return out if bias is None else keras.ops.add(out, keras.ops.reshape(bias, shape))

        return step("logits", conv_logits, x)
    return x  # an Activation('softmax') or Softmax layer: its input is the logits


# ---- compiling ---------------------------------------------------------------


def _compile(cam: CamModel, key: CamKey) -> Any:
    backend = keras.backend.backend()
    if backend == "jax":
        return _jax_program(cam, key)
    if backend == "tensorflow":
        return _tf_program(cam, key)
    if backend == "torch":
        return _torch_program(cam, key)
    raise NotDifferentiable(f"Grad-CAM has no gradient on the {backend!r} backend")


def _split(cam: CamModel, outputs: list[Any]) -> tuple[Any, Any, Any]:
    """(acts, scores whose gradient is taken, scores shown) of the graph's outputs."""
    if len(outputs) == 3:  # a softmax's logits and probabilities, or a per-pixel output's
        acts, gradient_of, shown = outputs
        return acts, gradient_of, shown
    acts, scores = outputs
    return acts, scores, scores


def _finish(acts: Any, grads: Any, classes: Any, shown: Any, top: tuple[Any, Any], method: str):
    ops = keras.ops
    maps, peaks = cam_maps(acts, grads, method)
    top_scores, top_classes = top
    return {
        "maps": maps,
        "peaks": peaks,
        "classes": classes,
        "class_scores": ops.take_along_axis(shown, classes, axis=1),
        "top_classes": top_classes,
        "top_scores": top_scores,
    }


def _pick(requested: Any, top_classes: Any, count: int) -> Any:
    ops = keras.ops
    return ops.where(requested >= 0, requested, ops.cast(top_classes[:, :count], "int32"))


def _jax_program(cam: CamModel, key: CamKey) -> Any:
    import jax
    import jax.numpy as jnp

    def step(trainable: Any, non_trainable: Any, batch: Any, requested: Any) -> Any:
        shape = (batch.shape[0], *cam.feature_shape(batch.shape[1:]))

        def forward(probe: Any) -> Any:
            outputs, _ = cam.graph.stateless_call(
                trainable, non_trainable, [batch, probe], training=False
            )
            acts, scores, shown = _split(cam, list(outputs))
            return scores, (acts, shown)

        scores, pullback, (acts, shown) = jax.vjp(
            forward, jnp.zeros(shape, batch.dtype), has_aux=True
        )
        top_scores, top_classes = jax.lax.top_k(shown, key.predictions)
        classes = _pick(requested, top_classes, key.count)
        cotangents = jax.nn.one_hot(classes.T, cam.classes, dtype=scores.dtype)
        (grads,) = jax.vmap(pullback)(cotangents)
        return _finish(acts, grads, classes, shown, (top_scores, top_classes), key.method)

    jitted = jax.jit(step)

    def run(batch: Any, requested: Any) -> Any:
        trainable = [v.value for v in cam.graph.trainable_variables]
        non_trainable = [v.value for v in cam.graph.non_trainable_variables]
        return jitted(trainable, non_trainable, batch, requested)

    return run


def _tf_program(cam: CamModel, key: CamKey) -> Any:
    import tensorflow as tf

    def eager(batch: Any, requested: Any) -> Any:
        batch = tf.convert_to_tensor(batch)
        shape = (batch.shape[0], *cam.feature_shape(batch.shape[1:]))
        probe = tf.zeros(shape, batch.dtype)
        with tf.GradientTape(persistent=True) as tape:
            tape.watch(probe)
            acts, scores, shown = _split(cam, list(cam.graph([batch, probe], training=False)))
            top_scores, top_classes = tf.math.top_k(shown, key.predictions)
            classes = _pick(requested, top_classes, key.count)
            picked = [
                tf.reduce_sum(tf.gather(scores, classes[:, k], axis=1, batch_dims=1))
                for k in range(key.count)
            ]
        grads = [tape.gradient(score, probe) for score in picked]
        del tape
        if any(g is None for g in grads):
            raise NotDifferentiable(_no_gradient(cam))
        return _finish(acts, tf.stack(grads), classes, shown, (top_scores, top_classes), key.method)

    return tf_function(eager, xla=needs_xla(cam.graph))


def _torch_program(cam: CamModel, key: CamKey) -> Any:
    import torch

    def run(batch: Any, requested: Any) -> Any:
        batch = keras.ops.convert_to_tensor(batch)
        requested = keras.ops.convert_to_tensor(requested)
        shape = (batch.shape[0], *cam.feature_shape(tuple(batch.shape[1:])))
        probe = keras.ops.zeros(shape, dtype=batch.dtype).requires_grad_(True)
        acts, scores, shown = _split(cam, list(cam.graph([batch, probe], training=False)))
        top_scores, top_classes = torch.topk(shown, key.predictions, dim=1)
        classes = _pick(requested, top_classes, key.count)
        grads = []
        for k in range(key.count):
            score = scores.gather(1, classes[:, k : k + 1].long()).sum()
            (grad,) = torch.autograd.grad(score, probe, retain_graph=True, allow_unused=True)
            if grad is None:
                raise NotDifferentiable(_no_gradient(cam))
            grads.append(grad)
        with torch.no_grad():
            return _finish(
                acts.detach(),
                torch.stack(grads),
                classes,
                shown.detach(),
                (top_scores.detach(), top_classes),
                key.method,
            )

    return run


def _no_gradient(cam: CamModel) -> str:
    return (
        f"no gradient flows from the model's class scores back to layer '{cam.ref.name}': "
        "the head is not differentiable (an argmax, a cast or a rounding step)"
    )
