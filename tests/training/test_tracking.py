"""W&B run lifecycle (offline, no account): mode, names and groups, the id recorded in the run folder and
reused on resume, one finished run per training job (failed ones marked), the resolved config and the best
score in the run. Runs are read back from W&B's offline transaction log."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers.configs import compose_config, tiny_train_overrides
from helpers.wandb_offline import offline_runs
from omegaconf import open_dict

from cbir.commands.train import train
from cbir.errors import CheckpointError
from cbir.training import factory, tracking
from cbir.training.module import MONITOR


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, its own files under tmp_path, no credentials (the environment is restored afterwards:
    Lightning sets WANDB_MODE for offline runs)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    for name in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    yield
    import wandb

    assert wandb.run is None, "train() must finish its W&B run"


# --- plain functions -------------------------------------------------------------------------------------

def test_wandb_mode_offline_without_an_account(tmp_path, monkeypatch):
    for name in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert tracking.wandb_mode("auto") == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai\n  login user\n  password key\n")
    assert tracking.wandb_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "dryrun")  # what Lightning sets for an offline run
    assert tracking.wandb_mode("auto") == "offline"
    assert tracking.wandb_mode("disabled") == "disabled"


def test_checkpoints_are_uploaded_only_online(tmp_path):
    offline = tracking.wandb_logger(mode="offline", log_model=True, save_dir=str(tmp_path))
    online = tracking.wandb_logger(mode="online", log_model=True, save_dir=str(tmp_path))  # no run opened yet
    assert offline._log_model is False and offline._offline
    assert online._log_model is True and not online._offline


def test_starting_a_run_prints_no_wandb_deprecation(tmp_path):
    """Lightning passed ``anonymous=None`` to wandb.init, which printed "The anonymous setting has no effect"
    at every start (once per process: hence a fresh one)."""
    code = ("import wandb; from cbir.training.tracking import wandb_logger; "
            f"logger = wandb_logger(mode='offline', save_dir={str(tmp_path)!r}); logger.experiment; wandb.finish()")
    env = {**os.environ, "WANDB_MODE": "offline", "NETRC": str(tmp_path / "no-netrc"), "WANDB_DIR": str(tmp_path)}
    env.pop("WANDB_API_KEY", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert list(tmp_path.glob("wandb/offline-run-*")), "the run should have started"
    assert "anonymous" not in proc.stdout + proc.stderr


def test_default_name_and_group_from_the_job():
    job = tracking.JobInfo(["loss=triplet", "head=gem", "data.root=/data/emoji", "logger=wandb",
                            "paths.output_dir=/tmp/x", "hydra/sweeper=optuna"], num=3,
                           sweep_dir="multirun/train/2026-01-31/12-00-00")
    assert tracking.default_run_name(job) == "job3 loss=triplet,head=gem"
    assert tracking.default_group(job) == "train/2026-01-31/12-00-00"
    single = tracking.JobInfo(["loss=triplet"])
    assert tracking.default_run_name(single) == "loss=triplet" and tracking.default_group(single) is None
    assert tracking.default_run_name(tracking.JobInfo()) is None  # W&B picks a name
    assert tracking.default_run_name(None) is None and tracking.default_group(None) is None
    assert len(tracking.default_run_name(tracking.JobInfo([f"k{i}=v" for i in range(100)], num=0))) <= 128


def test_run_id_recorded_and_found_for_resume(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert tracking.resumed_run_id(run / "checkpoints" / "last.ckpt", tmp_path / "new") is None
    tracking.write_run_id(run, "abc123")
    assert tracking.read_run_id(run) == "abc123"
    assert tracking.resumed_run_id(run / "checkpoints" / "last.ckpt", tmp_path / "new") == "abc123"
    assert tracking.resumed_run_id("last", run) == "abc123"  # ckpt_path=last resumes in the run folder itself
    assert tracking.resumed_run_id(None, run) is None

    identity = tracking.run_identity(None, ckpt_path=run / "checkpoints" / "last.ckpt", run_dir=tmp_path)
    assert identity == {"name": None, "group": None, "id": "abc123"}
    explicit = tracking.run_identity(None, run_id="mine", ckpt_path=run / "checkpoints" / "last.ckpt")
    assert explicit["id"] == "mine"
    assert tracking.run_identity(None, resume="never", ckpt_path=run / "checkpoints" / "last.ckpt")["id"] is None


def test_run_id_read_from_wandb_files_when_not_recorded(tmp_path):
    """A run folder from before wandb_id.txt: the id is the suffix of W&B's newest run folder."""
    run_dir = tmp_path / "run"
    (run_dir / "wandb" / "offline-run-20260131_120000-k4hkkztl").mkdir(parents=True)
    (run_dir / "wandb" / "latest-run").symlink_to("offline-run-20260131_120000-k4hkkztl")
    assert tracking.read_run_id(run_dir) == "k4hkkztl"


