"""A pass copies only its reduced layers to the host, and batched encoding equals analyze."""

from __future__ import annotations

import io
import threading

import numpy as np
import pytest
from PIL import Image
from sample_images import image_bytes

from producer.contract import JobOptions
from producer.errors import ActvizError
from producer.settings import Settings
from worker.engine import Artifacts, analyze
from worker.runtime.batcher import Batcher


def run_concurrently(batcher: Batcher, loaded, images: list[bytes], timeout: float) -> list:  # noqa: ANN001
    """One job thread per image through `batcher` at once, as a batching worker runs them."""
    results: list[Artifacts] = []
    for _ in images:
        batcher.expect()

    def job(data: bytes) -> None:
        results.append(batcher.run(loaded, data, JobOptions()))

    threads = [threading.Thread(target=job, args=(data,)) for data in images]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    return results


def layer_bytes(manifest: dict, images: int) -> list[int]:
    return [4 * images * int(np.prod(layer["output_shape"])) for layer in manifest["layers"]]


def test_analyze_reports_what_its_pass_returned_to_the_host(loaded_models, settings):
    """An accelerator's program returns bytes, not floats (tests/engine/test_reduce.py); a
    CPU's returns its float32 outputs, which the host reduces."""
    from worker.engine.compiled import reduces_on_host

    loaded = loaded_models("residual")
    images = [image_bytes(seed=s) for s in (1, 2, 3)]
    results = analyze(loaded, images, JobOptions(), settings)
    batch = results[0].manifest["batch"]
    sizes = layer_bytes(results[0].manifest, len(images))
    assert len(sizes) > 2
    assert batch["activation_bytes"] == sum(sizes)
    if reduces_on_host():
        assert batch["d2h_bytes"] == sum(sizes)
    else:
        assert 0 < batch["d2h_bytes"] < sum(sizes) / 3


def test_batched_rendering_gives_what_analyze_gives(loaded_models) -> None:
    """Four jobs through the batcher's render pool: the same files and stats as analyze."""
    loaded = loaded_models("residual")
    settings = Settings(batch_size=4, batch_wait_ms=2000)
    options = JobOptions(channel_pngs=True, save_npz=True, overlay=True, top_k=3)
    images = [image_bytes(seed=s) for s in (11, 12, 13, 14)]
    expected = analyze(loaded, images, options, settings)
    batcher = Batcher(settings, render_threads=3)
    got: dict[int, Artifacts] = {}
    for _ in images:
        batcher.expect()

    def job(i: int) -> None:
        got[i] = batcher.run(loaded, images[i], options)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(got) == [0, 1, 2, 3]
    for i, want in enumerate(expected):
        have = got[i]
        assert have.manifest["batch"]["size"] == 4
        assert 0 < have.manifest["batch"]["d2h_bytes"] <= have.manifest["batch"]["activation_bytes"]
        assert list(have.files) == list(want.files)  # model order, whatever order layers ran in
        for name, data in want.files.items():
            if name == "activations.npz":
                continue  # compressed archives carry timestamps
            assert have.files[name] == data, name
        for mine, theirs in zip(have.manifest["layers"], want.manifest["layers"], strict=True):
            # TensorFlow's CPU reductions are not bitwise repeatable from pass to pass (a
            # std once differed in its last float32 bit): equal to float32 rounding.
            assert set(mine["stats"]) == set(theirs["stats"])
            for key, values in theirs["stats"].items():
                if key == "dead":
                    assert mine["stats"][key] == values
                else:
                    np.testing.assert_allclose(mine["stats"][key], values, rtol=1e-6, atol=1e-9)
            assert mine["summary"]["top_k"] == theirs["summary"]["top_k"]
            for key, value in theirs["summary"].items():
                if key != "top_k":
                    assert mine["summary"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), key


