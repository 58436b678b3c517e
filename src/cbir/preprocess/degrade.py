"""Synthetic query degradations for the degraded-query benchmark and the preprocessing tests.

Each takes a uint8 RGB ``HxWx3`` image and returns a uint8 RGB image of the same size; the random ones
take a ``seed`` and give the same output for the same seed, so a benchmark run is repeatable.
:func:`standard_degradations` is the benchmark's suite (Gaussian noise, blur, JPEG q=10-20, low light).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np


def gaussian_noise(image: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """Add zero-mean Gaussian noise of standard deviation ``sigma`` (in 0-255 units), clipped."""
    rng = np.random.default_rng(seed)
    noisy = image.astype(np.float32) + rng.normal(0.0, sigma, size=image.shape).astype(np.float32)
    return _to_uint8(noisy)


def gaussian_blur(image: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:  # noqa: ARG001 - uniform signature
    """Gaussian blur of standard deviation ``sigma`` pixels (defocus / motion-free camera shake)."""
    return cv2.GaussianBlur(image, (0, 0), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT101)


def jpeg(image: np.ndarray, quality: int, seed: int = 0) -> np.ndarray:  # noqa: ARG001 - uniform signature
    """Re-encode as JPEG at ``quality`` (1-100) and decode: blocking and chroma bleeding."""
    ok, buffer = cv2.imencode(".jpg", cv2.cvtColor(image, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise RuntimeError("OpenCV failed to JPEG-encode the image")
    return cv2.cvtColor(cv2.imdecode(buffer, cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def low_light(image: np.ndarray, gamma: float = 2.2, gain: float = 0.6, noise_sigma: float = 4.0,
              seed: int = 0) -> np.ndarray:
    """An under-exposed shot: ``gain * (x / 255) ** gamma`` darkens and crushes the shadows, then sensor
    noise of ``noise_sigma`` is added."""
    dark = gain * np.power(image.astype(np.float32) / 255.0, gamma) * 255.0
    if noise_sigma > 0:
        dark += np.random.default_rng(seed).normal(0.0, noise_sigma, size=image.shape).astype(np.float32)
    return _to_uint8(dark)


def _to_uint8(pixels: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Degradation:
    """A named degradation with fixed parameters: ``degradation(image, seed)``."""

    name: str
    function: Callable[..., np.ndarray]
    params: dict = field(default_factory=dict)

    def __call__(self, image: np.ndarray, seed: int = 0) -> np.ndarray:
        return self.function(image, seed=seed, **self.params)

    def describe(self) -> dict:
        return {"name": self.name, "kind": self.function.__name__, **self.params}


def standard_degradations() -> list[Degradation]:
    """The benchmark's suite, sized for 64 px emoji (a blur of sigma 1.5 px there is a heavy defocus)."""
    return [
        Degradation("noise_s15", gaussian_noise, {"sigma": 15.0}),
        Degradation("noise_s30", gaussian_noise, {"sigma": 30.0}),
        Degradation("blur_s1", gaussian_blur, {"sigma": 1.0}),
        Degradation("blur_s1.5", gaussian_blur, {"sigma": 1.5}),
        Degradation("jpeg_q20", jpeg, {"quality": 20}),
        Degradation("jpeg_q10", jpeg, {"quality": 10}),
        Degradation("low_light", low_light, {"gamma": 2.2, "gain": 0.6, "noise_sigma": 4.0}),
    ]
