"""The training road end to end on tiny data: every model x loss, checkpoints, resume, eval."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.configs import compose_config, tiny_train_overrides
from helpers.data import write_class_images
from helpers.data_locations import data_location
from PIL import Image

from cbir.commands.eval import evaluate
from cbir.commands.train import train

MODELS = ["resnet18", "resnet34", "resnet50", "mobilenet_v2"]
LOSSES = ["triplet", "contrastive"]


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("loss", LOSSES)
def test_fast_dev_run(model, loss, tiny_folder, tmp_path):
    cfg = compose_config("train", tiny_train_overrides(tiny_folder, tmp_path) +
                         [f"model={model}", f"loss={loss}", "trainer=debug"])
    train(cfg)
    assert (tmp_path / "config.yaml").is_file()


@pytest.mark.parametrize("head", ["fusion", "dolg"])
def test_fast_dev_run_heads(head, tiny_folder, tmp_path):
    """python train.py model=resnet34 head=dolg loss=triplet (offline: untrained trunk)."""
    cfg = compose_config("train", tiny_train_overrides(tiny_folder, tmp_path) +
                         ["model=resnet34", f"head={head}", "loss=triplet", "trainer=debug"])
    train(cfg)
    assert (tmp_path / "config.yaml").is_file()


def _short_run(tiny_folder: Path, out: Path, extra: list[str]):
    return compose_config("train", tiny_train_overrides(tiny_folder, out) + [
        "model=resnet18", "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.log_every_n_steps=1",
        "logger=csv", *extra])


def test_checkpoints_results_and_resume(tiny_folder, tmp_path):
    first = tmp_path / "first"
    score = train(_short_run(tiny_folder, first, ["evaluate_untrained=true"]))
    assert score is not None and 0.0 <= score <= 1.0
    ckpts = sorted(p.name for p in (first / "checkpoints").glob("*.ckpt"))
    assert "last.ckpt" in ckpts and any(n.startswith("best-epoch000") for n in ckpts)
    results = json.loads((first / "results.json").read_text())
    assert len(results["results"]) == 2  # untrained and trained rows
    assert (first / "csv" / "metrics.csv").is_file()

    second = tmp_path / "second"
    cfg = _short_run(tiny_folder, second, [f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}",
                                           "trainer.max_epochs=2"])
    train(cfg)
    resumed = torch.load(second / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert resumed["epoch"] == 1  # continued at epoch index 1, not restarted at 0
    assert resumed["global_step"] == 4  # 2 steps from the first run + 2 new ones
    lines = (second / "csv" / "metrics.csv").read_text().splitlines()
    epochs = {row.split(",")[0] for row in lines[1:]}
    assert "0" not in epochs or "1" in epochs


def _logged(run: Path, column: str) -> list[float]:
    with open(run / "csv" / "metrics.csv", newline="") as handle:
        return [float(row[column]) for row in csv.DictReader(handle) if row.get(column)]


def test_test_equal_to_validation_reports_the_best_validation(tiny_folder, tmp_path):
    """data.test = data.val (these fixtures validate on the test classes): the trained row is the best
    checkpoint's own validation, not a second pass over the same images; another protocol is tested."""
    same = tmp_path / "same"
    best = train(_short_run(tiny_folder, same, ["trainer.max_epochs=2"]))
    reported = only_row(json.loads((same / "results.json").read_text()))
    assert reported["map_at_r"] == pytest.approx(best, abs=1e-6)
    assert reported["map_at_r"] == pytest.approx(max(_logged(same, "val/map_at_r")), abs=1e-6)
    assert not _logged(same, "test/map_at_r")  # trainer.test never ran

    other = tmp_path / "other"
    train(_short_run(tiny_folder, other, ["trainer.max_epochs=2", "subset.test=0.8"]))
    assert len(_logged(other, "test/map_at_r")) == 1


