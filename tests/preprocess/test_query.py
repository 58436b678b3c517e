"""Query preprocessing: each step moves a degraded image towards the clean one, auto picks the right steps,
degradations are repeatable, and every conf/preprocess option builds from plain data."""

from __future__ import annotations

import pickle

import cv2
import numpy as np
import pytest
import yaml
from skimage import data as skdata

from cbir.configs import config_dir
from cbir.errors import BadImageError, CbirError, ConfigError
from cbir.preprocess import QueryPreprocessor, build_preprocessor, measure
from cbir.preprocess.degrade import gaussian_blur, gaussian_noise, jpeg, low_light, standard_degradations
from cbir.preprocess.query import STEPS, Auto, Bilateral, Clahe, Gamma, Median, NonLocalMeans, UnsharpMask

CONF = config_dir() / "preprocess"


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    """The astronaut sample photo at 128 x 128 (area-averaged, so it is clean)."""
    return cv2.resize(skdata.astronaut(), (128, 128), interpolation=cv2.INTER_AREA)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(cv2.PSNR(a, b))


@pytest.mark.parametrize("step", [NonLocalMeans(), Bilateral(), Median()], ids=lambda s: s.name)
def test_denoisers_raise_psnr_of_a_noisy_photo(photo, step):
    noisy = gaussian_noise(photo, sigma=20, seed=1)
    assert psnr(step(noisy), photo) > psnr(noisy, photo) + 1.0


def test_nlm_strength_follows_the_noise(photo):
    nlm = NonLocalMeans()
    light, heavy = (nlm.strength(gaussian_noise(photo, s, seed=0))[0] for s in (8, 30))
    assert heavy > 2 * light
    assert NonLocalMeans(h=7, h_color=5).strength(photo) == (7.0, 5.0)


def test_clahe_raises_contrast_of_a_flat_image(photo):
    flat = (photo.astype(np.float32) * 0.25 + 96).astype(np.uint8)
    assert measure(Clahe()(flat)).contrast > 1.5 * measure(flat).contrast


def test_gamma_brightens_a_dark_image_and_leaves_a_bright_one(photo):
    dark = low_light(photo, noise_sigma=0)
    brightened = Gamma(target_brightness=128)(dark)
    assert abs(measure(brightened).brightness - 128) < abs(measure(dark).brightness - 128) / 2
    bright = Gamma(gamma=0.5)(photo)
    assert np.array_equal(Gamma()(bright), bright)  # max_gamma=1: never darkens
    assert measure(Gamma(gamma=2.0)(photo)).brightness < measure(photo).brightness


def test_unsharp_restores_sharpness_of_a_blurred_photo(photo):
    blurred = gaussian_blur(photo, sigma=1.5)
    sharpened = UnsharpMask(sigma=1.5, amount=1.5)(blurred)
    assert measure(sharpened).sharpness > 1.5 * measure(blurred).sharpness
    assert psnr(sharpened, photo) > psnr(blurred, photo)


@pytest.mark.parametrize("name", sorted(STEPS))
def test_every_step_keeps_shape_and_dtype(photo, name):
    image = photo[:40, :56]
    out = build_preprocessor(name)(gaussian_noise(image, 20, seed=0))
    assert out.shape == image.shape and out.dtype == np.uint8


def test_grey_and_rgba_become_rgb_and_bad_inputs_are_rejected(photo):
    pre = build_preprocessor("median")
    grey = cv2.cvtColor(photo, cv2.COLOR_RGB2GRAY)
    out = pre(grey)
    assert out.shape == (*grey.shape, 3) and np.array_equal(out[..., 0], out[..., 2])
    rgba = np.dstack([photo, np.zeros(photo.shape[:2], np.uint8)])  # fully transparent → white
    assert (pre(rgba) == 255).all()
    with pytest.raises(BadImageError, match="uint8"):
        pre(photo.astype(np.float32) / 255)
    with pytest.raises(BadImageError, match="shape"):
        pre(np.zeros((8, 8, 2), np.uint8))


def test_auto_leaves_a_clean_image_alone_and_fixes_noisy_dark_blurred_ones(photo):
    auto = build_preprocessor("auto")
    out, applied = auto.apply(photo)
    assert applied == [] and np.array_equal(out, photo)

    for sigma, denoiser in ((12, "bilateral"), (40, "nlm")):  # moderate noise: cheap filter; heavy: NLM
        noisy = gaussian_noise(photo, sigma, seed=3)
        out, applied = auto.apply(noisy)
        assert [a["step"] for a in applied] == [denoiser]
        assert psnr(out, photo) > psnr(noisy, photo) + 1.0

    dark = low_light(photo, noise_sigma=0)
    out, applied = auto.apply(dark)
    assert applied[0]["step"] == "gamma" and measure(out).brightness > measure(dark).brightness + 30

    blurred = gaussian_blur(photo, 2.0)
    assert [a["step"] for a in auto.apply(blurred)[1]] == ["unsharp"]
    flat = (photo.astype(np.float32) * 0.1 + 120).astype(np.uint8)  # CLAHE only when asked for
    assert "clahe" not in [a["step"] for a in auto.apply(flat)[1]]
    assert "clahe" in [a["step"] for a in build_preprocessor({"name": "auto", "contrast_threshold": 20}).apply(flat)[1]]


