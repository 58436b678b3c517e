"""The package as a user installs it: a wheel built from this checkout, installed (not editable) into a
fresh environment, run from a folder outside the repository. Training, export, search and the service
must find their configs inside the package (no ``conf/`` on disk, no ``CBIR_CONFIG_DIR``).

The fresh environment reuses the test environment's third-party packages through a ``.pth`` line (pip
``--no-deps``), so nothing is downloaded."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import pytest
from helpers.data import write_class_images
from helpers.paths import ROOT

pytestmark = pytest.mark.slow


def run(args: list, cwd: Path, env: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{args[0]} {args[1:3]} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def _setuptools_major() -> int:
    from importlib import metadata

    try:
        return int(metadata.version("setuptools").split(".")[0])
    except (metadata.PackageNotFoundError, ValueError):
        return 0


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(bin folder of a fresh environment with the cbir wheel installed, environment variables, a work
    folder outside the repository)."""
    base = tmp_path_factory.mktemp("wheel")
    dist = base / "dist"
    # the venv's own setuptools when it is new enough for pyproject.toml (>= 77), else pip's isolated build
    isolation = ["--no-build-isolation"] if _setuptools_major() >= 77 else []
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q", "-w", dist, ROOT],
        cwd=base, env=os.environ.copy())
    wheel = next(dist.glob("cbir-*.whl"))
    venv = base / "env"
    run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=base, env=os.environ.copy())
    python = venv / "bin" / "python"
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], base,
               os.environ.copy()).stdout.strip()
    # third-party packages from the test environment; the editable cbir there is not activated (its
    # .pth hook is only read in a site folder, and this is a plain path entry)
    Path(site, "test_env_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "CBIR_CONFIG_DIR")}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="offline", HYDRA_FULL_ERROR="0")
    run([python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", wheel], cwd=base, env=env)
    work = base / "elsewhere"
    write_class_images(work / "photos", num_classes=6, per_class=2, size=24)  # 3 train classes: 1 validates
    return venv / "bin", env, work


def test_imports_the_installed_copy_with_its_configs(installed):
    bin_dir, env, work = installed
    out = run([bin_dir / "python", "-c", "import cbir, cbir.configs as c; print(cbir.__file__); "
               "print(c.config_dir())"], work, env).stdout.split()
    assert not out[0].startswith(str(ROOT)) and "site-packages" in out[0]
    assert Path(out[1], "train.yaml").is_file() and Path(out[1], "data", "emoji.yaml").is_file()


def test_train_export_search_serve_from_outside_the_repo(installed):
    bin_dir, env, work = installed
    cbir = bin_dir / "cbir"
    assert "cbir train" in run([cbir, "--help"], work, env).stdout
    trained = run([cbir, "train", "data=folder", f"data.root={work / 'photos'}", "data.test_fraction=0.5",
                   "data.image_size=32", "data.batch_size=4", "data.m_per_class=2", "data.num_workers=0",
                   "model.pretrained=none", "head.dim=16", "logger=none", "trainer.fast_dev_run=true",
                   "trainer.accelerator=cpu", f"hydra.run.dir={work / 'run'}"], work, env)
    assert (work / "run" / "config.yaml").is_file(), trained.stdout[-2000:]

    run([cbir, "export", "model.pretrained=none", "model.image_size=32", "head.dim=16", f"out={work / 'bundle'}",
         f"index.collection={work / 'photos'}", "index.num_workers=0", "runtimes=[]",
         f"hydra.run.dir={work / 'export_run'}"], work, env)
    assert (work / "bundle" / "manifest.json").is_file() and (work / "bundle" / "index" / "index.json").is_file()
    assert len(list((work / "bundle" / "index").glob("index-*.faiss"))) == 1

    query = work / "photos" / "class_01" / "img_0.png"
    found = json.loads(run([cbir, "search", f"bundle={work / 'bundle'}", f"query={query}", "k=3", "--json",
                            "exclude_self=false"], work, env).stdout)[0]
    assert len(found["hits"]) == 3 and found["hits"][0]["path"] == str(query)

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen([str(cbir), "serve", f"bundle={work / 'bundle'}", f"port={port}", "log_level=warning"],
                              cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, health = time.monotonic() + 120, None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    health = json.loads(response.read())
                break
            except OSError:
                time.sleep(0.5)
        assert health is not None, server.stdout.read() if server.poll() is not None else "no answer"
        assert health["index_size"] == 12 and health["embedding_dim"] == 16
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
            assert b"<html" in response.read().lower()  # the page is package data too
    finally:
        server.terminate()
        server.wait(timeout=30)
