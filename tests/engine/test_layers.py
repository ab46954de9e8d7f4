"""Layer selection: names, indices, slices, class names, regex, nested models."""

from __future__ import annotations

import keras
import models
import pytest

from producer.contract import ErrorCode
from producer.errors import UnknownLayer
from worker.engine import flatten_layers, select_layers


@pytest.fixture(scope="module")
def seq():
    return flatten_layers(models.sequential_cnn())


@pytest.fixture(scope="module")
def nested():
    return flatten_layers(models.nested())


def names(refs) -> list[str]:
    return [r.name for r in refs]


def test_slice_8_is_exactly_model_layers_8_of_the_classic_recipe():
    model = models.classic_cnn()
    chosen = select_layers(flatten_layers(model), ":8")
    assert [r.layer for r in chosen] == model.layers[:8]
    assert names(chosen)[0].startswith("conv2d") and len(chosen) == 8


def test_default_selects_every_spatial_layer_in_model_order(seq):
    assert names(select_layers(seq, None)) == [
        "conv2d_1",
        "max_pooling2d_1",
        "conv2d_2",
        "max_pooling2d_2",
    ]
    assert select_layers(seq, "") == select_layers(seq, []) == select_layers(seq, None)


def test_names_indices_and_negative_indices(seq):
    assert names(select_layers(seq, "conv2d_2, max_pooling2d_1")) == [
        "max_pooling2d_1",
        "conv2d_2",
    ]
    assert names(select_layers(seq, "0,3")) == ["conv2d_1", "max_pooling2d_2"]
    assert names(select_layers(seq, ["-1"])) == ["head"]


def test_slices_with_steps(seq):
    assert names(select_layers(seq, "1:5:2")) == ["max_pooling2d_1", "max_pooling2d_2"]
    assert names(select_layers(seq, "-2:")) == ["dense", "head"]


def test_class_names_and_regex(seq):
    assert names(select_layers(seq, "MaxPooling2D,Dense")) == [
        "max_pooling2d_1",
        "max_pooling2d_2",
        "dense",
        "head",
    ]
    assert names(select_layers(seq, "re:^conv2d_[12]$")) == ["conv2d_1", "conv2d_2"]


def test_duplicates_collapse_and_order_follows_the_model(seq):
    assert names(select_layers(seq, "head,0,conv2d_1,Conv2D")) == [
        "conv2d_1",
        "conv2d_2",
        "head",
    ]


def test_nested_layers_are_addressable_as_outer_slash_inner(nested):
    flat = names(nested)
    assert flat == [
        "stem",
        "features/features_in",
        "features/inner_conv_a",
        "features/inner_conv_b",
        "features",
        "gap",
        "out",
    ]
    assert [r.index for r in nested] == list(range(len(flat)))
    assert [r.container for r in nested].count(True) == 1
    assert names(select_layers(nested, "features/inner_conv_b")) == ["features/inner_conv_b"]
    assert names(select_layers(nested, "re:^features/")) == [
        n for n in flat if n.startswith("features/")
    ]


def test_nested_default_lists_inner_layers_instead_of_the_container(nested):
    assert names(select_layers(nested, None)) == [
        "stem",
        "features/inner_conv_a",
        "features/inner_conv_b",
    ]


def test_unknown_name_lists_nearest_valid_names(seq):
    with pytest.raises(UnknownLayer) as err:
        select_layers(seq, "conv2d_9")
    assert err.value.code == ErrorCode.UNKNOWN_LAYER
    message = err.value.message
    assert message.startswith("layer 'conv2d_9' not found. nearest: ")
    nearest = message.split("nearest: ")[1].split(". ")[0].split(", ")
    assert {"conv2d_1", "conv2d_2"} <= set(nearest[:2])


def test_a_part_of_names_says_how_to_select_them(seq):
    """'conv' is no layer's name, but part of several: the message gives the re: token."""
    with pytest.raises(UnknownLayer) as err:
        select_layers(seq, "conv")
    message = err.value.message
    assert "'re:conv' selects every layer whose name contains it" in message
    assert "conv2d_1" in message
    assert [r.name for r in select_layers(seq, "re:conv")] == [
        r.name for r in seq if "conv" in r.name
    ]


def test_a_name_like_nothing_lists_the_models_layers_and_classes(seq):
    with pytest.raises(UnknownLayer) as err:
        select_layers(seq, "nosuchlayer")
    message = err.value.message
    assert "Layers: " in message and "Classes: " in message and "Conv2D" in message
    assert all(r.name in message for r in seq[:5])


@pytest.mark.parametrize("spec", ["re:^nothing$", "5:2", "12", "re:(unclosed"])
def test_empty_or_impossible_selection_is_unknown_layer(seq, spec):
    with pytest.raises(UnknownLayer):
        select_layers(seq, spec)


def test_model_without_spatial_layers_needs_an_explicit_selection():
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, name="only")])
    refs = flatten_layers(model)
    with pytest.raises(UnknownLayer, match="no layer with a spatial"):
        select_layers(refs, None)
    assert names(select_layers(refs, "only")) == ["only"]
