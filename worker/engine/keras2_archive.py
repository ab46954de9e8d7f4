"""`.keras` archives written by Keras 2 (tf.keras 2.13 to 2.15, tf_keras), as Keras 3 models.

Keras 2's archive holds the members Keras 3's does (`config.json`,
`metadata.json`, `model.weights.h5`), and its weights file has Keras 3's
layout: each layer's variables under a path of class names, counted per
container (`layers/sequential/layers/conv2d_1/vars/0`). Its config is Keras
2's, though: classes named by tf.keras modules (`Functional` in
`tf_keras.src.engine.functional`), InputLayers and first layers declaring
`batch_input_shape`, TFOpLambda layers. Keras 3 builds none of it from a
`.keras` file, only from an `.h5` file's config, through its reader of legacy
configs. So:

1. the config, without the `module` and `registered_name` each object was
   written with, is what the same model's `.h5` holds (`legacy_config`);
2. that is adapted as an `.h5` file's is (worker/engine/keras2_config.py) and
   built by Keras's reader of legacy configs, in safe mode unless trusted;
3. Keras 3 loads the archive's weights file into it by those paths, and
   refuses a layer whose variables are missing or differ in number or shape.

Tested against tf_keras's own outputs (tests/engine/test_keras2_models.py).
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import keras

from worker.engine.keras2_config import custom_objects

WEIGHTS = "model.weights.h5"


def legacy_config(node: Any) -> Any:
    """`node` (a Keras 2 `.keras` config) with no `module` or `registered_name` in its
    serialized objects (the dicts holding a `class_name` and a `config`): an `.h5`'s form."""
    if isinstance(node, dict):
        serialized = "class_name" in node and "config" in node
        return {
            key: legacy_config(value)
            for key, value in node.items()
            if not (serialized and key in ("module", "registered_name"))
        }
    if isinstance(node, list):
        return [legacy_config(value) for value in node]
    return node


def load_keras2_archive(path: Path, config: Any, *, trusted: bool = False) -> keras.Model:
    """The model of the Keras 2 archive at `path`, built from `config` (its config.json,
    as `legacy_config` and keras2_config's `adapt` made it), with the archive's weights.

    Raises what Keras raises (the caller makes it InvalidModel or UnsafeModel).
    """
    from keras.src.legacy.saving import saving_options, saving_utils
    from keras.src.saving import serialization_lib

    legacy = saving_options.keras_option_scope(use_legacy_config=True)
    with legacy, serialization_lib.SafeModeScope(not trusted):
        model = saving_utils.model_from_config(config, custom_objects=custom_objects())
    with tempfile.TemporaryDirectory(prefix="actviz-model-") as tmp:
        weights = Path(tmp) / WEIGHTS
        with (
            zipfile.ZipFile(path) as archive,
            archive.open(WEIGHTS) as member,
            open(weights, "wb") as out,
        ):
            shutil.copyfileobj(member, out)
        model.load_weights(weights)
    return model
