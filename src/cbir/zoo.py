"""The model zoo: trained models that ship with the project, named ``zoo:<name>``.

Each is a bundle folder (weights stored in float16 — half the size — when that keeps the embeddings within
1e-3 of the float32 model, measured when it is added, else in float32; no TorchScript/ONNX copies, which ``export.py`` can remake) under
``checkpoints/zoo/<name>/``, listed in ``checkpoints/zoo/zoo.json`` with what it was trained on, its measured
metrics, the command that made it and its weights' SHA-256. Larger models are listed by URL only, for
connected machines. ``cbir.load_bundle("zoo:<name>")``, ``search.py bundle=zoo:<name>`` and
``python train.py model.pretrained=zoo:<name>`` (start training from it) use them.

``$CBIR_ZOO`` points at another zoo folder; the default is the ``checkpoints/zoo`` of the source tree this
package runs from (an installed wheel has none: clone the repository, or set ``$CBIR_ZOO``). Adding a model:
:mod:`cbir.export.zoo`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from cbir.errors import CbirError
from cbir.io import sha256_file

PREFIX = "zoo:"
MANIFEST = "zoo.json"


class ZooError(CbirError):
    """An unknown zoo name, or a zoo model that is not on this machine."""


def zoo_dir() -> Path:
    override = os.environ.get("CBIR_ZOO")
    return Path(override) if override else Path(__file__).resolve().parents[2] / "checkpoints" / "zoo"


def is_zoo_name(spec) -> bool:
    return isinstance(spec, str | os.PathLike) and str(spec).startswith(PREFIX)


def zoo_models(folder: Path | None = None) -> dict[str, dict]:
    """name → entry of the zoo's manifest (empty when there is no zoo here)."""
    path = (folder or zoo_dir()) / MANIFEST
    if not path.is_file():
        return {}
    try:
        return dict(json.loads(path.read_text())["models"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ZooError(f"model zoo: cannot read {path}: {exc}") from None


def zoo_entry(name: str) -> dict:
    name = name.removeprefix(PREFIX)
    models = zoo_models()
    if name not in models:
        known = ", ".join(sorted(models)) or f"none (no {MANIFEST} in {zoo_dir()}; set $CBIR_ZOO)"
        raise ZooError(f"zoo:{name}: no such model in the zoo; available: {known} (cbir models list)")
    return models[name]


def zoo_bundle_path(spec: str) -> Path:
    """``zoo:<name>`` → its bundle folder on this machine; a URL-only entry says where to get it."""
    name = str(spec).removeprefix(PREFIX)
    entry = zoo_entry(name)
    folder = zoo_dir() / name
    if not (folder / "manifest.json").is_file():
        where = f"download it from {entry['url']} into {folder}" if entry.get("url") else f"it should be in {folder}"
        raise ZooError(f"zoo:{name} is not on this machine: {where}")
    return folder


def zoo_weights(spec: str) -> dict:
    """The float32 state dict of a zoo model (the Embedder's: trunk and head), checked against its hash."""
    import torch

    folder = zoo_bundle_path(spec)
    entry = zoo_entry(spec)
    weights = folder / "weights.pt"
    if sha256_file(weights) != entry.get("weights_sha256"):
        raise ZooError(f"{spec}: {weights} does not match the SHA-256 in {MANIFEST} (damaged or replaced)")
    state = torch.load(weights, map_location="cpu", weights_only=True)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
