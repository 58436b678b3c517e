"""`auto` clean-up fitted to a domain: on clean images of a dark domain it must do nothing (the shipped,
emoji-derived thresholds brighten them all), still fix what is really damaged, and leave a domain the shipped
thresholds already fit untouched; the fit travels in a bundle and rules every `auto` the Searcher builds."""

from __future__ import annotations

import dataclasses

import cv2
import numpy as np
import pytest

from cbir.errors import ConfigError
from cbir.preprocess import Auto, build_preprocessor
from cbir.preprocess.calibrate import MIN_IMAGES, fit_auto
from cbir.preprocess.degrade import low_light


def _dark_domain(count: int, seed: int = 0) -> list[np.ndarray]:
    """Fashion-MNIST-like: a mid-grey textured object on a black background, 28 px."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        image = np.zeros((28, 28), np.uint8)
        h, w = rng.integers(14, 24, size=2)
        top, left = rng.integers(0, 28 - h), rng.integers(0, 28 - w)
        image[top:top + h, left:left + w] = rng.integers(90, 220)
        image = cv2.GaussianBlur(image, (3, 3), 0.8)
        images.append(np.repeat(image[..., None], 3, axis=2))
    return images


def _bright_domain(count: int, seed: int = 0) -> list[np.ndarray]:
    """Emoji-like: a flat coloured disc with a dark outline on a white background, 64 px."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        image = np.full((64, 64, 3), 255, np.uint8)
        centre, radius = tuple(int(v) for v in rng.integers(26, 38, size=2)), int(rng.integers(10, 16))
        cv2.circle(image, centre, radius, tuple(int(c) for c in rng.integers(0, 255, size=3)), -1)
        cv2.circle(image, centre, radius, (0, 0, 0), 2)
        images.append(image)
    return images


def test_a_dark_domain_is_left_alone_when_clean_and_still_brightened_when_dark():
    clean = _dark_domain(200)
    shipped = Auto()
    assert sum(bool(shipped.plan_and_apply(image)[1]) for image in clean) > 150  # the emoji thresholds misfire
    fitted = fit_auto(clean)
    auto = Auto(**fitted["params"])
    assert fitted["images"] == 200 and fitted["params"]["dark_threshold"] < shipped.dark_threshold
    assert fitted["params"]["target_brightness"] <= fitted["clean"]["brightness"][1]  # the domain's median
    assert fitted["params"]["target_brightness"] > fitted["params"]["dark_threshold"]
    held_out = _dark_domain(200, seed=1)
    touched = sum(bool(auto.plan_and_apply(image)[1]) for image in held_out)
    assert touched <= 20  # about the few % of clean images the fitted quantiles leave out, plus chance
    dark = [low_light(image, gamma=2.2, gain=0.4) for image in held_out[:50]]
    steps = [auto.plan_and_apply(image)[1] for image in dark]
    assert sum(any(s["step"] == "gamma" for s in applied) for applied in steps) >= 45
    brightened = [auto(image) for image in dark]
    median = fitted["clean"]["brightness"][1]
    before = np.median([abs(image.mean() - median) for image in dark])
    after = np.median([abs(image.mean() - median) for image in brightened])
    assert after < before  # back towards this domain's own range, not a white page's level
    assert max(image.mean() for image in brightened) <= median + 5


def test_a_domain_the_shipped_thresholds_fit_keeps_them():
    fitted = fit_auto(_bright_domain(100))
    defaults = {f.name: getattr(Auto(), f.name) for f in dataclasses.fields(Auto) if f.name in fitted["params"]}
    assert fitted["params"] == pytest.approx(defaults)


def test_thresholds_only_move_outwards():
    base = Auto(dark_threshold=5.0, noise_threshold=40.0)
    fitted = fit_auto(_dark_domain(50), base=base)["params"]
    assert fitted["dark_threshold"] <= 5.0 and fitted["noise_threshold"] >= 40.0
    assert fitted["strong_noise_threshold"] >= base.strong_noise_threshold


def test_too_few_images_is_a_clear_error():
    with pytest.raises(ConfigError, match=f"at least {MIN_IMAGES}"):
        fit_auto(_dark_domain(MIN_IMAGES - 1))


def test_fitted_thresholds_fill_in_only_what_a_spec_leaves_unset():
    params = fit_auto(_dark_domain(60))["params"]
    step = build_preprocessor("auto", auto=params).steps[0]
    assert step.dark_threshold == params["dark_threshold"] and step.noise_threshold == params["noise_threshold"]
    own = build_preprocessor({"steps": [{"name": "auto", "dark_threshold": 90.0}]}, auto=params).steps[0]
    assert own.dark_threshold == 90.0 and own.sharpness_threshold == params["sharpness_threshold"]
    assert build_preprocessor("auto").steps[0] == Auto()  # without a fit: the shipped thresholds
    assert build_preprocessor("nlm", auto=params).steps[0].name == "nlm"  # other steps ignore it


def test_a_bundle_carries_the_fit_and_the_searcher_uses_it(tmp_path):
    from helpers.configs import compose_config

    from cbir import Searcher, load_bundle
    from cbir.export.bundle import export_bundle
    from cbir.index.store import CbirIndex
    from cbir.training.factory import build_embedder_from_config, model_config

    cfg = compose_config("train", ["model=resnet18", "model.pretrained=none", "model.image_size=32", "head.dim=8"])
    fitted = fit_auto(_dark_domain(60))
    fitted["source"] = "60 images of a test domain"
    out = export_bundle(build_embedder_from_config(cfg), tmp_path / "bundle", model_config=model_config(cfg),
                        runtimes=[], auto_calibration=fitted)
    bundle = load_bundle(out)
    assert bundle.preprocessing.auto == fitted
    index = CbirIndex.build(np.eye(8, dtype=np.float32)[:4], [f"{i}.png" for i in range(4)])
    searcher = Searcher(bundle, index, preprocess="auto", runtime="eager")
    assert searcher.preprocessor.steps[0].dark_threshold == fitted["params"]["dark_threshold"]
    clean = _dark_domain(1, seed=3)[0]
    assert np.array_equal(searcher.clean_images([clean], "auto")[0], clean)
    own = {"steps": [{"name": "auto", "dark_threshold": 200.0, "target_brightness": 220.0}]}
    assert searcher.clean_images([clean], own)[0].mean() > clean.mean() + 30  # what the request sets itself wins


def test_export_fits_auto_to_the_training_images(tmp_path):
    from cbir.commands.export import auto_calibration

    folder = tmp_path / "photos" / "shirts"
    folder.mkdir(parents=True)
    for i, image in enumerate(_dark_domain(30)):
        cv2.imwrite(str(folder / f"{i}.png"), image)
    fitted = auto_calibration(str(tmp_path / "photos"))
    assert fitted["images"] == 30 and fitted["source"] == f"30 images of {tmp_path / 'photos'}"
    assert fitted["params"]["dark_threshold"] < Auto().dark_threshold
    assert auto_calibration(str(tmp_path / "photos"), count=MIN_IMAGES - 1) is None  # too few: shipped ones
    assert auto_calibration(None) is None
