"""augment=robust: camera-grade degradations as training augmentations — seeded, bounded, applied at rate p."""

from __future__ import annotations

import albumentations as A
import numpy as np
from helpers.configs import compose_config
from hydra.utils import instantiate

from cbir.preprocess.degrade import standard_degradations


def robust(overrides=()):
    cfg = compose_config("train", ["augment=robust", "data.image_size=48", *overrides])
    crop, flip, degrade = instantiate(cfg.augment.transforms)
    return crop, flip, degrade


def picture(seed=0, size=48):
    """A smooth picture with edges (noise and JPEG show on it; a flat one would hide blur)."""
    y, x = np.mgrid[:size, :size]
    base = np.stack([x * 5, y * 5, ((x // 8 + y // 8) % 2) * 200], axis=2)
    return np.clip(base + np.random.default_rng(seed).integers(0, 20, (size, size, 3)), 0, 255).astype(np.uint8)


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return np.inf if mse == 0 else 10 * np.log10(255.0 ** 2 / mse)


def test_the_same_seed_gives_the_same_degradations():
    _, _, degrade = robust()
    image = picture()
    runs = []
    for seed in (7, 7, 8):
        pipeline = A.Compose([degrade], seed=seed)
        runs.append([pipeline(image=image)["image"] for _ in range(20)])
    assert all(np.array_equal(a, b) for a, b in zip(runs[0], runs[1]))
    assert not all(np.array_equal(a, b) for a, b in zip(runs[0], runs[2]))


def test_degradations_are_applied_at_rate_p_and_stay_bounded():
    _, _, degrade = robust(["augment.p=0.5"])
    pipeline = A.Compose([degrade], seed=0)
    image = picture()
    outputs = [pipeline(image=image)["image"] for _ in range(400)]
    changed = [out for out in outputs if not np.array_equal(out, image)]
    assert 0.4 < len(changed) / len(outputs) < 0.6
    quality = np.array([psnr(out, image) for out in changed])
    # bounded by the damage queries are benchmarked with: never far worse than the suite's strongest
    suite = [psnr(degradation(image, seed=0), image) for degradation in standard_degradations()]
    assert quality.min() > min(suite) - 3.5  # dB
    assert np.median(quality) < 35.0  # and visibly damaged: not a no-op
    assert all(out.shape == image.shape and out.dtype == np.uint8 for out in outputs)


def test_noise_strength_stays_in_its_configured_range():
    _, _, degrade = robust()
    noise = degrade.transforms[0]
    pipeline = A.Compose([noise], seed=1)
    flat = np.full((64, 64, 3), 128, np.uint8)  # no clipping: the residual is the noise
    sigmas = [np.std(pipeline(image=flat)["image"].astype(float) - 128) for _ in range(100)]
    assert 0.02 * 255 * 0.8 < min(sigmas) and max(sigmas) < 0.15 * 255 * 1.1


def test_p_zero_is_the_default_augmentation():
    _, _, degrade = robust(["augment.p=0"])
    pipeline = A.Compose([degrade], seed=0)
    image = picture()
    assert all(np.array_equal(pipeline(image=image)["image"], image) for _ in range(50))
