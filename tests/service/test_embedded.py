"""The embedded default: no Redis, no S3, no configuration; same task code in-process."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from stack import ACTVIZ

pytestmark = pytest.mark.timeout(180)


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """Nothing but PATH and HOME (a fresh one), like a new laptop."""
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home), **extra}


def actviz_in(folder: Path, *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    """`actviz ARGS` run in `folder` with no configuration (a fresh HOME below it)."""
    return subprocess.run(
        [str(ACTVIZ), *args],
        cwd=folder,
        env=clean_env(folder / "home"),
        capture_output=True,
        timeout=timeout,
    )


def job_folder(folder: Path, saved_models: dict[str, Path], png_bytes: bytes) -> None:
    """cat.png and model.keras in `folder`, as a user would have them."""
    (folder / "cat.png").write_bytes(png_bytes)
    (folder / "model.keras").write_bytes(saved_models["seq"].read_bytes())


def test_submit_with_no_configuration_runs_in_process_and_writes_local_files(
    tmp_path: Path, saved_models: dict[str, Path], png_bytes: bytes
) -> None:
    job_folder(tmp_path, saved_models, png_bytes)
    model = tmp_path / "model.keras"
    done = actviz_in(
        tmp_path, "submit", "--model", "model.keras", "--image", "cat.png", "--wait", "--json"
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    out = json.loads(done.stdout.decode().strip())
    assert out["status"] == "succeeded"
    job_dir = tmp_path / "actviz-results" / "jobs" / out["job_id"]
    manifest = json.loads((job_dir / "manifest.json").read_text())
    assert manifest["model"]["uri"] == model.as_uri()
    assert manifest["kind"] == "activations"
    assert [layer["name"] for layer in manifest["layers"]][:2] == ["conv2d_1", "max_pooling2d_1"]
    assert (job_dir / manifest["layers"][0]["grid"]["png"]).is_file()
    assert (job_dir / "index.html").is_file()
    stderr = done.stderr.decode()
    assert "broker memory://" in stderr and "storage file://./actviz-results" in stderr
    # TensorFlow's native start-up notices stay off the user's terminal.
    for notice in ("InitializeLog", "oneDNN", "cpu_feature_guard", "cuda drivers", "cuInit"):
        assert notice not in stderr, stderr[-2000:]
    # A later `actviz status` reads storage; it starts no worker and no TensorFlow.
    status = actviz_in(tmp_path, "status", out["job_id"], "--json", timeout=60)
    assert json.loads(status.stdout) == {"job_id": out["job_id"], "status": "succeeded"}
    assert b"tensorflow" not in status.stderr.lower() and b"onednn" not in status.stderr.lower()


def test_worker_refuses_the_in_memory_broker(tmp_path: Path) -> None:
    done = subprocess.run(
        [str(ACTVIZ), "worker"],
        cwd=tmp_path,
        env=clean_env(tmp_path),
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert "ACTVIZ_BROKER_URL=redis://" in done.stderr.decode()


def test_config_prints_effective_settings_without_passwords(tmp_path: Path) -> None:
    env = clean_env(
        tmp_path,
        ACTVIZ_BROKER_URL="rediss://:hunter2@redis.example:6380/0",
        ACTVIZ_STORAGE_URL="s3://bucket/prefix",
    )
    done = subprocess.run(
        [str(ACTVIZ), "config", "--json"], env=env, capture_output=True, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()
    config = json.loads(done.stdout)
    assert "hunter2" not in done.stdout.decode()
    assert config["broker_url"] == "rediss://***@redis.example:6380/0"
    assert config["result_backend"] == "rediss://***@redis.example:6380/0"
    assert config["storage_url"] == "s3://bucket/prefix"


def test_demo_runs_the_builtin_model_on_the_photo(tmp_path: Path) -> None:
    done = actviz_in(tmp_path, "demo", timeout=170)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    lines = done.stdout.decode().splitlines()
    report = Path(next(line for line in lines if line.startswith("report: ")).split(": ", 1)[1])
    assert report.name == "index.html" and report.is_file()
    assert report.is_relative_to(tmp_path / "actviz-results" / "jobs")
    manifest = json.loads((report.parent / "manifest.json").read_text())
    assert manifest["model"]["uri"] == "builtin:demo"
    assert manifest["model"]["input_shape"] == [150, 150, 3]
    assert len(manifest["layers"]) == len(lines) - 2  # one grid line per layer


def test_scale_meanstd_takes_its_mean_and_std_on_the_command_line(
    tmp_path: Path, saved_models: dict[str, Path], png_bytes: bytes
) -> None:
    job_folder(tmp_path, saved_models, png_bytes)
    base = ["submit", "--model", "model.keras", "--image", "cat.png"]
    meanstd = ["--scale", "meanstd", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225"]
    done = actviz_in(tmp_path, *base, *meanstd, "--layers", "re:conv", "--wait", "--json")
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    out = json.loads(done.stdout.decode().strip())
    manifest = json.loads(
        (tmp_path / "actviz-results" / "jobs" / out["job_id"] / "manifest.json").read_text()
    )
    assert manifest["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
    assert manifest["preprocessing"]["std"] == [0.229, 0.224, 0.225]
    assert all("conv" in layer["name"] for layer in manifest["layers"])
    # A malformed list is refused by the parser, before anything runs.
    bad = actviz_in(tmp_path, *base, "--scale", "meanstd", "--mean", "a,b", "--std", "1,1,1")
    assert bad.returncode == 2 and b"comma-separated list of numbers" in bad.stderr
    version = subprocess.run([str(ACTVIZ), "--version"], capture_output=True, timeout=60)
    assert version.returncode == 0 and version.stdout.startswith(b"actviz ")


def test_cancelling_a_batch_without_redis_says_what_it_needs(tmp_path: Path) -> None:
    done = actviz_in(tmp_path, "cancel", "--batch", "b1", timeout=60)
    assert done.returncode == 2
    assert b"invalid_config" in done.stderr and b"needs Redis" in done.stderr
    nothing = actviz_in(tmp_path, "cancel", timeout=60)
    assert nothing.returncode == 2 and b"name job ids or --batch" in nothing.stderr


def test_grad_cam_from_the_command_line_with_labels_from_the_model_registry(
    tmp_path: Path, png_bytes: bytes
) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import models

    (tmp_path / "cat.png").write_bytes(png_bytes)
    models.save_softmax_keras(tmp_path)
    (tmp_path / "classes.txt").write_text("cat\ndog\nbird\nfish\n\n")
    registry = {"pets": {"uri": "softmax_cnn.keras", "labels": "classes.txt"}}
    (tmp_path / "models.json").write_text(json.dumps(registry))
    done = actviz_in(
        tmp_path,
        "--registry",
        "models.json",
        "batch",
        "--model",
        "pets",
        "--kind",
        "gradcam",
        "--class",
        "2",
        "--class",
        "0",
        "--method",
        "gradcam++",
        "cat.png",
        "--wait",
        "--json",
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    (out,) = [json.loads(line) for line in done.stdout.decode().splitlines() if line.strip()]
    job_dir = tmp_path / "actviz-results" / "jobs" / out["job_id"]
    section = json.loads((job_dir / "manifest.json").read_text())["gradcam"]
    assert section["method"] == "gradcam++" and section["labels"] is True
    assert [(c["class"], c["name"]) for c in section["classes"]] == [(2, "bird"), (0, "cat")]
    assert all((job_dir / c["overlay"]).is_file() for c in section["classes"])
    page = (job_dir / "index.html").read_text()
    assert "bird (2)" in page and "Grad-CAM at conv_b" in page


def test_grad_cam_of_a_segmentation_model_over_its_predicted_pixels_from_the_command_line(
    tmp_path: Path, png_bytes: bytes
) -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import models

    (tmp_path / "street.png").write_bytes(png_bytes)
    models.save_segmentation_keras(tmp_path)
    args = ("submit", "--model", "segmentation.keras", "--image", "street.png")
    done = actviz_in(
        tmp_path,
        *args,
        "--kind",
        "gradcam",
        "--top",
        "2",
        "--region",
        "predicted",
        "--wait",
        "--json",
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    out = json.loads(done.stdout.decode().strip().splitlines()[-1])
    job_dir = tmp_path / "actviz-results" / "jobs" / out["job_id"]
    section = json.loads((job_dir / "manifest.json").read_text())["gradcam"]
    assert section["target"] == "pixels" and section["region"] == "predicted"
    assert section["layer"] == "decode" and len(section["classes"]) == 2
    assert "share of the pixels" in (job_dir / "index.html").read_text()
    wrong = actviz_in(tmp_path, *args, "--kind", "gradcam", "--region", "mask", "--json")
    assert wrong.returncode != 0 and b"invalid choice: 'mask'" in wrong.stderr


def test_census_from_the_command_line_over_a_list_of_images(
    tmp_path: Path, saved_models: dict[str, Path]
) -> None:
    import io

    import numpy as np
    from PIL import Image

    (tmp_path / "model.keras").write_bytes(saved_models["seq"].read_bytes())
    names = []
    for seed in range(4):
        buffer = io.BytesIO()
        pixels = (np.random.default_rng(seed).random((36, 40, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(buffer, format="PNG")
        (tmp_path / f"img{seed}.png").write_bytes(buffer.getvalue())
        names.append(f"img{seed}.png")
    (tmp_path / "list.txt").write_text("# the census's images\n" + "\n".join(names) + "\n")
    done = actviz_in(
        tmp_path, "census", "--model", "model.keras", "list.txt", "--top-k", "2", "--json"
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    out = json.loads(done.stdout.decode().strip().splitlines()[-1])
    assert out["images"] == 4 and out["failed"] == 0
    folder = tmp_path / "actviz-results" / "batches" / out["batch_id"]
    census = json.loads((folder / "census.json").read_text())
    assert census["images"] == 4 and census["top_k"] == 2
    conv = census["layers"][0]
    assert conv["name"] == "conv2d_1" and conv["count"][0] == 4 * 30 * 30
    assert 1 in conv["dead_everywhere"]  # the test model's dead channel
    assert all(len(top) == 2 for top in conv["top"])
    assert "conv2d_1" in (folder / "census.html").read_text()
