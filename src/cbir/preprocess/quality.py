"""Cheap no-reference measurements of a query image: noise level, brightness, contrast, sharpness.

They let ``auto`` preprocessing decide which clean-up steps an image needs. All work on the luminance
(OpenCV's grey conversion, 0-255) and cost a few filter passes, so measuring a clean image is cheap.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import cv2
import numpy as np

# Immerkaer's noise mask: the difference of two Laplacians, blind to linear ramps and flat areas.
_NOISE_MASK = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]], dtype=np.float32)
_NOISE_MASK_NORM = 6.0  # sqrt of the sum of squared mask entries: the filter's gain on white noise
_MAD_TO_SIGMA = 0.6745  # median(|x|) of a standard normal


@dataclass(frozen=True)
class ImageQuality:
    noise_sigma: float  # estimated std of additive noise, 0-255 units
    brightness: float  # mean luminance, 0-255
    contrast: float  # std of luminance, 0-255
    sharpness: float  # variance of the Laplacian of the luminance (low = blurred)

    def as_dict(self) -> dict:
        return {k: round(float(v), 3) for k, v in asdict(self).items()}


def luminance(image: np.ndarray) -> np.ndarray:
    """Float32 luminance (0-255) of a uint8 RGB image."""
    return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY).astype(np.float32)


def estimate_noise_sigma(grey: np.ndarray) -> float:
    """Robust (median absolute deviation) version of Immerkaer's fast noise estimator: the mask's response
    is pure noise except on edges and texture, which the median ignores as long as they cover under half
    the image. Saturated pixels (0 or 255) are left out, since clipping hides the noise there."""
    response = cv2.filter2D(grey, cv2.CV_32F, _NOISE_MASK, borderType=cv2.BORDER_REFLECT101)[1:-1, 1:-1]
    inner = grey[1:-1, 1:-1]
    unclipped = np.abs(response[(inner > 0) & (inner < 255)])
    if unclipped.size < 16:
        return 0.0
    return float(np.median(unclipped) / (_MAD_TO_SIGMA * _NOISE_MASK_NORM))


def measure(image: np.ndarray) -> ImageQuality:
    """All four measurements of a uint8 RGB image."""
    grey = luminance(image)
    return ImageQuality(
        noise_sigma=estimate_noise_sigma(grey),
        brightness=float(grey.mean()),
        contrast=float(grey.std()),
        sharpness=float(cv2.Laplacian(grey, cv2.CV_32F).var()),
    )
