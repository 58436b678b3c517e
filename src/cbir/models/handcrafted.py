"""The hand-crafted CBIR descriptor, the baseline the learned models are compared against.

:class:`HandcraftedEmbedder` is a drop-in for :class:`cbir.models.embedder.Embedder` (same ``input_size``,
``mean``, ``std``, ``embedding_dim`` and ``forward``), so it runs through the same data pipeline, metrics,
``eval.py`` and export code as the networks. Its descriptor is the conventional one:

* colour — a joint HSV histogram (OpenCV ``calcHist``);
* texture — a histogram of rotation-invariant uniform LBP codes (scikit-image ``local_binary_pattern``),
  optionally on a spatial grid;
* shape — HOG (scikit-image ``hog``, L2-Hys block normalisation).

Each block is power-normalised (``power=0.5`` is the Hellinger/"root" mapping that makes the inner
product of histograms behave like a histogram similarity instead of being dominated by the biggest bin),
L2-normalised, weighted, concatenated and L2-normalised again.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import cv2
import numpy as np
import torch
from skimage.feature import hog, local_binary_pattern
from torch import nn

from cbir.errors import ConfigError
from cbir.models.backbones import IMAGENET_MEAN, IMAGENET_STD


@dataclass(frozen=True)
class DescriptorOptions:
    """Settings of the hand-crafted descriptor (``conf/model/handcrafted.yaml`` names the same keys).
    The defaults were chosen on the emoji *train* split (all-vs-all and cross-vendor P@1/MAP@R)."""

    hsv_bins: tuple[int, int, int] = (8, 2, 2)   # hue, saturation, value
    lbp_points: int = 8
    lbp_radius: float = 1.0
    lbp_grid: int = 1                             # LBP histograms on a grid x grid layout of cells
    hog_cell: int = 8                             # HOG cell side in pixels (at the embedder's input size)
    hog_block: int = 2                            # HOG block side in cells
    hog_orientations: int = 9
    power: float = 0.5                            # per-block power normalisation; 1 = none, 0.5 = sqrt
    weights: tuple[float, float, float] = (1.0, 0.5, 2.0)  # colour, texture, shape block weights

    def __post_init__(self) -> None:
        checks = [
            (len(self.hsv_bins) == 3 and all(int(b) >= 1 for b in self.hsv_bins), "hsv_bins",
             "three positive bin counts [hue, saturation, value]"),
            (self.lbp_points >= 1, "lbp_points", "at least 1"),
            (self.lbp_radius > 0, "lbp_radius", "> 0"),
            (self.lbp_grid >= 1, "lbp_grid", "at least 1"),
            (self.hog_cell >= 2, "hog_cell", "at least 2 pixels"),
            (self.hog_block >= 1, "hog_block", "at least 1 cell"),
            (self.hog_orientations >= 1, "hog_orientations", "at least 1"),
            (self.power > 0, "power", "> 0"),
            (len(self.weights) == 3 and all(w >= 0 for w in self.weights) and sum(self.weights) > 0, "weights",
             "three non-negative numbers [colour, texture, shape], not all 0"),
        ]
        for ok, key, need in checks:
            if not ok:
                raise ConfigError(f"model.descriptor.{key}={getattr(self, key)!r}: must be {need}")


class HandcraftedDescriptor:
    """uint8 RGB image (H, W, 3) → float32 descriptor; :meth:`dim` gives its length for a given size."""

    def __init__(self, options: DescriptorOptions = DescriptorOptions()) -> None:
        self.options = options
        self._hsv_bins = [int(b) for b in options.hsv_bins]

    def colour(self, rgb: np.ndarray) -> np.ndarray:
        hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)  # OpenCV's 8-bit hue runs 0..179
        return cv2.calcHist([hsv], [0, 1, 2], None, self._hsv_bins, [0, 180, 0, 256, 0, 256]).ravel()

    def texture(self, grey: np.ndarray) -> np.ndarray:
        o = self.options
        codes = local_binary_pattern(grey, o.lbp_points, o.lbp_radius, method="uniform")
        bins = o.lbp_points + 2  # P + 1 uniform patterns + one bin for all non-uniform ones
        cells = [cell for band in np.array_split(codes, o.lbp_grid, axis=0)
                 for cell in np.array_split(band, o.lbp_grid, axis=1)]
        return np.concatenate([np.bincount(c.astype(np.int64).ravel(), minlength=bins) for c in cells])

    def shape(self, grey: np.ndarray) -> np.ndarray:
        o = self.options
        return hog(grey, orientations=o.hog_orientations, pixels_per_cell=(o.hog_cell, o.hog_cell),
                   cells_per_block=(o.hog_block, o.hog_block), block_norm="L2-Hys", feature_vector=True)

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
        blocks = (self.colour(rgb), self.texture(grey), self.shape(grey))
        parts = [weight * _normalise(block.astype(np.float32), self.options.power)
                 for block, weight in zip(blocks, self.options.weights)]
        return _normalise(np.concatenate(parts), 1.0)

    def dim(self, size: int) -> int:
        return int(self(np.zeros((size, size, 3), np.uint8)).shape[0])


def _normalise(vector: np.ndarray, power: float) -> np.ndarray:
    if power != 1.0:
        vector = np.sign(vector) * np.abs(vector) ** power
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0 else vector


class HandcraftedEmbedder(nn.Module):
    """The hand-crafted descriptor behind the :class:`~cbir.models.embedder.Embedder` interface.

    ``forward`` takes the normalised NCHW float batch the data pipeline produces, undoes the
    normalisation (``mean``/``std``) back to uint8 RGB, describes each image on the CPU and returns an
    L2-normalised float32 ``(N, embedding_dim)`` tensor on the input's device. Nothing to train.
    """

    scriptable = False  # numpy/OpenCV inside: bundles keep the eager model only (no TorchScript/ONNX copy)

    def __init__(self, input_size: int = 64, options: DescriptorOptions = DescriptorOptions(),
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> None:
        super().__init__()
        self.input_size = int(input_size)
        if self.input_size < options.hog_cell * options.hog_block:
            raise ConfigError(f"model.image_size={self.input_size}: the hand-crafted descriptor needs at least "
                              f"hog_cell x hog_block = {options.hog_cell * options.hog_block} pixels")
        self.mean = tuple(float(v) for v in mean)
        self.std = tuple(float(v) for v in std)
        self.options = options
        self.descriptor = HandcraftedDescriptor(options)
        self._dim = self.descriptor.dim(self.input_size)
        self.scales, self.scale_power = (1.0,), 1.0

    @property
    def embedding_dim(self) -> int:
        return self._dim

    def set_scales(self, scales: Sequence[float] | None, power: float = 1.0) -> None:
        """Multi-scale inference is a network option; the descriptor accepts only one scale."""
        if scales and tuple(float(s) for s in scales) != (1.0,):
            raise ConfigError(f"model.scales={list(scales)}: the hand-crafted descriptor has no multi-scale "
                              "inference; leave model.scales unset")

    def to_uint8_rgb(self, images: torch.Tensor) -> np.ndarray:
        """Undo the pipeline's normalisation: NCHW float → NHWC uint8 RGB."""
        mean = images.new_tensor(self.mean).view(1, -1, 1, 1)
        std = images.new_tensor(self.std).view(1, -1, 1, 1)
        pixels = (images.float() * std + mean).mul(255.0).round().clamp(0, 255).to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).contiguous().cpu().numpy()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"expected an (N, 3, H, W) batch, got shape {tuple(images.shape)}")
        rgb = self.to_uint8_rgb(images)
        if rgb.shape[1:3] != (self.input_size, self.input_size):
            rgb = np.stack([cv2.resize(im, (self.input_size, self.input_size), interpolation=cv2.INTER_AREA)
                            for im in rgb])
        out = np.empty((len(rgb), self._dim), np.float32)
        for i, image in enumerate(rgb):
            out[i] = self.descriptor(image)
        return torch.from_numpy(out).to(images.device)

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, dim={self._dim}, {asdict(self.options)}"


def build_handcrafted_embedder(image_size: int = 64, **options) -> HandcraftedEmbedder:
    """From plain config values (lists become tuples); unknown keys are a :class:`ConfigError`."""
    known = DescriptorOptions.__dataclass_fields__
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ConfigError(f"model.descriptor.{unknown[0]}: not an option of the hand-crafted descriptor; "
                          f"choose from: {', '.join(known)}")
    values = {k: tuple(v) if isinstance(v, Sequence) and not isinstance(v, str) else v for k, v in options.items()}
    return HandcraftedEmbedder(image_size, DescriptorOptions(**values))
