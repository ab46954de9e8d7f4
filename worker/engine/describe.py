"""What the engine reads of a model, before any job: `actviz inspect`.

Its input as the engine prepares it, the layout and scale it chose and why,
every layer with the name, class and (H, W, C) shape a job's spec selects it
by, which layers a job shows by default, and the layer Grad-CAM explains by
default, or why Grad-CAM cannot. A JSON-safe dict.
"""

from __future__ import annotations

from typing import Any

from producer.errors import ActvizError
from worker.engine.gradcam import (
    cam_candidates,
    check_output,
    choose_layer,
    head_layer,
    output_classes,
    output_kind,
)
from worker.engine.layers import default_layers
from worker.engine.loading import LoadedModel
from worker.engine.preprocess import FORMULAS


def describe_model(loaded: LoadedModel) -> dict[str, Any]:
    """See the module doc."""
    model = loaded.model
    auto = loaded.auto_scale
    shown = {ref.name for ref in default_layers(loaded.layers)}
    return {
        "uri": loaded.uri,
        "sha256": loaded.sha256,
        "name": model.name,
        "class_name": type(model).__name__,
        "input_shape": list(loaded.input_shape),
        "input_dtype": str(model.inputs[0].dtype),
        "data_format": "channels_first" if loaded.channels_first else "channels_last",
        "scale_auto": {
            "scale": auto.scale,
            "formula": FORMULAS[auto.scale],
            "why": auto.why,
            **({"mean": list(auto.mean), "std": list(auto.std)} if auto.mean and auto.std else {}),
        },
        "parameters": int(model.count_params()),
        "weight_bytes": loaded.nbytes,
        "layers": [
            {
                "index": ref.index,
                "name": ref.name,
                "class_name": ref.class_name,
                "output_shape": list(ref.output_shape),
                "spatial": ref.spatial,
                "default": ref.name in shown,
            }
            for ref in loaded.layers
        ],
        "gradcam": _gradcam(loaded),
    }


def _gradcam(loaded: LoadedModel) -> dict[str, Any]:
    """The default layer and every layer Grad-CAM can use; or why it cannot."""
    try:
        candidates, output, index = cam_candidates(loaded.model, loaded.layers)
        check_output(output, loaded.channels_first)
        default = choose_layer(loaded.layers, candidates, None)
    except ActvizError as exc:
        return {"available": False, "why": exc.message}
    found = {
        "available": True,
        "default": default.name,
        "layers": [ref.name for ref in candidates],
        "classes": output_classes(output, loaded.channels_first),
        "target": output_kind(output, loaded.channels_first),
    }
    if len(loaded.model.outputs) > 1:  # the output it explains, by its layer's name
        found["output"] = head_layer(loaded.model, index).name
    return found
