"""Query clean-up before embedding: denoise (non-local means, bilateral, median) and enhance (CLAHE on
luminance, gamma, unsharp mask), composed into a :class:`QueryPreprocessor`, plus an ``auto`` step that
measures the image (:mod:`cbir.preprocess.quality`) and applies only what the measurements call for.

Every step maps a uint8 RGB ``HxWx3`` array to a uint8 RGB array of the same size, is a frozen dataclass
of plain numbers (picklable for DataLoader workers, comparable, and described by :meth:`describe` for a
bundle manifest or JSON output), and is built from plain data by :func:`build_preprocessor`::

    build_preprocessor("auto")
    build_preprocessor(["nlm", {"name": "clahe", "clip_limit": 3.0}])
    build_preprocessor({"steps": [{"name": "gamma", "gamma": 0.7}]})   # the conf/preprocess/*.yaml shape

The preprocessor runs on the query at its own resolution, before the model's resize and normalisation.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import cv2
import numpy as np

from cbir.errors import BadImageError, CbirError, ConfigError
from cbir.preprocess.quality import estimate_noise_sigma, luminance, measure


def as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """The image as uint8 RGB ``HxWx3``: grey (``HxW`` or ``HxWx1``) is replicated to three channels and
    RGBA is composited onto white (as :func:`cbir.data.datamodule.load_image` does); anything else is
    rejected with a :class:`~cbir.errors.BadImageError` naming the fix."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise BadImageError(f"query image must be uint8 (0-255), got {image.dtype}; "
                            "convert with (image * 255).clip(0, 255).astype(np.uint8) if it is 0-1 floats")
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[2] not in (1, 3, 4) or min(image.shape[:2]) < 1:
        raise BadImageError(f"query image must be HxW (grey), HxWx3 (RGB) or HxWx4 (RGBA), got shape {image.shape}")
    if image.shape[2] == 1:
        return np.repeat(image, 3, axis=2)
    if image.shape[2] == 4:
        alpha = image[:, :, 3:].astype(np.float32) / 255.0
        blended = image[:, :, :3].astype(np.float32) * alpha + 255.0 * (1.0 - alpha)
        return np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(image)


class Step:
    """Base of the preprocessing steps: ``step(image) -> image`` on uint8 RGB, ``describe()`` -> dict."""

    name: ClassVar[str]

    def __call__(self, image: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, **dataclasses.asdict(self)}  # type: ignore[call-overload]


def _require(condition: bool, step: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"preprocess step '{step}': {message}")


# --- denoising --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NonLocalMeans(Step):
    """Non-local means (``cv2.fastNlMeansDenoisingColored``). ``h`` (luminance) and ``h_color`` (chroma)
    set the filter strength; ``None`` derives them from the image's estimated noise level
    (``h_per_sigma`` times it, at least ``h_min``), so one setting suits light and heavy noise.
    Windows 5/11 (not OpenCV's 7/21): as good on 64 px emoji, and about 2.5x faster."""

    name: ClassVar[str] = "nlm"
    h: float | None = None
    h_color: float | None = None
    h_per_sigma: float = 0.8
    h_min: float = 3.0
    template_window: int = 5
    search_window: int = 11

    def __post_init__(self) -> None:
        for field in ("h", "h_color"):
            value = getattr(self, field)
            _require(value is None or value > 0, self.name, f"{field} must be > 0 or null (from noise), got {value}")
        _require(self.h_per_sigma > 0 and self.h_min >= 0, self.name, "h_per_sigma must be > 0 and h_min >= 0")
        _require(self.template_window % 2 == 1 and self.search_window % 2 == 1, self.name,
                 "template_window and search_window must be odd")

    def strength(self, image: np.ndarray) -> tuple[float, float]:
        """The (h, h_color) used on ``image``."""
        if self.h is not None and self.h_color is not None:
            return float(self.h), float(self.h_color)
        adaptive = max(self.h_min, self.h_per_sigma * estimate_noise_sigma(luminance(image)))
        return (float(self.h) if self.h is not None else adaptive,
                float(self.h_color) if self.h_color is not None else adaptive)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        h, h_color = self.strength(image)
        return cv2.fastNlMeansDenoisingColored(image, None, h, h_color, self.template_window, self.search_window)


