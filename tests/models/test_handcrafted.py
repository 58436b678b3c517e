"""The built-in baselines: the hand-crafted descriptor (model=handcrafted) and train.fit=false."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers.configs import compose_config
from helpers.paths import ROOT

from cbir.commands.eval import evaluate
from cbir.commands.train import train
from cbir.data.transforms import eval_transform
from cbir.errors import ConfigError
from cbir.evaluation.metrics import retrieval_metrics
from cbir.models.handcrafted import (
    DescriptorOptions,
    HandcraftedDescriptor,
    HandcraftedEmbedder,
    build_handcrafted_embedder,
)
from cbir.training import factory

EVAL_OVERRIDES = ["data=folder", "data.image_size=32", "data.eval_batch_size=16", "data.num_workers=0",
                  "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
                  "trainer.enable_model_summary=false"]


def _pattern_image(hue_rgb, stripe: int, size: int = 32, seed: int = 0, noise: int = 12) -> np.ndarray:
    """A colour with horizontal stripes every ``stripe`` rows, plus noise."""
    rng = np.random.default_rng(seed)
    pixels = np.broadcast_to(np.asarray(hue_rgb, np.int16), (size, size, 3)).copy()
    pixels[::stripe] //= 3
    if noise:
        pixels += rng.integers(-noise, noise, size=pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def _to_batch(images, embedder: HandcraftedEmbedder) -> torch.Tensor:
    transform = eval_transform(embedder.input_size, embedder.mean, embedder.std)
    return torch.stack([transform(image=im)["image"] for im in images])


def test_embeddings_have_the_declared_shape_and_unit_norm():
    embedder = HandcraftedEmbedder(32)
    images = torch.randn(5, 3, 32, 32)
    out = embedder(images)
    assert out.dtype == torch.float32 and out.shape == (5, embedder.embedding_dim)
    assert torch.allclose(out.norm(dim=1), torch.ones(5), atol=1e-5)
    assert list(embedder.parameters()) == []  # nothing to train
    # a batch of another size is resized to the embedder's input size, not refused
    assert embedder(torch.randn(2, 3, 48, 48)).shape == (2, embedder.embedding_dim)


def test_embedding_dim_follows_the_options():
    small = HandcraftedEmbedder(32, DescriptorOptions(hsv_bins=(4, 2, 2), hog_cell=16, hog_block=1))
    # 16 colour bins + 10 uniform LBP bins (P=8) + 2x2 HOG cells x 9 orientations
    assert small.embedding_dim == 16 + 10 + 4 * 9


def test_same_image_gives_identical_descriptor_and_colour_moves_the_colour_block():
    descriptor = HandcraftedDescriptor()
    noisy = _pattern_image((220, 30, 30), stripe=4)
    assert np.array_equal(descriptor(noisy), descriptor(noisy.copy()))
    red = _pattern_image((220, 30, 30), stripe=4, noise=0)
    blue = red[..., ::-1].copy()  # the same pattern in another hue: only its contrast changes in grey

    def cosine(a, b):
        a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    assert cosine(descriptor.colour(red), descriptor.colour(blue)) < 0.2
    grey_red, grey_blue = (cv2_grey(red), cv2_grey(blue))
    assert cosine(descriptor.shape(grey_red), descriptor.shape(grey_blue)) > 0.99  # HOG: contrast-normalised


def cv2_grey(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def test_unnormalisation_round_trips_the_pipeline_to_uint8_rgb():
    embedder = HandcraftedEmbedder(32)
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(3)]
    restored = embedder.to_uint8_rgb(_to_batch(images, embedder))
    assert restored.dtype == np.uint8 and restored.shape == (3, 32, 32, 3)
    assert np.abs(restored.astype(int) - np.stack(images).astype(int)).max() <= 1
    # so the embedding of a pipeline batch is the descriptor of the original pixels
    direct = np.stack([embedder.descriptor(im) for im in restored])
    assert np.allclose(embedder(_to_batch(images, embedder)).numpy(), direct, atol=1e-6)


def test_retrieval_separates_colour_and_texture_classes():
    colours = [(220, 40, 40), (40, 200, 40), (40, 40, 220)]
    classes = [(c, s) for c in colours for s in (2, 6)]  # 3 colours x 2 stripe widths: 6 classes
    images, labels = [], []
    for label, (colour, stripe) in enumerate(classes):
        for seed in range(4):
            images.append(_pattern_image(colour, stripe, seed=10 * label + seed))
            labels.append(label)
    embedder = HandcraftedEmbedder(32)
    metrics = retrieval_metrics(embedder(_to_batch(images, embedder)), torch.tensor(labels))
    assert metrics["precision_at_1"] >= 0.95 and metrics["map_at_r"] >= 0.8


def test_invalid_options_are_config_errors():
    with pytest.raises(ConfigError, match="model.descriptor.hsv_bins"):
        build_handcrafted_embedder(32, hsv_bins=[0, 2, 2])
    with pytest.raises(ConfigError, match="model.descriptor.colour_bins"):
        build_handcrafted_embedder(32, colour_bins=8)
    with pytest.raises(ConfigError, match="model.image_size"):
        build_handcrafted_embedder(8, hog_cell=8, hog_block=2)
    with pytest.raises(ConfigError, match="model.scales"):
        HandcraftedEmbedder(32).set_scales([1.0, 0.5])


def test_model_config_rebuilds_the_same_descriptor(tmp_path):
    cfg = compose_config("train", ["model=handcrafted", "model.image_size=32", "model.descriptor.hog_cell=16",
                                   f"paths.output_dir={tmp_path}"])
    model_cfg = factory.model_config(cfg)
    assert model_cfg["backbone"] == "handcrafted"
    saved = json.loads(json.dumps(model_cfg))  # what a bundle or checkpoint stores
    first, second = factory.build_embedder_from_config(cfg), factory.embedder_from_model_config(saved, "none")
    assert isinstance(second, HandcraftedEmbedder) and second.options == first.options
    assert second.options.hog_cell == 16 and second.input_size == 32
    images = torch.randn(3, 3, 32, 32)
    assert torch.equal(first(images), second(images))


def test_bundle_export_keeps_the_eager_descriptor(tmp_path):
    from cbir.export.bundle import export_bundle, load_bundle

    cfg = compose_config("train", ["model=handcrafted", "model.image_size=32", f"paths.output_dir={tmp_path}"])
    embedder = factory.build_embedder_from_config(cfg)
    out = export_bundle(embedder, tmp_path / "bundle", model_config=factory.model_config(cfg))
    bundle = load_bundle(out)
    assert isinstance(bundle.embedder, HandcraftedEmbedder) and bundle.input_size == 32
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(bundle.embedder(images), embedder(images))


def test_eval_runs_the_handcrafted_model_on_a_folder(tiny_folder, tmp_path):
    cfg = compose_config("eval", [*EVAL_OVERRIDES, f"data.root={tiny_folder}", "model=handcrafted",
                                  "model.image_size=32", f"paths.output_dir={tmp_path}"])
    metrics = evaluate(cfg)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert only_row(saved)["map_at_r"] == pytest.approx(metrics["map_at_r"])
    assert "handcrafted" in next(iter(saved["results"]))  # the row is named after the model
    # the fixture's classes differ in colour and stripe width: the descriptor tells them apart
    assert metrics["precision_at_1"] >= 0.9


@pytest.mark.parametrize("model", ["handcrafted", "resnet18"])
def test_train_fit_false_only_evaluates(model, tiny_folder, tmp_path, capsys):
    overrides = [*EVAL_OVERRIDES, f"data.root={tiny_folder}", f"model={model}", "model.pretrained=none",
                 "model.image_size=32", "head.dim=16", "logger=none", "train.fit=false",
                 f"paths.output_dir={tmp_path}"]
    score = train(compose_config("train", overrides))
    results = json.loads((tmp_path / "results.json").read_text())
    (row,) = results["results"].values()
    assert score == pytest.approx(row["map_at_r"]) == pytest.approx(results["test_map_at_r"])
    assert not (tmp_path / "checkpoints").exists()  # nothing was fitted, nothing saved
    assert "MAP@R" in capsys.readouterr().out
    if model == "handcrafted":  # the same figure eval.py gives
        eval_cfg = compose_config("eval", [*EVAL_OVERRIDES, f"data.root={tiny_folder}", "model=handcrafted",
                                           "model.image_size=32", f"paths.output_dir={tmp_path / 'eval'}"])
        assert evaluate(eval_cfg)["map_at_r"] == pytest.approx(score)


def test_training_the_handcrafted_model_is_a_config_error(tiny_folder, tmp_path):
    cfg = compose_config("train", [*EVAL_OVERRIDES, f"data.root={tiny_folder}", "model=handcrafted",
                                   "logger=none", f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match="nothing to train.*train.fit=false"):
        train(cfg)


@pytest.mark.slow  # a fresh interpreter: ~25 s on the shared 2-core machine
def test_train_py_handcrafted_prints_one_line(tiny_folder, tmp_path):
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "model=handcrafted", "data=folder",
                             f"data.root={tiny_folder}", "logger=none", f"hydra.run.dir={tmp_path / 'out'}"],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "nothing to train" in errors[0] and "eval.py model=handcrafted" in errors[0]


def only_row(saved: dict) -> dict:
    """The metrics of a results JSON with one row (eval.json: {"protocol", "results": {model: metrics}})."""
    (metrics,) = saved["results"].values()
    return metrics
