"""User mistakes give one clear line on stderr and a non-zero exit, through the real entry points."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from helpers.data import write_class_images
from helpers.paths import ROOT


def run_entry(script: str, *overrides: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(ROOT / script), *overrides, f"hydra.run.dir={cwd / 'out'}"],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


TINY = ["data.image_size=32", "data.batch_size=4", "data.m_per_class=2", "data.num_workers=0",
        "model=resnet18", "model.pretrained=none", "logger=none", "trainer=debug"]


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in errors[0]
    return errors[0]


def test_missing_data_directory(tmp_path):
    result = run_entry("train.py", "data=folder", f"data.root={tmp_path / 'nowhere'}", *TINY, cwd=tmp_path)
    assert_one_line_error(result, "nowhere", "does not exist")


def test_unreadable_image_names_the_file(tmp_path):
    root = tmp_path / "images"
    write_class_images(root, num_classes=4, per_class=2, size=16)
    (root / "class_00" / "img_0.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    result = run_entry("train.py", "data=folder", f"data.root={root}", *TINY, cwd=tmp_path)
    assert_one_line_error(result, "img_0.png", "cannot decode")


def test_unknown_config_key(tmp_path):
    result = run_entry("train.py", "trainer.max_epochz=3", cwd=tmp_path)
    assert_one_line_error(result, "unknown config key 'trainer.max_epochz'")


def test_unknown_group_option_lists_choices(tmp_path):
    result = run_entry("train.py", "model=resnet99", cwd=tmp_path)
    assert_one_line_error(result, "unknown option 'resnet99'", "resnet34")


def test_missing_required_value(tmp_path):
    result = run_entry("train.py", "data=folder", *TINY, cwd=tmp_path)
    assert_one_line_error(result, "data.root")


def test_eval_missing_checkpoint(tmp_path):
    result = run_entry("eval.py", f"ckpt_path={tmp_path / 'gone.ckpt'}", cwd=tmp_path)
    assert_one_line_error(result, "gone.ckpt", "does not exist")


def test_cli_verbs(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cbir.cli", "weights", "fetch", "resnet152"],
                            capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, "resnet152")
    result = subprocess.run([sys.executable, "-m", "cbir.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "weights" in result.stdout and "train" in result.stdout