@dataclass(frozen=True)
class Bilateral(Step):
    """Edge-preserving bilateral filter (``cv2.bilateralFilter``): ``diameter`` pixels, colour and space
    sigmas. Cheap (well under a millisecond on 64 px)."""

    name: ClassVar[str] = "bilateral"
    diameter: int = 5
    sigma_color: float = 50.0
    sigma_space: float = 5.0

    def __post_init__(self) -> None:
        _require(self.diameter >= 1 and self.sigma_color > 0 and self.sigma_space > 0, self.name,
                 "diameter must be >= 1 and the sigmas > 0")

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return cv2.bilateralFilter(image, self.diameter, self.sigma_color, self.sigma_space)


@dataclass(frozen=True)
class Median(Step):
    """Median filter (``cv2.medianBlur``) of an odd ``ksize``: removes salt-and-pepper and mild noise."""

    name: ClassVar[str] = "median"
    ksize: int = 3

    def __post_init__(self) -> None:
        _require(self.ksize >= 3 and self.ksize % 2 == 1, self.name, f"ksize must be odd and >= 3, got {self.ksize}")

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return cv2.medianBlur(image, self.ksize)


# --- enhancement ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clahe(Step):
    """Contrast-limited adaptive histogram equalisation of the luminance only (L of CIE LAB), so colours
    keep their hue. ``clip_limit`` bounds the contrast gain, ``tile_grid`` tiles per side."""

    name: ClassVar[str] = "clahe"
    clip_limit: float = 2.0
    tile_grid: int = 8

    def __post_init__(self) -> None:
        _require(self.clip_limit > 0 and self.tile_grid >= 1, self.name, "clip_limit must be > 0 and tile_grid >= 1")

    def __call__(self, image: np.ndarray) -> np.ndarray:
        lab = cv2.cvtColor(image, cv2.COLOR_RGB2LAB)
        # cv2.CLAHE objects do not pickle, so one is made per call (microseconds)
        clahe = cv2.createCLAHE(clipLimit=self.clip_limit, tileGridSize=(self.tile_grid, self.tile_grid))
        lab[:, :, 0] = clahe.apply(np.ascontiguousarray(lab[:, :, 0]))
        return cv2.cvtColor(lab, cv2.COLOR_LAB2RGB)


@dataclass(frozen=True)
class Gamma(Step):
    """Gamma curve ``255 * (x / 255) ** gamma`` on every channel (< 1 brightens). ``gamma=None`` picks the
    exponent that moves the mean luminance to ``target_brightness``, limited to [``min_gamma``, ``max_gamma``];
    ``max_gamma=1`` (the default) means it only ever brightens, so a bright clean query is left alone."""

    name: ClassVar[str] = "gamma"
    gamma: float | None = None
    target_brightness: float = 128.0
    min_gamma: float = 0.3
    max_gamma: float = 1.0

    def __post_init__(self) -> None:
        _require(self.gamma is None or self.gamma > 0, self.name, f"gamma must be > 0 or null, got {self.gamma}")
        _require(0 < self.target_brightness < 255, self.name, "target_brightness must lie in (0, 255)")
        _require(0 < self.min_gamma <= self.max_gamma, self.name, "need 0 < min_gamma <= max_gamma")

    def exponent(self, image: np.ndarray) -> float:
        """The gamma used on ``image``."""
        if self.gamma is not None:
            return float(self.gamma)
        mean = float(np.clip(luminance(image).mean(), 1.0, 254.0)) / 255.0
        return float(np.clip(math.log(self.target_brightness / 255.0) / math.log(mean), self.min_gamma, self.max_gamma))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        table = np.clip(np.rint(255.0 * (np.arange(256) / 255.0) ** self.exponent(image)), 0, 255).astype(np.uint8)
        return cv2.LUT(image, table)