def test_on_a_cpu_a_pass_renders_on_one_thread_fewer_while_other_jobs_are_in(
    loaded_models,  # noqa: ANN001
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Three jobs in at once, a pass each: the first pass renders beside the other two
    jobs, on the pool of one thread fewer; a job alone renders on every thread. The
    count of jobs in the batcher is back to 0 after each (results and a failed
    preprocess alike)."""
    from worker.engine.compiled import reduces_on_host
    from worker.runtime.cores import loaded_render_threads

    loaded = loaded_models("residual")
    batcher = Batcher(Settings(batch_size=1), render_threads=3)
    assert loaded_render_threads(3, on_host=True) == 2
    assert loaded_render_threads(1, on_host=True) == 1
    assert loaded_render_threads(3, on_host=False) == 3
    if not reduces_on_host():  # an accelerator: its cores run no forward pass
        assert batcher._render_loaded is batcher._render
        return
    assert batcher._render_loaded._max_workers == 2
    used: list[str] = []
    for name in ("_render", "_render_loaded"):
        pool = getattr(batcher, name)

        def spy(*args, _name=name, _submit=pool.submit):  # noqa: ANN002, ANN202
            used.append(_name)
            return _submit(*args)

        monkeypatch.setattr(pool, "submit", spy)
    images = [image_bytes(seed=s) for s in (51, 52, 53)]
    assert len(run_concurrently(batcher, loaded, images, timeout=60)) == 3
    assert used[0] == "_render_loaded"  # the first pass's first task: two jobs beside it
    assert batcher._jobs == 0
    used.clear()
    assert len(run_concurrently(batcher, loaded, images[:1], timeout=60)) == 1
    assert used and set(used) == {"_render"}
    batcher.expect()
    with pytest.raises(ActvizError):
        batcher.run(loaded, b"not an image", JobOptions())
    assert batcher._jobs == 0


def test_a_pass_renders_image_by_image_so_its_first_image_finishes_first(loaded_models):
    """The render tasks are queued image-major: a one-thread pool finishes image 0 (its
    future done, its manifest complete) before it takes any layer of image 1."""
    from worker.engine.analysis import prepare_image
    from worker.engine.forward_pass import ForwardPass, PassImage

    loaded = loaded_models("residual")
    settings = Settings()
    options = JobOptions()
    extractor = loaded.extractor(options.layers)
    images = [
        PassImage(prepare_image(image_bytes(seed=s), loaded, extractor, options, settings), options)
        for s in (41, 42, 43)
    ]
    forward = ForwardPass(loaded, extractor, images, settings)
    order: list[tuple[str, tuple[int, ...]]] = []
    done_before: dict[int, list[bool]] = {}

    def submit(fn, *args: int) -> None:  # noqa: ANN001
        order.append((fn.__name__, args))
        done_before.setdefault(args[-1], [f.done() for f in forward.futures])
        fn(*args)

    futures = forward.run(submit)
    layers = len(extractor.refs)
    assert layers > 2
    # Each image's layers in order, its input's PNG as a task of its own after the first.
    expected = []
    for position in range(3):
        expected.append(("_layer", (0, position)))
        expected.append(("_input", (position,)))
        expected += [("_layer", (index, position)) for index in range(1, layers)]
    assert order == expected
    assert done_before[1] == [True, False, False]
    assert done_before[2] == [True, True, False]
    results = [future.result() for future in futures]
    assert all(len(r.manifest["layers"]) == layers for r in results)
    for item, result in zip(images, results, strict=True):
        with Image.open(io.BytesIO(result.files["input.png"])) as png:
            np.testing.assert_array_equal(np.asarray(png), item.image.display)


def test_a_failure_while_rendering_one_image_fails_only_that_job(loaded_models, monkeypatch):
    """The other images of the pass succeed, and the pass's pipeline slot is freed."""
    import hashlib

    from worker.engine import ImageRender

    loaded = loaded_models("residual")
    settings = Settings(batch_size=3, batch_wait_ms=2000)
    images = [image_bytes(seed=s) for s in (21, 22, 23)]
    broken = hashlib.sha256(images[1]).hexdigest()
    add_layer = ImageRender.add_layer

    def failing(self, index, ref, layer):  # noqa: ANN001, ANN202
        if self.image.sha256 == broken and index == 1:
            raise RuntimeError("render failed")
        return add_layer(self, index, ref, layer)

    batcher = Batcher(settings, render_threads=2)
    monkeypatch.setattr(ImageRender, "add_layer", failing)
    outcome: dict[int, object] = {}
    for _ in images:
        batcher.expect()

    def job(i: int) -> None:
        try:
            outcome[i] = batcher.run(loaded, images[i], JobOptions())
        except RuntimeError as exc:
            outcome[i] = exc

    threads = [threading.Thread(target=job, args=(i,)) for i in range(len(images))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert isinstance(outcome[1], RuntimeError)
    assert isinstance(outcome[0], Artifacts) and isinstance(outcome[2], Artifacts)
    assert outcome[0].manifest["batch"]["size"] == 3
    # The failed pass gave its pipeline slot back: once idle, the forward thread holds
    # one slot (taken before it waits for images) and every other one is free.
    import time

    from worker.runtime.batcher import PIPELINE_DEPTH

    deadline = time.monotonic() + 10
    while batcher._slots._value != PIPELINE_DEPTH - 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert batcher._slots._value == PIPELINE_DEPTH - 1


def test_passes_stay_within_the_byte_bound_once_the_group_is_measured(loaded_models) -> None:
    """Passes take what fits ACTVIZ_BATCH_MAX_MB, known from the output shapes before the pass."""
    loaded = loaded_models("fully_conv")  # keeps the image's size: 512x512 -> about 3.7 MB
    (probe,) = analyze(loaded, [image_bytes(512, 512, seed=30)], JobOptions(), Settings())
    per_image = probe.manifest["batch"]["activation_bytes"]
    max_mb = (3 * per_image + per_image // 2) // 2**20  # room for 3 images, not 4
    assert 3 * per_image <= max_mb * 2**20 < 4 * per_image
    settings = Settings(batch_size=8, batch_wait_ms=2000, batch_max_mb=max_mb)
    batcher = Batcher(settings, render_threads=2)
    images = [image_bytes(512, 512, seed=s) for s in range(31, 38)]
    results = run_concurrently(batcher, loaded, images, timeout=60)
    assert len(results) == len(images)
    sizes = {r.manifest["batch"]["number"]: r.manifest["batch"]["size"] for r in results}
    assert sorted(sizes.values()) == [1, 3, 3]  # passes of at most 3
    for result in results:
        assert result.manifest["batch"]["activation_bytes"] <= max_mb * 2**20


def test_concurrent_jobs_decode_within_the_pixel_budget(loaded_models) -> None:
    """Six 4-megapixel PNGs at once, a 9-megapixel budget: at most two decode together."""
    import io

    from PIL import Image

    from worker.runtime.pixel_budget import PixelBudget

    loaded = loaded_models("sequential_h5")
    settings = Settings(batch_size=6, batch_wait_ms=50, decode_budget_mp=9)
    batcher = Batcher(settings, render_threads=2)
    rng = np.random.default_rng(7)
    images = []
    for _ in range(6):
        buffer = io.BytesIO()
        pixels = rng.integers(0, 256, (2000, 2000, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
        images.append(buffer.getvalue())
    results = run_concurrently(batcher, loaded, images, timeout=120)
    assert len(results) == 6
    assert batcher.decode_budget.peak <= 9_000_000  # two at a time, never three
    assert batcher.decode_budget.in_flight == 0
    alone = PixelBudget(1_000)
    with alone.reserve(5_000):  # larger than the budget: it decodes, alone
        assert alone.in_flight == 5_000


def test_stage_cpu_is_measured_only_when_asked(loaded_models) -> None:
    loaded = loaded_models("residual")
    (off,) = analyze(loaded, [image_bytes(seed=5)], JobOptions(), Settings())
    assert off.manifest["cpu_ms"] == {}
    (on,) = analyze(loaded, [image_bytes(seed=5)], JobOptions(), Settings(stage_cpu=True))
    cpu = on.manifest["cpu_ms"]
    assert set(cpu) == {"preprocess", "engine", "encode"}
    assert cpu["encode"] > 0 and cpu["preprocess"] > 0
