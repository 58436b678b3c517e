"""What a training run prints and records: one line saying what runs, no third-party noise, the final table in
train.log, and the whole config as the loggers' hyperparameters."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from helpers.configs import tiny_train_overrides
from helpers.paths import ROOT


@pytest.mark.slow
def test_a_run_says_what_it_runs_without_noise_and_keeps_its_table(tiny_folder, tmp_path):
    run = tmp_path / "run"
    overrides = [o for o in tiny_train_overrides(tiny_folder, run) if o not in ("logger=none",)] + [
        "model=resnet18", "model.freeze_stages=1", "logger=csv", "trainer.max_epochs=1",
        "trainer.limit_train_batches=2", "optimizer.lr=0.0007", f"hydra.run.dir={run}"]
    done = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides], capture_output=True, text=True,
                          cwd=tmp_path, env={**os.environ, "HYDRA_FULL_ERROR": "0"}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    for noise in ("💡 Tip", "LeafSpec", "multiple `ModelCheckpoint`", "FLOPs", "in eval mode at the start"):
        assert noise not in output, noise  # the frozen stage is in eval mode on purpose: no Lightning warning
    assert "run: data=folder (32 px, batch 6) model=resnet18" in output and "lr=0.0007" in output
    assert "tune=auto (stem + first stage frozen)" in output
    log_text = (run / "train.log").read_text()
    assert "Retrieval on folder" in log_text and "| trained (best checkpoint) |" in log_text
    hparams = yaml.safe_load((run / "csv" / "hparams.yaml").read_text())
    assert hparams["optimizer"]["lr"] == pytest.approx(0.0007)
    assert hparams["data"]["name"] == "folder" and "_target_" in hparams["loss"]


@pytest.mark.slow
def test_eval_prints_no_lightning_adverts(tiny_folder, tmp_path):
    """eval.py's trainer got Lightning's other advert (LitModelCheckpoint / litmodels) at every start."""
    done = subprocess.run([sys.executable, str(ROOT / "eval.py"), "data=folder", f"data.root={tiny_folder}",
                           "data.image_size=32", "data.num_workers=0", "model=resnet18", "model.pretrained=none",
                           "model.image_size=32", f"hydra.run.dir={tmp_path / 'eval'}"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    output = done.stdout + done.stderr
    assert "Retrieval on folder" in output
    for noise in ("💡 Tip", "litmodels", "LeafSpec"):
        assert noise not in output, noise
