"""Sweeps: the W&B sweep files and the Optuna search space are real train.py overrides, and Hydra multirun /
Optuna runs give every job its own run folder (and its own, finished, W&B run)."""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from helpers.configs import tiny_train_overrides
from helpers.paths import ROOT
from helpers.wandb_offline import offline_runs
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from cbir.commands.runner import check_overrides, config_dir
from cbir.training import tracking
from cbir.training.module import MONITOR

SWEEP_FILES = sorted((config_dir() / "sweep").glob("*.yaml"))
STANDARD_COMMAND = ["${env}", "${interpreter}", "${program}", "${args_no_hyphens}"]


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _compose(overrides: list[str]):
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=True)


def _is_group(key: str) -> bool:
    return (config_dir() / key).is_dir()


def _assert_applied(cfg, key: str, value) -> None:
    """The override took effect: a group's chosen option, or the key's value in the composed config."""
    if _is_group(key):
        assert cfg.hydra.runtime.choices[key] == str(value), f"{key}={value} did not select that option"
    else:
        composed = OmegaConf.select(cfg, key, throw_on_missing=True)
        assert composed == pytest.approx(value), f"{key}={value} composed as {composed}"


def _candidate_values(spec: dict) -> list:
    """What the sweep can hand train.py for one parameter: its value(s), or its distribution's endpoints."""
    if "value" in spec:
        return [spec["value"]]
    if "values" in spec:
        return list(spec["values"])
    low, high = spec["min"], spec["max"]
    if spec.get("distribution") in ("log_uniform", "q_log_uniform"):  # min/max are natural-log exponents
        low, high = math.exp(low), math.exp(high)
    return [low, high]


def test_sweep_files_exist():
    assert {p.stem for p in SWEEP_FILES} >= {"losses_heads", "lr_margin"}


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_sweep_file_is_a_valid_wandb_sweep(path):
    config = _load(path)
    assert config["program"] == "train.py" and (ROOT / config["program"]).is_file()
    assert config["method"] in ("grid", "random", "bayes")
    assert config["metric"] == {"name": tracking.best_metric_name(MONITOR), "goal": "maximize"}
    assert config["command"] == STANDARD_COMMAND  # Hydra takes key=value, not --key=value
    assert config["parameters"]["logger"] == {"value": "wandb"}  # the agent's run is the one train.py logs to
    if config["method"] == "grid":
        assert all("value" in s or "values" in s for s in config["parameters"].values())
    sweeps = pytest.importorskip("sweeps")  # W&B's own sweep engine and schema (offline)
    assert sweeps.schema_violations_from_proposed_config(config) == []


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_every_sweep_parameter_is_a_train_override(path):
    """Each value (each grid point for a grid sweep; both ends of a distribution) composes under train.py
    and lands where it should, e.g. ``loss=arcface`` selects conf/loss/arcface.yaml."""
    parameters = _load(path)["parameters"]
    names = list(parameters)
    choices = [_candidate_values(parameters[name]) for name in names]
    if _load(path)["method"] == "grid":
        points = list(itertools.product(*choices))
    else:  # every value of one parameter with the others at their first value
        first = [c[0] for c in choices]
        points = [tuple(v if j == i else first[j] for j in range(len(names))) for i, c in enumerate(choices)
                  for v in c]
    assert points
    for point in points:
        cfg = _compose([f"{name}={value}" for name, value in zip(names, point)])
        for name, value in zip(names, point):
            _assert_applied(cfg, name, value)


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_agent_command_composes(path):
    """The command line ``wandb agent`` builds (with wandb's own code) for a run the sweep engine proposes."""
    sweeps = pytest.importorskip("sweeps")
    from wandb.sdk.launch.sweeps.utils import create_sweep_command, create_sweep_command_args

    config = _load(path)
    run = sweeps.next_run(config, [], validate=True)
    args = create_sweep_command_args({"args": run.config})["args_no_hyphens"]
    command = create_sweep_command(list(config["command"]))
    assert command[-1] == "${args_no_hyphens}" and command[2] == "${program}"
    assert all("=" in a and not a.startswith("-") for a in args)
    check_overrides("train", args)  # what train.py checks before Hydra starts: raises on any bad override
    cfg = _compose(args)
    for name, spec in run.config.items():
        _assert_applied(cfg, name, spec["value"])


def _optuna_search_space(cfg) -> dict:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra_plugins.hydra_optuna_sweeper._impl import create_optuna_distribution_from_override

    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()])
    return {o.get_key_element(): create_optuna_distribution_from_override(o) for o in parsed}


