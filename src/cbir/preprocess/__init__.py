"""Query preprocessing: clean up a query image (denoise, enhance, or ``auto``) before it is embedded."""

from cbir.preprocess.quality import ImageQuality, measure
from cbir.preprocess.query import (
    PRESETS,
    STEPS,
    Auto,
    Bilateral,
    Clahe,
    Gamma,
    Median,
    NonLocalMeans,
    QueryPreprocessor,
    Step,
    UnsharpMask,
    as_rgb_uint8,
    build_preprocessor,
)

__all__ = [
    "PRESETS", "STEPS", "Auto", "Bilateral", "Clahe", "Gamma", "ImageQuality", "Median", "NonLocalMeans",
    "QueryPreprocessor", "Step", "UnsharpMask", "as_rgb_uint8", "build_preprocessor", "measure",
]
