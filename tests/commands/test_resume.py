"""Resuming continues the run that was checkpointed (its data and model, not the defaults), and an
interrupted run saves where it stopped and says so with a non-zero exit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers.configs import tiny_train_overrides
from helpers.paths import ROOT

from cbir.commands.resume import merge_overrides, override_key


def _train(*overrides: str, run: Path, background: bool = False):
    args = [sys.executable, str(ROOT / "train.py"), *overrides, f"hydra.run.dir={run}", f"paths.output_dir={run}"]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    if background:
        # SIGINT back to its default in the child: a test run started in the background by a shell (as CI may be)
        # inherits SIGINT ignored, and Python then never turns Ctrl-C into KeyboardInterrupt
        return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=run.parent,
                                env=env, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    return subprocess.run(args, capture_output=True, text=True, cwd=run.parent, env=env, timeout=300)


def _tiny(data: Path, out: Path) -> list[str]:
    return [o for o in tiny_train_overrides(data, out) if not o.startswith("paths.output_dir=")] + [
        "model=resnet18", "test_after_fit=false", "callbacks.embedding_map=null", "callbacks.retrieval_examples=null"]


def test_merge_keeps_the_runs_overrides_under_the_new_ones():
    run = ["data=folder", "data.root=/a", "trainer.max_epochs=1", "+extra=1"]
    assert merge_overrides(run, ["trainer.max_epochs=3", "ckpt_path=x"]) == [
        "data=folder", "data.root=/a", "+extra=1", "trainer.max_epochs=3", "ckpt_path=x"]
    assert override_key("+extra=1") == "extra" and override_key("~callbacks.x") == "callbacks.x"


@pytest.mark.slow
def test_resume_continues_the_runs_config_and_refuses_other_data(tiny_folder, tmp_path):
    first = tmp_path / "first"
    done = _train(*_tiny(tiny_folder, first), "trainer.max_epochs=1", "trainer.limit_train_batches=2", run=first)
    assert done.returncode == 0, done.stderr[-2000:]
    last = first / "checkpoints" / "last.ckpt"

    # as README writes it: only the checkpoint and the new epoch count; the data is the run's folder, not
    # train.yaml's default Fashion-MNIST
    second = tmp_path / "second"
    resumed = _train(f"ckpt_path={last}", "trainer.max_epochs=2", run=second)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming run {first}" in resumed.stderr
    config = yaml.safe_load((second / "config.yaml").read_text())
    assert config["data"]["name"] == "folder" and config["data"]["root"] == str(tiny_folder)
    assert config["trainer"]["max_epochs"] == 2
    assert torch.load(second / "checkpoints" / "last.ckpt", weights_only=False)["epoch"] == 1

    # a checkpoint already past the epochs asked for: one line (Lightning raised a traceback)
    later = tmp_path / "later.ckpt"
    state = torch.load(last, weights_only=False)
    state["epoch"] = 5
    torch.save(state, later)
    past = _train(f"ckpt_path={later}", "trainer.max_epochs=3", run=tmp_path / "past")
    assert past.returncode != 0 and "Traceback" not in past.stderr
    assert "saved at epoch 6, past trainer.max_epochs=3" in past.stderr

    changed = _train(f"ckpt_path={last}", "data.image_size=48", run=tmp_path / "third")
    assert changed.returncode != 0
    assert "data.image_size: 32 → 48" in changed.stderr and "resume.allow_changes=true" in changed.stderr
    assert "Traceback" not in changed.stderr
    other_model = _train(f"ckpt_path={last}", "model=mobilenet_v2", run=tmp_path / "fourth")
    assert other_model.returncode != 0 and "model.backbone: resnet18 → mobilenet_v2" in other_model.stderr

    # eval.py on the run's checkpoint scores it on the run's data, not eval.yaml's default Fashion-MNIST
    scored = subprocess.run([sys.executable, str(ROOT / "eval.py"), f"ckpt_path={last}", "data.num_workers=0",
                             f"hydra.run.dir={tmp_path / 'eval'}"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=300)
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert yaml.safe_load((tmp_path / "eval" / "eval.json").read_text())["protocol"].startswith("folder")


@pytest.mark.slow
@pytest.mark.parametrize(("sent", "status", "name"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")])
def test_an_interrupted_run_saves_its_state_and_exits_non_zero(sent, status, name, tiny_folder, tmp_path):
    run = tmp_path / "run"
    process = _train(*_tiny(tiny_folder, run), "trainer.max_epochs=10000", run=run, background=True)
    last = run / "checkpoints" / "last.ckpt"
    deadline = time.time() + 240
    while not last.is_file() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    assert last.is_file(), process.communicate()[1][-2000:]
    time.sleep(1.0)  # into a later epoch
    process.send_signal(sent)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status, stderr[-2000:]
    assert f"stopped by {name}" in stderr and f"resume with: python train.py ckpt_path={last}" in stderr
    state = torch.load(last, weights_only=False)
    assert state["global_step"] > 0 and "optimizer_states" in state