def test_optuna_search_is_seeded_maximises_and_composes():
    cfg = _compose(["hparams_search=optuna"])
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper") and cfg.hydra.mode.name == "MULTIRUN"
    assert sweeper.direction == "maximize"
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed is not None
    space = _optuna_search_space(cfg)
    assert set(space) >= {"optimizer.lr", "loss.margin", "head"}
    assert space["optimizer.lr"].__class__.__name__ == "LogUniformDistribution"
    values = {}
    for key, dist in space.items():
        if isinstance(dist, str):  # a fixed parameter (loss: triplet)
            values[key] = [dist]
        elif hasattr(dist, "choices"):
            values[key] = list(dist.choices)
        else:
            values[key] = [dist.low, dist.high]
    first = {k: v[0] for k, v in values.items()}
    for key, candidates in values.items():
        for value in candidates:
            point = {**first, key: value}
            composed = _compose(["hparams_search=optuna", *(f"{k}={v}" for k, v in point.items())])
            for k, v in point.items():
                _assert_applied(composed, k, v)


# --- multirun and Optuna, as users run them (subprocesses; tiny data, untrained ResNet-18) ---------------

def _cli_overrides(data_root: Path) -> list[str]:
    """tiny_train_overrides without paths.output_dir: each multirun job gets its own folder from Hydra."""
    return [o for o in tiny_train_overrides(data_root, Path("unused")) if not o.startswith("paths.")] + [
        "model=resnet18"]


def _run_train(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb-home"),
           "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
           "WANDB_DATA_DIR": str(tmp_path / "wandb-data"), "NETRC": str(tmp_path / "no-netrc"),
           "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "1"}
    env.pop("WANDB_API_KEY", None)
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_multirun_fast_dev_run_gives_each_job_its_own_run_folder(tiny_folder, tmp_path):
    """python train.py -m loss=triplet,contrastive trainer=debug: two jobs, two folders, two configs."""
    sweep = tmp_path / "sweep"
    _run_train(["-m", *_cli_overrides(tiny_folder), "trainer=debug", "loss=triplet,contrastive",
                f"hydra.sweep.dir={sweep}"], tmp_path)
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    losses = [OmegaConf.load(job / "config.yaml").loss._target_.rsplit(".", 1)[-1] for job in jobs]
    assert losses == ["TripletMarginLoss", "ContrastiveLoss"]
    for job in jobs:
        assert OmegaConf.load(job / "config.yaml").paths.output_dir == str(job)
        assert (job / ".hydra" / "overrides.yaml").is_file()


@pytest.mark.slow
def test_optuna_search_with_wandb_one_finished_run_per_trial(tiny_folder, tmp_path):
    """hparams_search=optuna with 2 trials on tiny data, logger=wandb offline: Optuna gets each trial's
    real validation MAP@R, writes the best one, and every trial is its own finished W&B run in one group."""
    sweep = tmp_path / "search"
    _run_train(["hparams_search=optuna", *_cli_overrides(tiny_folder), "hydra.sweeper.n_trials=2",
                "trainer.max_epochs=1", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
                "callbacks=none", "logger=wandb", f"hydra.sweep.dir={sweep}"], tmp_path)
    trials = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in trials] == ["0", "1"]
    scores = [yaml.safe_load((t / "results.json").read_text())["best_val_map_at_r"] for t in trials]
    assert all(0.0 <= s <= 1.0 for s in scores)
    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert best["name"] == "optuna" and best["best_value"] == pytest.approx(max(scores))
    assert set(best["best_params"]) == {"optimizer.lr", "loss.margin", "head"}  # the searched ones (loss is fixed)
    lrs = [OmegaConf.load(t / "config.yaml").optimizer.lr for t in trials]
    assert lrs[0] != lrs[1]  # the sampler chose a different lr per trial

    runs = [offline_runs(t) for t in trials]
    assert all(len(r) == 1 for r in runs), "each trial logs into exactly one W&B run of its own"
    (first,), (second,) = runs
    assert first["id"] != second["id"]
    assert [r["id"] for r in (first, second)] == [(t / "wandb_id.txt").read_text().strip() for t in trials]
    assert first["group"] == second["group"] == tracking.default_group(tracking.JobInfo(sweep_dir=str(sweep)))
    assert first["name"].startswith("job0 ") and second["name"].startswith("job1 ")
    assert "optimizer.lr=" in first["name"]
    assert first["exit_code"] == second["exit_code"] == 0
    for run, trial, score in zip((first, second), trials, scores):
        assert run["config"]["optimizer"]["lr"] == pytest.approx(OmegaConf.load(trial / "config.yaml").optimizer.lr)
        assert run["summary"][tracking.best_metric_name(MONITOR)] == pytest.approx(score)


def test_train_objective_is_a_float_or_nan_for_optuna():
    """What train() hands a sweeper: a plain float; NaN when validation gave no finite score, which
    hydra-optuna-sweeper records as a failed trial (the search goes on) instead of crashing on None."""
    from cbir.commands.train import _objective

    assert type(_objective(0.25, MONITOR)) is float and _objective(0.25, MONITOR) == 0.25
    assert math.isnan(_objective(None, MONITOR)) and math.isnan(_objective(float("nan"), MONITOR))
    assert math.isnan(_objective(float("inf"), MONITOR))
