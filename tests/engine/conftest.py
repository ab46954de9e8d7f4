"""Engine fixtures: real saved models (built once per run) and real image bytes."""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/models.py

import models  # noqa: E402
from sample_images import image_bytes  # noqa: E402

from producer.settings import Settings  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def model_files(model_dir: Path) -> dict[str, Path]:
    """Every Keras 3 test model, saved once for the whole run."""
    files = {
        "sequential_h5": models.save_sequential_h5(model_dir),
        "gray": models.save_gray_keras(model_dir),
        "gray_hw": models.save_gray_hw_h5(model_dir),
        "uint8_input": models.save_uint8_input_keras(model_dir),
        "rescaling": models.save_rescaling_keras(model_dir),
        "channels_first": models.save_channels_first_keras(model_dir),
        "residual": models.save_residual_keras(model_dir),
        "nested": models.save_nested_keras(model_dir),
        "fully_conv": models.save_fully_conv_keras(model_dir),
        "wide": models.save_wide_keras(model_dir),
        "wide_dense": models.save_wide_dense_keras(model_dir),
        "unbuilt": models.save_unbuilt_keras(model_dir),
        "softmax": models.save_softmax_keras(model_dir),
    }
    files["lambda_keras"], files["lambda_h5"] = models.save_lambda_models(model_dir)
    return files


@pytest.fixture(scope="session")
def keras2_files(model_dir: Path) -> dict[str, Path]:
    """Files written by Keras 2 (tf_keras), in a subprocess."""
    return models.save_keras2_models(model_dir)


@pytest.fixture(scope="session")
def loaded_models(model_files: dict[str, Path]):
    """Opened LoadedModels shared by the read-only analysis tests."""
    from worker.engine import open_model

    cache: dict[str, object] = {}

    def get(name: str):
        if name not in cache:
            cache[name] = open_model(model_files[name], uri=f"file://{name}")
        return cache[name]

    return get


@pytest.fixture
def settings() -> Settings:
    return Settings()


@pytest.fixture
def png() -> bytes:
    return image_bytes()


@pytest.fixture
def jpeg() -> bytes:
    return image_bytes(fmt="JPEG", seed=1, quality=90)