def test_jpeg_is_found_on_its_own_grid_and_heavy_blocking_is_smoothed(photo):
    from cbir.preprocess.quality import blockiness, jpeg_grid, luminance

    clean, blurred = measure(photo), measure(gaussian_blur(photo, 1.5))
    compressed = {q: measure(jpeg(photo, q)) for q in (10, 20, 70)}
    assert clean.jpeg_grid < 0.05 and blurred.jpeg_grid < 0.05  # blur removes detail on every grid alike
    assert all(m.jpeg_grid > 0.1 for m in compressed.values())
    shifted = jpeg(photo, 10)[3:, 3:]  # cropped after compression: off the 8 x 8 grid, the detector must not fire
    assert jpeg_grid(luminance(shifted)) < 0.1
    assert compressed[10].blockiness > compressed[70].blockiness and compressed[10].blockiness > 1.2
    assert 0.8 < clean.blockiness < 1.2 and blockiness(np.full((64, 64), 90.0, np.float32)) == 1.0

    auto = build_preprocessor("auto")
    heavy = jpeg(photo, 10)
    out, applied = auto.apply(heavy)
    assert [a["step"] for a in applied] == ["bilateral"] and "JPEG blocking" in applied[0]["reason"]
    assert measure(out).blockiness < compressed[10].blockiness
    sharpener = build_preprocessor({"name": "auto", "sharpness_threshold": 1e9})  # everything reads as blurred
    assert "unsharp" not in [a["step"] for a in sharpener.apply(jpeg(photo, 70))[1]]  # JPEG edges are not sharpened
    assert "unsharp" in [a["step"] for a in sharpener.apply(photo)[1]]
    assert auto.apply(jpeg(photo, 95))[1] == []  # barely compressed: nothing to undo


def test_degradations_are_deterministic_given_a_seed(photo):
    for degradation in standard_degradations():
        first, again = degradation(photo, seed=5), degradation(photo, seed=5)
        assert np.array_equal(first, again) and first.shape == photo.shape and first.dtype == np.uint8
        assert not np.array_equal(first, photo), degradation.name
    assert not np.array_equal(gaussian_noise(photo, 10, seed=1), gaussian_noise(photo, 10, seed=2))
    assert psnr(jpeg(photo, 10), photo) < psnr(jpeg(photo, 20), photo)


@pytest.mark.parametrize("path", sorted(CONF.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_conf_option_builds_pickles_and_round_trips(path, photo):
    preprocessor = build_preprocessor(yaml.safe_load(path.read_text()))
    assert pickle.loads(pickle.dumps(preprocessor)) == preprocessor
    assert build_preprocessor(preprocessor.describe()) == preprocessor
    assert preprocessor(photo).shape == photo.shape


def test_none_is_the_default_and_the_identity(photo):
    assert (CONF / "none.yaml").is_file()
    for spec in (None, "none", [], {"steps": []}):
        preprocessor = build_preprocessor(spec)
        assert preprocessor.is_identity and preprocessor(photo) is photo


def test_build_from_names_dicts_and_lists():
    assert build_preprocessor("denoise_enhance").steps == (NonLocalMeans(), Clahe())
    assert build_preprocessor({"name": "median", "ksize": 5}).steps == (Median(ksize=5),)
    built = build_preprocessor(["bilateral", {"name": "auto", "denoiser": "bilateral"}])
    assert built.steps == (Bilateral(), Auto(denoiser="bilateral"))
    assert build_preprocessor(built) is built
    assert isinstance(build_preprocessor("gamma"), QueryPreprocessor)


@pytest.mark.parametrize("spec, message", [
    ("sharpen", "unknown step 'sharpen'; choose from nlm, bilateral"),
    ({"name": "clahe", "clip": 2}, "unknown parameter.*clip.*clip_limit"),
    ({"steps": [], "mode": "x"}, "unknown key.*mode"),
    ({"name": "median", "ksize": 4}, "odd"),
    ({"name": "auto", "denoiser": "wiener"}, "denoiser must be one of nlm, bilateral, median"),
    ({"name": "auto", "strong_denoiser": "tv"}, "strong_denoiser must be one of"),
    (42, "cannot build"),
])
def test_build_errors_name_the_problem(spec, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_preprocessor(spec)
    assert isinstance(info.value, CbirError)


def test_a_huge_query_is_shrunk_before_the_clean_up_steps():
    """Non-local means costs about a second per megapixel: a 36 Mpx upload held a service worker 43 s (issue 15
    D5). Above max_pixels the image is shrunk first (area interpolation, aspect kept) and says so."""
    import time

    from cbir.preprocess.query import MAX_PREPROCESS_PIXELS, fit_pixels

    rng = np.random.default_rng(0)
    huge = rng.integers(0, 256, (3000, 2000, 3), dtype=np.uint8)
    preprocessor = build_preprocessor("nlm")
    started = time.perf_counter()
    cleaned, applied = preprocessor.apply(huge)
    assert time.perf_counter() - started < 10
    assert applied[0] == {"step": "downscale", "from": [2000, 3000], "to": [cleaned.shape[1], cleaned.shape[0]]}
    assert cleaned.shape[0] * cleaned.shape[1] <= MAX_PREPROCESS_PIXELS
    assert abs(cleaned.shape[0] / cleaned.shape[1] - 1.5) < 0.01
    small = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
    assert [a["step"] for a in preprocessor.apply(small)[1]] == ["nlm"]
    assert fit_pixels(small, 10_000) is small
    assert build_preprocessor("none").apply(huge)[0] is huge  # no steps: nothing to protect, the image as it is
