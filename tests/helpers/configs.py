"""Config composition from the package's config folder, and overrides for tiny training runs."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from cbir.configs import config_dir


def compose_config(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name=name, overrides=overrides)


def tiny_train_overrides(data_root: Path, output_dir: Path, hold_out_validation: bool = False) -> list[str]:
    """A training config small enough for a unit test: 32 px folder data, no weights, no logger. The tiny
    folder has 3 training classes, too few to also hold one out (a batch of 6 at m=2 needs 3 classes):
    unless ``hold_out_validation``, these mechanics tests validate on the test classes."""
    return [
        "data=folder", f"data.root={data_root}", "data.image_size=32", "data.batch_size=6",
        "data.m_per_class=2", "data.eval_batch_size=16", "data.num_workers=0", "model.pretrained=none",
        "head.dim=16", "logger=none", "trainer.accelerator=cpu", "trainer.enable_progress_bar=false",
        "trainer.enable_model_summary=false", f"paths.output_dir={output_dir}",
        *([] if hold_out_validation else ["data.val_classes=null", "data.val.queries=test"]),
    ]
