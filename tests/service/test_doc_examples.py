"""Docs that cannot rot: every example in README.md, docs/service.md and docs/engine.md runs.

The examples are read from the documents themselves, not copied here: every
```python block, and every `actviz` command of the README's shell blocks (the
CLI synopsis in docs/service.md is a grammar, and `make` lines are the
README's own set-up). They run as a user would run them, in a folder holding
what they name (cat.jpg, a.jpg, b.jpg, photos/, imagenet.txt, base.keras,
finetuned.keras, cats_and_dogs_small.h5), against real Redis and the S3 test
server with the buckets they name (s3://models/ holds vgg16.keras, base.keras
and finetuned.keras; results go to s3://results/) and a model registry that
knows "vgg16". The README's `actviz worker` command is the worker they run on.
JOB_ID in a command is the id the last `--json` command printed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from stack import ACTVIZ, start_worker, subprocess_env

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/service.md", "docs/engine.md")
pytestmark = pytest.mark.timeout(600)


def blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def python_examples() -> list[tuple[str, str]]:
    return [
        (doc, body)
        for doc in DOCS
        for language, body in blocks((ROOT / doc).read_text())
        if language == "python"
    ]


def shell_examples() -> list[str]:
    """The README's `actviz` command lines, comments removed, in order."""
    lines = []
    for language, body in blocks((ROOT / "README.md").read_text()):
        if language:
            continue
        for line in body.splitlines():
            command = line.split("  #", 1)[0].strip()
            if command.startswith("actviz "):
                lines.append(command)
    return lines


def test_the_docs_have_the_examples_this_test_runs() -> None:
    assert len(python_examples()) >= 3
    commands = shell_examples()
    assert any(c.startswith("actviz worker") for c in commands)
    assert len(commands) >= 6


def jpeg(seed: int, size: tuple[int, int] = (96, 80)) -> bytes:
    pixels = (np.random.default_rng(seed).random((*size, 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def mini_vgg16(classes: int = 10):  # noqa: ANN201
    """VGG16's layer names on a 64x64 input with 4 filters a layer: the docs' model."""
    import keras

    keras.utils.set_random_seed(5)
    layers = keras.layers
    stack = [keras.Input((64, 64, 3))]
    for block, convs in ((1, 2), (2, 2), (3, 3), (4, 3), (5, 3)):
        for i in range(1, convs + 1):
            stack.append(
                layers.Conv2D(4, 3, padding="same", activation="relu", name=f"block{block}_conv{i}")
            )
        stack.append(layers.MaxPooling2D(name=f"block{block}_pool"))
    stack += [
        layers.Flatten(name="flatten"),
        layers.Dense(classes, activation="softmax", name="predictions"),
    ]
    return keras.Sequential(stack, name="vgg16")


@pytest.fixture(scope="module")
def world(tmp_path_factory, s3, redis_url: str) -> tuple[Path, dict[str, str]]:  # noqa: ANN001
    sys.path.insert(0, str(ROOT / "tests"))
    import models

    folder = tmp_path_factory.mktemp("user")
    for name, seed in (("cat.jpg", 1), ("a.jpg", 2), ("b.jpg", 3)):
        (folder / name).write_bytes(jpeg(seed))
    (folder / "photos").mkdir()
    for seed in range(3):
        (folder / "photos" / f"photo{seed}.jpg").write_bytes(jpeg(10 + seed))
    (folder / "imagenet.txt").write_text("\n".join(f"class {i}" for i in range(10)) + "\n")
    vgg = mini_vgg16()
    vgg.save(folder / "base.keras")
    weights = vgg.get_layer("block3_conv1").get_weights()
    vgg.get_layer("block3_conv1").set_weights([weights[0] * 1.2, weights[1]])
    vgg.save(folder / "finetuned.keras")
    models.sequential_cnn().save(folder / "cats_and_dogs_small.h5")
    for bucket in ("models", "results"):
        with contextlib.suppress(Exception):
            s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(folder / "base.keras"), "models", "vgg16.keras")
    s3.upload_file(str(folder / "base.keras"), "models", "base.keras")
    s3.upload_file(str(folder / "finetuned.keras"), "models", "finetuned.keras")
    registry = {"vgg16": {"uri": "s3://models/vgg16.keras", "labels": "imagenet.txt"}}
    (folder / "models.json").write_text(json.dumps(registry))
    env = subprocess_env(
        ACTVIZ_BROKER_URL=redis_url,
        ACTVIZ_STORAGE_URL="s3://results/",
        ACTVIZ_MODEL_ALLOW=f"s3://models/,{folder.as_uri()}/",
        ACTVIZ_MODEL_REGISTRY=str(folder / "models.json"),
        ACTVIZ_MODEL_CACHE_DIR=str(folder / ".model-cache"),
    )
    return folder, env


def test_every_documented_example_runs_as_written(
    world: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder, env = world
    commands = shell_examples()
    (worker_line,) = [c for c in commands if c.startswith("actviz worker")]
    worker = start_worker(env, folder / "worker.log", *shlex.split(worker_line)[2:])
    try:
        job_id = None
        for command in commands:
            if command == worker_line:
                continue
            if "JOB_ID" in command:
                assert job_id, f"{command}: no job id printed before it"
                command = command.replace("JOB_ID", job_id)
            done = subprocess.run(
                [str(ACTVIZ), *shlex.split(command)[1:]],
                cwd=folder,
                env=env,
                capture_output=True,
                timeout=240,
            )
            assert done.returncode == 0, f"{command}\n{done.stderr.decode()[-3000:]}"
            for line in done.stdout.decode().splitlines():
                with contextlib.suppress(ValueError, AttributeError):
                    job_id = json.loads(line).get("job_id") or job_id

        # The Python examples, in this process, as a user's script would run them.
        monkeypatch.chdir(folder)
        for key, value in env.items():
            if key.startswith(("ACTVIZ_", "AWS_")):
                monkeypatch.setenv(key, value)
        monkeypatch.setattr(Image.Image, "show", lambda self, *a, **k: None)  # no viewer here
        for doc, body in python_examples():
            try:
                exec(compile(body, doc, "exec"), {"__name__": "__doc_example__"})  # noqa: S102
            except Exception as exc:  # noqa: BLE001
                pytest.fail(f"an example in {doc} fails: {type(exc).__name__}: {exc}")
    finally:
        worker.stop()
    assert (folder / "results").is_dir()  # `actviz fetch JOB_ID --out results/`
    assert (folder / "out").is_dir()  # `result.download("out/")`
    os.environ.pop("ACTVIZ_MODEL_REGISTRY", None)