def test_eval_on_checkpoint_and_untrained(tiny_folder, tmp_path):
    run = tmp_path / "run"
    train(_short_run(tiny_folder, run, ["test_after_fit=false"]))
    ckpt = run / "checkpoints" / "last.ckpt"
    common = [f"data.root={tiny_folder}", "data=folder", "data.image_size=32", "data.num_workers=0",
              "trainer.accelerator=cpu", "trainer.enable_progress_bar=false"]
    metrics = evaluate(compose_config("eval", common + [f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path / 'e1'}"]))
    assert 0.0 <= metrics["map_at_r"] <= 1.0 and metrics["num_queries"] == 12  # 3 test classes x 4 images
    saved = json.loads((tmp_path / "e1" / "eval.json").read_text())
    assert only_row(saved)["precision_at_1"] == pytest.approx(metrics["precision_at_1"])

    baseline = evaluate(compose_config("eval", common + ["model=resnet18", "model.pretrained=none",
                                                         f"paths.output_dir={tmp_path / 'e2'}"]))
    assert baseline["num_queries"] == 12
    subset = evaluate(compose_config("eval", common + ["model=resnet18", "model.pretrained=none", "subset.test=8",
                                                       f"paths.output_dir={tmp_path / 'e3'}"]))
    assert subset["num_queries"] + subset["num_queries_excluded"] == 8  # a fixed subset of 8 of the 12 images


def write_texture_classes(root: Path, per_class: int = 8, size: int = 32) -> None:
    """Classes are stripe periods/orientations; colours, phase and noise vary per image, so untrained
    features retrieve poorly and a trained model must learn the texture."""
    rng = np.random.default_rng(0)
    for c, (period, vertical) in enumerate([(2, False), (3, False), (5, True), (8, True)]):
        for i in range(per_class):
            a, b = rng.integers(0, 256, size=(2, 3))
            phase = rng.integers(0, period)
            coords = np.arange(size)[None, :] if vertical else np.arange(size)[:, None]
            mask = (((coords + phase) // max(1, period // 2)) % 2).astype(bool)
            pixels = np.where(np.broadcast_to(mask, (size, size))[..., None], a, b).astype(np.int16)
            pixels += rng.integers(-40, 40, size=pixels.shape)
            path = root / f"class_{c}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(path)


def test_training_improves_retrieval_on_learnable_data(tmp_path):
    """A real signal, not a stub: a few epochs raise MAP@R on texture classes that untrained features miss."""
    data = tmp_path / "textures"
    write_texture_classes(data)
    cfg = compose_config("train", tiny_train_overrides(data, tmp_path) + [
        "model=resnet18", "data.test_fraction=0.0", "data.val.queries=train", "data.test.queries=train",
        "data.image_size=64", "data.batch_size=16", "data.m_per_class=4", "trainer.max_epochs=10", "optimizer.lr=1e-3", "evaluate_untrained=true",
        "callbacks=none", "augment=none"])
    train(cfg)
    rows = list(json.loads((tmp_path / "results.json").read_text())["results"].values())
    assert rows[0]["map_at_r"] < 0.8, "the fixture is too easy to show learning"
    assert rows[1]["map_at_r"] > rows[0]["map_at_r"] + 0.3


def test_wandb_logger_runs_offline(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    cfg = _short_run(tiny_folder, tmp_path, ["logger=wandb", "test_after_fit=false"])
    train(cfg)
    import wandb

    wandb.finish()
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert runs, "an offline W&B run folder should exist"


@pytest.mark.parametrize("cache", ["true", "false"])
def test_skip_bad_images_trains_and_reports(tmp_path, cache, caplog):
    root = tmp_path / "images"
    write_class_images(root, num_classes=6, per_class=4, size=16)
    broken = [root / "class_00" / "img_1.png", root / "class_04" / "img_2.png"]  # one train, one test image
    for path in broken:
        path.write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    cfg = compose_config("train", tiny_train_overrides(root, tmp_path / "out") + [
        "model=resnet18", "trainer.max_epochs=1", "data.on_bad_image=skip", f"data.cache_images={cache}"])
    with caplog.at_level("WARNING"):
        train(cfg)
    skipped = [r.getMessage() for r in caplog.records if "skipped unreadable image" in r.getMessage()]
    assert all("cannot decode" in m for m in skipped)
    assert sorted({m.split("skipped unreadable image: image ")[1].split(": cannot")[0] for m in skipped}) == \
        sorted(map(str, broken))
    results = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    trained = next(iter(results.values()))
    assert trained["num_queries"] == 11  # 12 test images, one unreadable


def test_fail_on_bad_image_names_it(tmp_path):
    from cbir.errors import BadImageError

    root = tmp_path / "images"
    write_class_images(root, num_classes=6, per_class=4, size=16)
    (root / "class_05" / "img_3.png").write_bytes(b"")
    cfg = compose_config("train", tiny_train_overrides(root, tmp_path / "out") + ["model=resnet18", "trainer=debug"])
    with pytest.raises(BadImageError, match="img_3.png"):
        train(cfg)


@pytest.mark.parametrize("data", ["folder", "csv", "fashion_mnist", "emoji", "cub200", "cars196", "sop", "inshop"])
def test_fast_dev_run_on_each_data_format(data, tiny_folder, tmp_path):
    """train.py's whole loop on each format's fixture in its official layout."""
    overrides = [o for o in tiny_train_overrides(tiny_folder, tmp_path / "out") if not o.startswith("data")]
    overrides += [f"data={data}", *data_location(data, tiny_folder, tmp_path), "data.image_size=32",
                  "data.num_workers=0", "model=resnet18", "trainer=debug"]
    if data in ("cub200", "cars196", "sop", "inshop", "folder", "csv"):
        overrides += ["data.batch_size=4", "data.m_per_class=2"]
    train(compose_config("train", overrides))
    assert (tmp_path / "out" / "config.yaml").is_file()


def only_row(saved: dict) -> dict:
    """The metrics of a results JSON with one row (eval.json: {"protocol", "results": {model: metrics}})."""
    (metrics,) = saved["results"].values()
    return metrics