@dataclass(frozen=True)
class UnsharpMask(Step):
    """Unsharp mask: ``image + amount * (image - gaussian_blur(image, sigma))``, sharpening edges that a
    defocused or resized query lost."""

    name: ClassVar[str] = "unsharp"
    sigma: float = 1.0
    amount: float = 1.0

    def __post_init__(self) -> None:
        _require(self.sigma > 0, self.name, f"sigma must be > 0, got {self.sigma}")
        _require(self.amount >= 0, self.name, f"amount must be >= 0, got {self.amount}")

    def __call__(self, image: np.ndarray) -> np.ndarray:
        blurred = cv2.GaussianBlur(image, (0, 0), sigmaX=self.sigma, sigmaY=self.sigma)
        return cv2.addWeighted(image, 1.0 + self.amount, blurred, -self.amount, 0)


# --- automatic choice -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Auto(Step):
    """Measure the image, then apply only the steps it needs, in this order:

    1. brightness (mean luminance) below ``dark_threshold`` → :class:`Gamma` towards ``target_brightness``;
    2. estimated noise sigma above ``noise_threshold`` → the ``denoiser``, or above ``strong_noise_threshold``
       the ``strong_denoiser`` (on emoji queries, bilateral retrieved best under moderate noise, sigma 15, at
       1/100 of the cost of non-local means, which retrieved better under heavy noise, sigma 30);
    3. contrast (luminance std) below ``contrast_threshold`` → :class:`Clahe` (off by default: CLAHE lowered
       R@1 on every emoji query set, clean or degraded; set a threshold such as 20 for photo domains);
    4. JPEG compression found (:func:`~cbir.preprocess.quality.jpeg_grid` above ``jpeg_threshold``) with visible
       blocking (:func:`~cbir.preprocess.quality.blockiness` above ``blockiness_threshold``), and no noise found
       → the ``deblocker`` (edge-preserving smoothing of the block edges);
    5. sharpness (variance of the Laplacian) below ``sharpness_threshold``, no noise and no JPEG found →
       :class:`UnsharpMask` (noise or block edges would be sharpened too).

    The image is re-measured after brightening, since a gamma curve changes the noise level.
    A clean image costs the measurements (about 1 ms at 64 px, the JPEG ones read at most 256 x 256 pixels) and
    nearly always comes back unchanged.
    Thresholds come from 500 emoji train images at 64 px (``benchmarks/degraded_queries.py --measure-train
    500`` prints the percentiles): clean ones have brightness over 122 (1st percentile; low light: median 96),
    noise sigma under 5.9 (99th; Gaussian sigma 15: over 6.4, sigma 30: over 12.4), sharpness over 388
    (5th; blur sigma 1: median 184). The estimated noise sigma reads low (about 0.6x the true one on
    emoji, whose white backgrounds clip). Sharpness depends on resolution: recalibrate
    ``sharpness_threshold`` for much larger queries. JPEG (same 300 train images, ``--measure-train``): the grid
    measure is under 0.07 on 95 % of clean, blurred, noisy and dark images and over 0.14 on 95 % of JPEG q10-q70
    ones; blockiness exceeds 1.2 on 91 % of q10 and 71 % of q20 images, 0 % of clean ones past the grid test.
    """

    name: ClassVar[str] = "auto"
    noise_threshold: float = 6.0
    dark_threshold: float = 115.0
    target_brightness: float = 150.0
    contrast_threshold: float = 0.0
    sharpness_threshold: float = 250.0
    denoiser: str = "bilateral"
    strong_noise_threshold: float = 12.0
    strong_denoiser: str = "nlm"
    jpeg_threshold: float = 0.1
    blockiness_threshold: float = 1.2
    deblocker: str = "bilateral"

    _DENOISERS: ClassVar[dict[str, type[Step]]] = {"nlm": NonLocalMeans, "bilateral": Bilateral, "median": Median}

    def __post_init__(self) -> None:
        for field in ("denoiser", "strong_denoiser", "deblocker"):
            _require(getattr(self, field) in self._DENOISERS, self.name,
                     f"{field} must be one of {', '.join(self._DENOISERS)}, got {getattr(self, field)!r}")
        _require(0 < self.target_brightness < 255, self.name, "target_brightness must lie in (0, 255)")

    def plan_and_apply(self, image: np.ndarray) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """The processed image and what was done, each entry ``{"step", "reason"}`` plus the measurements."""
        applied: list[dict[str, Any]] = []
        quality = measure(image)
        if quality.brightness < self.dark_threshold:
            image = Gamma(target_brightness=self.target_brightness)(image)
            applied.append({"step": "gamma", "reason": f"brightness {quality.brightness:.1f} < {self.dark_threshold}"})
            quality = measure(image)
        noisy = quality.noise_sigma > self.noise_threshold
        if noisy:
            strong = quality.noise_sigma > self.strong_noise_threshold
            denoiser = self.strong_denoiser if strong else self.denoiser
            image = self._DENOISERS[denoiser]()(image)
            threshold = self.strong_noise_threshold if strong else self.noise_threshold
            applied.append({"step": denoiser, "reason": f"noise sigma {quality.noise_sigma:.1f} > {threshold}"})
        if quality.contrast < self.contrast_threshold:
            image = Clahe()(image)
            applied.append({"step": "clahe", "reason": f"contrast {quality.contrast:.1f} < {self.contrast_threshold}"})
        compressed = quality.jpeg_grid > self.jpeg_threshold
        if compressed and not noisy and quality.blockiness > self.blockiness_threshold:
            image = self._DENOISERS[self.deblocker]()(image)
            applied.append({"step": self.deblocker, "reason": f"JPEG blocking: grid {quality.jpeg_grid:.2f} > "
                                                              f"{self.jpeg_threshold}, blockiness {quality.blockiness:.2f}"
                                                              f" > {self.blockiness_threshold}"})
        if not noisy and not compressed and quality.sharpness < self.sharpness_threshold:
            image = UnsharpMask()(image)
            applied.append({"step": "unsharp",
                            "reason": f"sharpness {quality.sharpness:.0f} < {self.sharpness_threshold}"})
        for entry in applied:
            entry["measured"] = quality.as_dict()
        return image, applied

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.plan_and_apply(image)[0]


