"""What the job's scale 'auto' (the default) feeds a model, and why.

Many models scale their own input: Keras's applications built with their
preprocessing (EfficientNet, ConvNeXt, MobileNetV3, RegNet), the tutorials'
`layers.Rescaling(1. / 255)` in front of the first convolution, a
`Normalization` adapted on raw images, tf.keras's `preprocess_input` saved as
op layers (`x / 127.5`), and models whose input is uint8. Fed x / 255, such a
model sees values 255 times smaller than the ones it learnt from, and every
activation is wrong without any error. For them 'auto' is 'none'.

`auto_scale(model)` walks the layers in front of the model's first weights
(into nested models, past augmentation, resizing and reshaping layers) for
the one that shows the model takes pixel values: a `Rescaling` by 1/50 or
less, a `Normalization` whose mean or variance is of pixel values (a mean above
2 or a variance above 4: images scaled to 0..1 have means near 0.5), or an op
layer dividing by 50 or more, multiplying by 1/50 or less, or adding a bias
above 2 (`preprocess_input` of ResNet50 and VGG: a mean of pixels). The first layer
with weights ends the walk: what comes after it says nothing of the input.

Where the walk finds no scaling at all, a model that is one of Keras's
applications whose `preprocess_input` is outside it (by the name Keras gives it:
`vgg16`, `resnet50`, `xception`, ...) is fed what that function makes of the
pixels: caffe's (BGR, ImageNet's means subtracted) for VGG and ResNet, -1..1 for
Xception, Inception, ResNetV2, MobileNet V1 and V2 and NASNet, ImageNet's mean
and std for DenseNet. Every other model gets the classic x / 255.
"""

from __future__ import annotations

import re
from typing import Any

import keras
import numpy as np

from worker.engine.keras2_config import TFOp
from worker.engine.preprocess import CLASSIC, IMAGENET_MEAN, IMAGENET_STD, AutoScale

# A factor that maps 0..255 into a range of at most about 5: the model takes pixels.
_PIXEL_FACTOR = 1 / 50
# A mean or variance beyond what values in 0..1 (or -1..1) could have.
_PIXEL_MEAN = 2.0
_PIXEL_VARIANCE = 4.0
_DIVIDE = ("math.truediv", "math.divide")
_MULTIPLY = ("math.multiply",)
# Keras's applications that leave their preprocessing to `preprocess_input`, by the
# name Keras (and tf.keras) gives the model: (pattern, the scale, its mean and std).
APPLICATIONS: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (re.compile(r"(vgg16|vgg19|resnet50|resnet101|resnet152)"), "caffe", "VGG and ResNet"),
    (
        re.compile(
            r"(xception|inception_v3|inception_resnet_v2|resnet(50|101|152)v2"
            r"|mobilenet(v2)?_\d\.\d\d_\d+|nasnet(_mobile|_large)?)",
            re.IGNORECASE,
        ),
        "-1..1",
        "Xception, Inception, ResNetV2, MobileNet and NASNet",
    ),
    (re.compile(r"densenet(121|169|201)"), "meanstd", "DenseNet"),
)


def auto_scale(model: keras.Model, channels: int = 3) -> AutoScale:
    """What 'auto' feeds `model`, whose images have `channels` (see the module doc)."""
    dtype = integer_input(model)
    if dtype is not None:
        return AutoScale("none", f"the model takes pixel values 0..255: its input is {dtype}")
    reason, scaled, _ = _walk(model)
    if reason is not None:
        return AutoScale("none", f"the model takes pixel values 0..255: {reason}")
    if not scaled and channels == 3:  # the applications take RGB
        for pattern, scale, family in APPLICATIONS:
            if pattern.fullmatch(model.name):
                return AutoScale(
                    scale,
                    f"the model is named '{model.name}', as Keras names its {family} "
                    "applications, whose preprocess_input is outside the model",
                    *((IMAGENET_MEAN, IMAGENET_STD) if scale == "meanstd" else ()),
                )
    return CLASSIC


def integer_input(model: keras.Model) -> str | None:
    """The dtype of `model`'s image input where it is an integer (or bool) one: such a
    model takes pixel values 0..255 and rescales them itself."""
    dtype = str(model.inputs[0].dtype)
    return dtype if "int" in dtype or dtype == "bool" else None


def _walk(model: keras.Model) -> tuple[str | None, bool, bool]:
    """(why the model takes pixel values, or None; whether a layer in front of its
    first weights scales values that are not pixels; whether the walk reached a layer
    with weights)."""
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        if isinstance(layer, keras.Model):
            reason, scaled, stopped = _walk(layer)
            if reason is not None or scaled or stopped:
                return reason, scaled, stopped
            continue
        verdict = _scales_pixels(layer)
        if verdict is not None:
            return f"layer '{layer.name}' ({type(layer).__name__}) {verdict}", False, True
        if isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization)):
            return None, True, True  # it scales values already scaled: x / 255 stands
        if layer.weights:
            return None, False, True
    return None, False, False


def _scales_pixels(layer: keras.layers.Layer) -> str | None:
    """What `layer` does that shows its input is pixel values, or None."""
    if isinstance(layer, keras.layers.Rescaling):
        scale = _scalar(layer.scale)
        if scale is not None and 0 < abs(scale) <= _PIXEL_FACTOR:
            return f"multiplies its input by {scale:.4g}"
        return None
    if isinstance(layer, keras.layers.Normalization) and not layer.invert:
        mean, variance = _normalization_moments(layer)
        if mean is not None and float(np.max(np.abs(mean))) > _PIXEL_MEAN:
            return f"subtracts a mean of {_values(mean)}"
        if variance is not None and float(np.max(variance)) > _PIXEL_VARIANCE:
            return f"divides by a standard deviation of {_values(np.sqrt(variance))}"
        return None
    if isinstance(layer, TFOp) and layer.function == "nn.bias_add":
        bias = np.asarray(layer.constants.get("bias", 0.0), dtype=float)
        if bias.size and float(np.max(np.abs(bias))) > _PIXEL_MEAN:
            return f"subtracts a mean of {_values(-bias)}"
        return None
    if isinstance(layer, TFOp):
        factors = [_scalar(value) for value in layer.constants.values()]
        factor = next((f for f in factors if f is not None and f != 0), None)
        if factor is None:
            return None
        if layer.function in _DIVIDE and abs(factor) >= 1 / _PIXEL_FACTOR:
            return f"divides its input by {factor:g}"
        if layer.function in _MULTIPLY and abs(factor) <= _PIXEL_FACTOR:
            return f"multiplies its input by {factor:.4g}"
    return None


def _normalization_moments(
    layer: keras.layers.Normalization,
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The layer's mean and variance, given to it or adapted (its weights)."""
    if layer.input_mean is not None:
        return np.asarray(layer.input_mean, float), np.asarray(layer.input_variance, float)
    moments = {w.path.rsplit("/", 1)[-1]: np.asarray(w.numpy(), float) for w in layer.weights}
    return moments.get("mean"), moments.get("variance")


def _scalar(value: Any) -> float | None:
    """`value` as one float where it is a number or holds one number only."""
    try:
        array = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return None
    return float(array.reshape(-1)[0]) if array.size == 1 else None


def _values(array: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in np.reshape(array, -1)[:4]) + "]"
