"""The activation engine: plain functions from (model, images) to grids, stats, manifest.

    loaded = open_model("m.h5", uri="s3://b/m.h5", trusted=False)
    results = analyze(loaded, [jpeg_bytes], JobOptions(layers=":8"), Settings())

Imports Keras (and so the configured backend); only workers import this package.
"""

from worker.engine.analysis import analyze, check_options, pass_sizes, prepare_image, warmup
from worker.engine.artifacts import Artifacts, ImageRender
from worker.engine.extract import Extractor, ReducedPass, build_extractor, extract
from worker.engine.forward_pass import ForwardPass, PassImage
from worker.engine.layers import LayerRef, flatten_layers, select_layers
from worker.engine.loading import LoadedModel, load_model, open_model
from worker.engine.manifest import manifest_bytes
from worker.engine.preprocess import PreparedImage, preprocess
from worker.engine.reduce import RenderKey
from worker.engine.render import colormap_lut
from worker.engine.stats import layer_summary, stats_from_moments

__all__ = [
    "Artifacts",
    "Extractor",
    "ForwardPass",
    "ImageRender",
    "LayerRef",
    "LoadedModel",
    "PassImage",
    "PreparedImage",
    "ReducedPass",
    "RenderKey",
    "analyze",
    "build_extractor",
    "check_options",
    "colormap_lut",
    "extract",
    "flatten_layers",
    "layer_summary",
    "load_model",
    "manifest_bytes",
    "open_model",
    "pass_sizes",
    "prepare_image",
    "preprocess",
    "select_layers",
    "stats_from_moments",
    "warmup",
]
