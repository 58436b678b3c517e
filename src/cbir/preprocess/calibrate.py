"""Fit ``auto``'s thresholds to a domain from clean images of it (a model's training images).

``auto``'s shipped thresholds were read off emoji drawings: white backgrounds, bright, sharp at 64 px. On another
domain they misfire — Fashion-MNIST's black backgrounds read as *low light* on 87 % of clean images, and
brightening them cost a trained model up to 45 points of R@1 (``benchmarks/query_quality.py --data
fashion_mnist``). A clean-up step should fire only on what clean images of the domain do not look like, so each
threshold is moved out, never in, to the quantile of the domain's clean images that the shipped one was read at on
emoji (:data:`QUANTILES`):

- ``dark_threshold`` → at most the 1 % quantile of clean brightness, and ``target_brightness`` scaled with it
  (never past the clean median: a dark domain is brought back into *its* range, not to a white page's level);
- ``noise_threshold`` → at least the 99 % quantile of the clean noise estimate (fine texture reads as noise),
  ``strong_noise_threshold`` scaled with it;
- ``sharpness_threshold`` → at most the 5 % quantile of clean sharpness (small, soft images);
- ``jpeg_threshold`` → at least the 99 % quantile of clean images' JPEG-grid measure (blockiness is read only on
  images that pass it, so clean images say nothing about ``blockiness_threshold``, which stays);
- ``contrast_threshold`` → at most the 1 % quantile of clean contrast (it is 0, off, unless set).

On a domain where clean images already sit inside the shipped thresholds (emoji, where they were chosen) nothing
changes. The result is plain data, stored in a bundle (``preprocessing.auto``), which fills in every ``auto``
parameter a query-time spec does not set itself.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import numpy as np

from cbir.errors import ConfigError
from cbir.preprocess.quality import measure
from cbir.preprocess.query import Auto

CALIBRATION_IMAGES = 500  # clean images measured per domain (about 1 ms each at 64 px)
MIN_IMAGES = 20  # fewer clean images say too little about a domain's tails
# The quantile of clean images each threshold is read at: where the shipped ones were read on emoji train images
# (brightness over 122 on 99 %, noise under 5.9 on 99 %, sharpness over 388 on 95 %, JPEG grid: ~1-2 % over 0.1)
QUANTILES = {"brightness": 0.01, "noise_sigma": 0.99, "sharpness": 0.05, "jpeg_grid": 0.99, "contrast": 0.01}


def fit_auto(images: Iterable[np.ndarray], base: Auto | None = None) -> dict:
    """``{"params": {...Auto thresholds...}, "images": n, "clean": {measurement: [its quantile in QUANTILES,
    median]}}`` for clean RGB uint8 ``images`` of one domain, starting from ``base`` (default: the shipped
    :class:`~cbir.preprocess.query.Auto`). Each threshold only moves so that fewer clean images cross it."""
    base = base or Auto()
    measured = [measure(image) for image in images]
    if len(measured) < MIN_IMAGES:
        raise ConfigError(f"auto calibration needs at least {MIN_IMAGES} clean images of the domain, got "
                          f"{len(measured)}")
    values = {key: np.array([getattr(m, key) for m in measured], np.float64) for key in QUANTILES}
    edge = {key: float(np.quantile(values[key], q)) for key, q in QUANTILES.items()}
    median = {key: float(np.median(v)) for key, v in values.items()}
    noise = max(base.noise_threshold, edge["noise_sigma"])
    dark = min(base.dark_threshold, edge["brightness"])
    params = {
        "dark_threshold": dark,
        # back into the domain's clean range by the shipped margin (150 for 115), never past its median: a dark
        # domain's darkest clean images are dark things, and lifting them to a white page's level hurt on
        # Fashion-MNIST
        "target_brightness": max(1.0, min(base.target_brightness, median["brightness"],
                                          dark * base.target_brightness / base.dark_threshold)),
        "noise_threshold": noise,
        "strong_noise_threshold": max(base.strong_noise_threshold,
                                      noise * base.strong_noise_threshold / max(base.noise_threshold, 1e-6)),
        "sharpness_threshold": min(base.sharpness_threshold, edge["sharpness"]),
        "jpeg_threshold": max(base.jpeg_threshold, edge["jpeg_grid"]),
        "contrast_threshold": min(base.contrast_threshold, edge["contrast"]),
    }
    params = {key: round(value, 3) for key, value in params.items()}
    dataclasses.replace(base, **params)  # the fitted values are valid Auto parameters
    clean = {key: [round(edge[key], 3), round(median[key], 3)] for key in values}
    return {"params": params, "images": len(measured), "clean": clean}
