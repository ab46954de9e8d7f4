"""The census fold against numpy over the stacked activations of every image.

Each image goes through the engine as a census job (`census=True`), and the
fold sees only the manifests, as the worker's fold does.
"""

from __future__ import annotations

import numpy as np
import pytest
from sample_images import image_bytes

from producer.contract import JobOptions
from worker.engine import analyze, open_model, preprocess
from worker.engine.census import Census
from worker.engine.compiled import compile_program, run_sized
from worker.engine.receptive import crop_box, measure_radii

IMAGES = 12
RELATIVE = 1e-6


@pytest.fixture(scope="module")
def census_run(model_files):  # noqa: ANN001, ANN201
    from producer.settings import Settings

    settings = Settings()
    # Conv, pooling, a dead channel; a model whose every layer the compiled reference
    # pass below computes as the engine's pass does (with BatchNorm, the two programs'
    # float32 roundings differ by ~1e-5: that is the compiler's, not the fold's).
    loaded = open_model(model_files["sequential_h5"])
    options = JobOptions(census=True, top_k=3)
    data = [image_bytes(width=40, height=36, seed=seed) for seed in range(IMAGES)]
    results = analyze(loaded, data, options, settings)
    pixels = np.stack([preprocess(d, loaded.input_shape, options, settings).pixels for d in data])
    extractor = loaded.extractor(None)
    # The activations as the engine's compiled pass computes them (on the same pass
    # sizes: 16 padded, or 8 + 4 on a CPU), not an eager call's, whose float32 rounding
    # differs.
    program = compile_program(extractor.model, lambda outputs: outputs)
    outputs = run_sized(program, (pixels,), (0.0,))
    activations = [np.asarray(a, dtype=np.float64) for a in outputs]
    manifests = {f"job{i:02d}": r.manifest for i, r in enumerate(results)}
    return extractor, activations, manifests


def fold(manifests: dict, top_k: int = 3) -> Census:
    census = Census(top_k)
    for job_id, manifest in manifests.items():
        census.add(job_id, manifest)
    return census


def test_census_statistics_equal_numpy_over_every_image(census_run) -> None:  # noqa: ANN001
    extractor, activations, manifests = census_run
    result = fold(manifests).to_dict()
    assert result["images"] == IMAGES
    for ref, acts, layer in zip(extractor.refs, activations, result["layers"], strict=True):
        assert layer["name"] == ref.name
        flat = acts.reshape(-1, acts.shape[-1])  # every position of every image
        np.testing.assert_allclose(layer["mean"], flat.mean(axis=0), rtol=RELATIVE, atol=1e-7)
        np.testing.assert_allclose(layer["std"], flat.std(axis=0), rtol=RELATIVE, atol=1e-7)
        np.testing.assert_array_equal(layer["min"], flat.min(axis=0).astype(np.float32))
        np.testing.assert_array_equal(layer["max"], flat.max(axis=0).astype(np.float32))
        assert layer["count"] == [flat.shape[0]] * flat.shape[1]
        np.testing.assert_allclose(layer["sparsity"], (flat == 0).mean(axis=0), atol=1e-12)
        per_image = acts.reshape(IMAGES, -1, acts.shape[-1])
        dead = (per_image.max(axis=1) == per_image.min(axis=1)).mean(axis=0)
        np.testing.assert_allclose(layer["dead_fraction"], dead)
        # Top-k: the images where each channel's maximum is highest, best first.
        highest = np.argsort(-per_image.max(axis=1), axis=0, kind="stable")[:3]
        for c, top in enumerate(layer["top"]):
            assert [t["job_id"] for t in top] == [f"job{i:02d}" for i in highest[:, c]]
            assert [t["value"] for t in top] == sorted((t["value"] for t in top), reverse=True)


def test_two_half_censuses_merged_equal_one_census_of_every_image(census_run) -> None:  # noqa: ANN001
    _, _, manifests = census_run
    items = list(manifests.items())
    first, second = fold(dict(items[:5])), fold(dict(items[5:]))
    first.merge(Census.from_dict(second.to_dict()))  # through its JSON form, as parts are
    merged, whole = first.to_dict(), fold(manifests).to_dict()
    for a, b in zip(merged["layers"], whole["layers"], strict=True):
        for key in ("count", "min", "max", "sparsity", "dead_fraction", "by_firing"):
            assert a[key] == b[key], key
        for key in ("mean", "std"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-12, atol=1e-15)
        assert a["top"] == b["top"]
    with pytest.raises(ValueError, match="overlap"):
        first.merge(fold(dict(items[:1])))


def test_a_job_delivered_twice_is_counted_once(census_run) -> None:  # noqa: ANN001
    _, _, manifests = census_run
    census = fold(manifests)
    before = census.to_dict()
    job_id, manifest = next(iter(manifests.items()))
    assert census.add(job_id, manifest) is False
    assert census.to_dict() == before


def test_receptive_fields_are_measured_and_crops_cover_the_peak(model_files, census_run) -> None:  # noqa: ANN001
    residual = open_model(model_files["residual"]).extractor(None)
    radii = measure_radii(residual, (32, 32, 3))
    # stem 3x3 (radius 1), a 3x3 separable conv (+1), another (+1), a 2x2 pool.
    by_name = dict(zip([r.name for r in residual.refs], radii, strict=True))
    assert by_name["stem"] == 1
    assert by_name["block1_sep"] == 2
    assert by_name["block2_add"] == 3
    assert by_name["pool"] >= 3
    extractor, _, manifests = census_run
    manifest = next(iter(manifests.values()))
    # conv 3x3, pool 2x2, conv 3x3 (on a stride-2 grid), pool: 1, >= 1, >= 3, >= 3.
    assert [layer["receptive_radius"] for layer in manifest["layers"]] == measure_radii(
        extractor, (32, 32, 3)
    )
    assert manifest["layers"][0]["receptive_radius"] == 1
    assert manifest["layers"][2]["receptive_radius"] >= 3
    crop = crop_box(0, [16, 16, 6], [32, 32], 2)
    assert crop == [0, 0, 4, 4, 32, 32]  # centre (1, 1), radius 2, clipped at the corner
    assert crop_box(5, [6], [32, 32], None) is None