def test_no_hydra_job_outside_hydra(tmp_path):
    assert factory.hydra_job(tmp_path) is None  # compose API / notebooks: W&B names its runs itself


# --- train() with logger=wandb ---------------------------------------------------------------------------

def _wandb_run(data_root: Path, out: Path, *extra: str):
    cfg = compose_config("train", tiny_train_overrides(data_root, out) + [
        "model=resnet18", "logger=wandb", "trainer.max_epochs=1", "trainer.limit_train_batches=1",
        "trainer.limit_val_batches=1", "trainer.log_every_n_steps=1", "test_after_fit=false", *extra])
    with open_dict(cfg):  # checkpoints only: the picture callbacks are not what these tests look at
        for name in [n for n in cfg.callbacks if n not in ("model_checkpoint", "last_checkpoint")]:
            del cfg.callbacks[name]
    return cfg


def test_each_training_is_its_own_finished_run_and_resume_continues_it(tiny_folder, tmp_path, offline_wandb):
    first, resumed, fresh = tmp_path / "first", tmp_path / "resumed", tmp_path / "fresh"
    score = train(_wandb_run(tiny_folder, first))
    assert isinstance(score, float) and 0.0 <= score <= 1.0
    (run,) = offline_runs(first)
    assert (first / tracking.RUN_ID_FILE).read_text().strip() == run["id"]
    assert run["exit_code"] == 0
    assert run["config"]["model"]["backbone"] == "resnet18"  # the resolved config, not only the module's hparams
    assert run["config"]["paths"]["output_dir"] == str(first)
    assert run["summary"][tracking.best_metric_name(MONITOR)] == pytest.approx(score)
    assert run["summary"][MONITOR] == pytest.approx(score)

    train(_wandb_run(tiny_folder, resumed, f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}",
                     "trainer.max_epochs=2"))
    (continued,) = offline_runs(resumed)
    assert continued["id"] == run["id"]  # the W&B id recorded next to the checkpoint
    assert (resumed / tracking.RUN_ID_FILE).read_text().strip() == run["id"]
    assert continued["exit_code"] == 0

    train(_wandb_run(tiny_folder, fresh))  # had a run been left open, Lightning would have logged into it
    (new,) = offline_runs(fresh)
    assert new["id"] != run["id"] and new["exit_code"] == 0


def test_failed_training_finishes_its_run_as_failed(tiny_folder, tmp_path, offline_wandb):
    with pytest.raises(CheckpointError):
        train(_wandb_run(tiny_folder, tmp_path / "out", f"ckpt_path={tmp_path / 'missing.ckpt'}"))
    (run,) = offline_runs(tmp_path / "out")
    assert run["exit_code"] == 1


def test_explicit_wandb_id_is_used(tiny_folder, tmp_path, offline_wandb):
    with pytest.raises(CheckpointError):  # stops right after the run opened: enough to see its id
        train(_wandb_run(tiny_folder, tmp_path / "out", "logger.wandb.id=myrun42",
                         f"ckpt_path={tmp_path / 'missing.ckpt'}"))
    (run,) = offline_runs(tmp_path / "out")
    assert run["id"] == "myrun42" and (tmp_path / "out" / tracking.RUN_ID_FILE).read_text().strip() == "myrun42"
