"""Report fixtures: a real saved model, real engine output, a real headless Chromium."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/models.py
sys.path.insert(0, str(Path(__file__).resolve().parent))  # chromium.py

import models  # noqa: E402
from chromium import Browser, find_chromium  # noqa: E402


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    if find_chromium() is None:
        pytest.fail("chromium is not installed; `make services` installs it")
    with Browser() as session:
        yield session


@pytest.fixture(scope="session")
def seq_model(tmp_path_factory: pytest.TempPathFactory):
    """The Dense-ending test CNN (conv2d_1 has a dead channel), opened by the engine."""
    from worker.engine import open_model

    path = models.save_sequential_h5(tmp_path_factory.mktemp("report-models"))
    return open_model(str(path), uri="file://models/seq_cnn.h5", trusted=False)
