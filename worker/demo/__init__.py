"""The demo model and photo that `actviz demo` runs, shipped as package data.

demo_cnn.keras is a small trained CNN (150x150x3 input, four Conv2D blocks);
`python -m worker.demo.train` rebuilds it, and model_card.json says how it was
trained and how well it does on held-out data.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["image_path", "model_card", "model_path"]

_HERE = Path(__file__).resolve().parent


def model_path() -> Path:
    """The trained demo model (Keras 3 .keras file, input (150, 150, 3), RGB in [0, 1])."""
    return _HERE / "demo_cnn.keras"


def image_path() -> Path:
    """The demo photo (JPEG, 512x600 RGB), matplotlib's public-domain sample portrait."""
    return _HERE / "demo_photo.jpg"


def model_card() -> dict[str, Any]:
    """Training data, task, epochs, held-out accuracy and input shape of the demo model."""
    return json.loads((_HERE / "model_card.json").read_text())