# --- pipeline and factory ---------------------------------------------------------------------------

STEPS: dict[str, type[Step]] = {cls.name: cls for cls in (NonLocalMeans, Bilateral, Median, Clahe, Gamma,
                                                          UnsharpMask, Auto)}
PRESETS: dict[str, list[str]] = {"none": [], "denoise_enhance": ["nlm", "clahe"]}


class CleanUpTimeout(CbirError):
    """A query's clean-up ran past its deadline (a service's time limit)."""


MAX_PREPROCESS_PIXELS = 1 << 20  # 1024 x 1024: what a query is cut down to before clean-up steps run


def fit_pixels(image: np.ndarray, max_pixels: int) -> np.ndarray:
    """``image`` shrunk (area interpolation, aspect kept) to at most ``max_pixels`` pixels; as it is when
    already small enough."""
    height, width = image.shape[:2]
    if height * width <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (height * width))
    size = (max(1, int(width * scale)), max(1, int(height * scale)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


@dataclass(frozen=True)
class QueryPreprocessor:
    """Steps applied in order to a query image. No steps = the identity (the image is returned as is).

    Before any step runs, a query larger than ``max_pixels`` is shrunk to that size: non-local means costs
    about a second per megapixel here (a 36 Mpx upload held a service's worker for 43 s), while the model
    sees at most a few hundred pixels a side, so the clean-up of a huge photo costs what a 1 Mpx one does
    and the embedding barely changes."""

    steps: tuple[Step, ...] = ()
    max_pixels: int = MAX_PREPROCESS_PIXELS

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", tuple(self.steps))

    def __call__(self, image: np.ndarray) -> np.ndarray:
        return self.apply(image)[0]

    def apply(self, image: np.ndarray, deadline: float | None = None) -> tuple[np.ndarray, list[dict[str, Any]]]:
        """The processed uint8 RGB image (grey/RGBA inputs become RGB) and a list of the steps applied
        (``auto`` reports only the steps it chose, with its reasons). ``deadline`` (a ``time.monotonic()``
        value): a step that would start after it is not run; :class:`CleanUpTimeout` is raised instead (a
        service's time limit; one step on a capped image takes a second or two at most)."""
        if not self.steps:
            return image, []
        image = as_rgb_uint8(image)
        applied: list[dict[str, Any]] = []
        if image.shape[0] * image.shape[1] > self.max_pixels:
            before = [int(image.shape[1]), int(image.shape[0])]
            image = fit_pixels(image, self.max_pixels)
            applied.append({"step": "downscale", "from": before, "to": [int(image.shape[1]), int(image.shape[0])]})
        for step in self.steps:
            if deadline is not None and time.monotonic() > deadline:
                raise CleanUpTimeout(f"query clean-up stopped before '{step.name}': past its time limit")
            if isinstance(step, Auto):
                image, chosen = step.plan_and_apply(image)
                applied += chosen
            else:
                image = step(image)
                applied.append({"step": step.name})
        return image, applied

    @property
    def is_identity(self) -> bool:
        return not self.steps

    def describe(self) -> dict[str, Any]:
        """Plain data that :func:`build_preprocessor` turns back into an equal preprocessor."""
        return {"steps": [step.describe() for step in self.steps]}


def build_preprocessor(spec: Any = None, auto: Mapping | None = None) -> QueryPreprocessor:
    """A :class:`QueryPreprocessor` from plain data: ``None``/``"none"``; a step or preset name
    (``"auto"``, ``"denoise_enhance"``); a step dict ``{"name": "clahe", "clip_limit": 3}``; a list of
    names/dicts; ``{"steps": [...]}`` (the conf/preprocess YAML shape; a Hydra DictConfig works too);
    or an existing preprocessor/step. ``auto``: parameters for every ``auto`` step that the spec does not set
    itself (a bundle's thresholds fitted to its domain, :mod:`cbir.preprocess.calibrate`). Unknown names or
    parameters raise :class:`~cbir.errors.ConfigError`."""
    if spec is None:
        return QueryPreprocessor()
    if isinstance(spec, QueryPreprocessor):
        return spec
    if isinstance(spec, str) and spec in PRESETS:
        return QueryPreprocessor(tuple(_build_step(name, auto) for name in PRESETS[spec]))
    if isinstance(spec, Mapping) and "name" not in spec:
        unknown = set(spec) - {"steps"}
        if unknown:
            raise ConfigError(f"preprocess: unknown key(s) {', '.join(sorted(map(str, unknown)))}; "
                              "expected {steps: [...]} or a step {name: ..., <parameters>}")
        spec = spec.get("steps") or []
    if isinstance(spec, (str, Mapping, Step)):
        spec = [spec]
    if not isinstance(spec, Sequence):
        raise ConfigError(f"preprocess: cannot build a preprocessor from {type(spec).__name__}; "
                          "give a name, a list of steps or {steps: [...]}")
    return QueryPreprocessor(tuple(_build_step(item, auto) for item in spec))


def _build_step(item: Any, auto: Mapping | None = None) -> Step:
    if isinstance(item, Step):
        return item
    if isinstance(item, str):
        name, params = item, {}
    elif isinstance(item, Mapping):
        params = {str(k): v for k, v in item.items()}
        name = params.pop("name", None)
    else:
        raise ConfigError(f"preprocess: a step must be a name or {{name: ..., <parameters>}}, got {item!r}")
    if name not in STEPS:
        raise ConfigError(f"preprocess: unknown step {name!r}; choose from {', '.join(STEPS)} "
                          f"(or the presets {', '.join(PRESETS)})")
    cls = STEPS[name]
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(f"preprocess step '{name}': unknown parameter(s) {', '.join(unknown)}; "
                          f"it takes {', '.join(allowed)}")
    if cls is Auto and auto:
        params = {**auto, **params}  # what the spec sets itself wins over the fitted thresholds
    return cls(**params)
