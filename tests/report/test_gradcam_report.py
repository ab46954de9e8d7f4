"""The Grad-CAM parts of the job report and the batch gallery, from a real engine result."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "engine"))

import models  # noqa: E402
from sample_images import image_bytes  # noqa: E402

from producer.contract import JobOptions  # noqa: E402
from producer.settings import Settings  # noqa: E402


@pytest.fixture(scope="module")
def cam_result(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    from worker.engine import open_model
    from worker.engine.cam_pass import analyze_cam

    loaded = open_model(models.save_softmax_keras(tmp_path_factory.mktemp("cam-report")))
    options = JobOptions(top=2, labels=["cat", "dog", "bird", "fish"])
    (result,) = analyze_cam(loaded, [image_bytes(seed=4)], options, Settings())
    result.manifest["job_id"] = "job1"
    return result


def test_a_grad_cam_report_shows_every_class_and_the_predictions(cam_result) -> None:  # noqa: ANN001
    from worker.report import render_report

    page = render_report(cam_result.manifest)["index.html"].decode()
    section = cam_result.manifest["gradcam"]
    assert "Grad-CAM at conv_b" in page
    for entry in section["classes"]:
        assert f"{entry['name']} ({entry['class']})" in page
        assert entry["values"] in page  # the float16 values are linked
        # heatmap and overlay linked by their keys, stored once
        assert f'src="{entry["overlay"]}"' in page and f'src="{entry["heatmap"]}"' in page
    assert "data:image" not in page
    assert "probability" in page and "logit (the input of the softmax)" in page
    assert "Sparsity and mean activation by depth" not in page  # no layers, no depth chart


def test_a_batch_gallery_of_grad_cam_jobs_shows_each_jobs_top_class(cam_result) -> None:  # noqa: ANN001
    from worker.report.gallery import render_gallery

    page = render_gallery("batch1", [("job1", cam_result.manifest), ("job2", None)]).decode()
    first = cam_result.manifest["gradcam"]["classes"][0]
    assert f"../../jobs/job1/{first['overlay']}" in page
    assert f"{first['name']} ({first['class']})" in page
    assert "failed: see error.json" in page
