"""Which layers a job looks at: the flattened layer list and the selection spec.

Nested models (a Functional or Sequential model used as a layer) are
flattened: their inner layers follow each other as `outer/inner`, and the
nested model itself comes right after its inner layers (its output is the
output of its last inner layer). Indices and slices count positions in this
flattened list, which is exactly `model.layers` when nothing is nested.

Default selection: every layer with a spatial output (batch, H, W, C) in model
order, except input layers and nested-model containers (their inner layers
are listed instead). A layer called more than once (shared) is shown at its
first call; a layer with several outputs by its first output.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass

import keras

from producer.contract import PATTERN_PREFIX, compile_layer_pattern, layer_tokens
from producer.errors import UnknownLayer
from worker.engine.layout import channels_first, engine_shape

_INT = re.compile(r"^-?\d+$")
_SLICE = re.compile(r"^(-?\d*):(-?\d*)(?::(-?\d*))?$")


@dataclass(frozen=True, eq=False)
class LayerRef:
    """One addressable layer of a (possibly nested) model.

    `output_shape` excludes the batch axis, e.g. (148, 148, 32); None where free.
    `path` is the chain of layer objects from the top model down to this one.
    """

    name: str
    index: int
    class_name: str
    output_shape: tuple[int | None, ...]
    path: tuple[keras.layers.Layer, ...]
    container: bool = False

    @property
    def layer(self) -> keras.layers.Layer:
        return self.path[-1]

    @property
    def spatial(self) -> bool:
        """True for (H, W, C) outputs that render as a grid of channel maps."""
        return len(self.output_shape) == 3

    @property
    def is_input(self) -> bool:
        return isinstance(self.layer, keras.layers.InputLayer)


def is_graph_model(layer: keras.layers.Layer) -> bool:
    """A nested model whose inner layers can be traced (Functional or Sequential)."""
    if isinstance(layer, keras.Sequential):
        return True
    return isinstance(layer, keras.Model) and hasattr(layer, "_nodes_by_depth")


def flatten_layers(model: keras.Model) -> list[LayerRef]:
    """Every layer of `model` in model order, nested models expanded (see module doc);
    a channels-first model's (C, H, W) outputs as (H, W, C) (worker/engine/layout.py)."""
    refs: list[LayerRef] = []
    _flatten(model, (), "", refs, channels_first(model))
    return refs


def _flatten(
    model: keras.Model,
    parents: tuple[keras.layers.Layer, ...],
    prefix: str,
    refs: list[LayerRef],
    transposed: bool,
) -> None:
    for layer in model.layers:
        path = (*parents, layer)
        nested = is_graph_model(layer)
        if nested:
            _flatten(layer, path, f"{prefix}{layer.name}/", refs, transposed)
        shape = _output_shape(layer)
        refs.append(
            LayerRef(
                name=prefix + layer.name,
                index=len(refs),
                class_name=type(layer).__name__,
                output_shape=engine_shape(shape) if transposed else shape,
                path=path,
                container=nested,
            )
        )


def _output_shape(layer: keras.layers.Layer) -> tuple[int | None, ...]:
    try:
        output = layer.output
    except (AttributeError, ValueError):
        return ()
    if isinstance(output, (list, tuple)):
        output = output[0]
    return tuple(output.shape[1:])


def default_layers(refs: list[LayerRef]) -> list[LayerRef]:
    return [r for r in refs if r.spatial and not r.is_input and not r.container]


def select_layers(refs: list[LayerRef], spec: str | list[str] | None) -> list[LayerRef]:
    """Resolve a layer spec to layers in model order, without duplicates.

    `spec` is a comma-separated string or a list of tokens; each token is a
    layer name (`conv2d_1`, `outer/inner`), an index (`3`, `-1`), a slice
    (`:8`, `2:6`), a class name (`Conv2D`) or a regex searched in names
    (`re:block[12]_conv.*`, RE2 syntax). None or empty selects `default_layers`.
    Raises UnknownLayer for an unknown token or an empty selection.
    """
    tokens = _tokens(spec)
    if not tokens:
        chosen = default_layers(refs)
        if not chosen:
            raise UnknownLayer(
                "model has no layer with a spatial (H, W, C) output; select layers "
                f"explicitly, e.g. one of: {', '.join(r.name for r in refs[:8])}"
            )
        return chosen
    picked: dict[int, LayerRef] = {}
    for token in tokens:
        for ref in _resolve(refs, token):
            picked[ref.index] = ref
    return [picked[i] for i in sorted(picked)]


def _tokens(spec: str | list[str] | None) -> list[str]:
    try:
        return layer_tokens(spec)
    except ValueError as exc:  # a job's spec was checked on receipt; this is a library call
        raise UnknownLayer(str(exc)) from None


def _resolve(refs: list[LayerRef], token: str) -> list[LayerRef]:
    by_name = {r.name: r for r in refs}
    if token in by_name:
        return [by_name[token]]
    if _INT.match(token):
        i = int(token)
        if not -len(refs) <= i < len(refs):
            raise UnknownLayer(
                f"layer index {i} is out of range: the model has {len(refs)} layers "
                f"(0..{len(refs) - 1})"
            )
        return [refs[i]]
    match = _SLICE.match(token)
    if match:
        start, stop, step = (int(g) if g else None for g in match.groups())
        if step == 0:
            raise UnknownLayer(f"layer slice '{token}' has step 0")
        found = refs[slice(start, stop, step)]
        return _non_empty(found, token, refs)
    if token.startswith(PATTERN_PREFIX):
        # Validated by `layer_tokens` already; RE2 matches in linear time.
        pattern = compile_layer_pattern(token[len(PATTERN_PREFIX) :])
        return _non_empty([r for r in refs if pattern.search(r.name)], token, refs)
    by_class = [r for r in refs if r.class_name == token]
    if by_class:
        return by_class
    raise UnknownLayer(_not_found(token, refs))


def _non_empty(found: list[LayerRef], token: str, refs: list[LayerRef]) -> list[LayerRef]:
    if not found:
        raise UnknownLayer(
            f"layer selection '{token}' matches no layer; layers are: "
            f"{', '.join(r.name for r in refs[:12])}{' ...' if len(refs) > 12 else ''}"
        )
    return found


def _not_found(token: str, refs: list[LayerRef]) -> str:
    """What to write instead of an unknown token: the names it is part of, the nearest
    names and classes, and what the model has."""
    names = [r.name for r in refs]
    classes = sorted({r.class_name for r in refs})
    lowered = token.lower()
    partial = [name for name in names if lowered in name.lower()]
    if partial:
        shown = ", ".join(partial[:8]) + (" ..." if len(partial) > 8 else "")
        return (
            f"layer '{token}' not found: no layer has that exact name. It is part of "
            f"{shown}: 're:{token}' selects every layer whose name contains it"
        )
    close = difflib.get_close_matches(token, names + classes, n=5, cutoff=0.5)
    hint = f"nearest: {', '.join(close)}. " if close else ""
    listed = ", ".join(names[:12]) + (f" ... ({len(names)} in all)" if len(names) > 12 else "")
    return (
        f"layer '{token}' not found. {hint}Layers: {listed}. Classes: {', '.join(classes)}. "
        "A token is a name, an index (3, -1), a slice (:8), a class (Conv2D) or 're:<pattern>'"
    )
