"""Adding a bundle to the model zoo (:mod:`cbir.zoo` finds and loads them): float16 weights when that keeps
the embeddings within :data:`FP16_TOLERANCE`, no runtime copies, an entry in ``zoo.json``."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from cbir.errors import ConfigError
from cbir.export.bundle import load_bundle, synthetic_check_images
from cbir.io import atomic_folder, atomic_write_json, sha256_file
from cbir.zoo import MANIFEST, zoo_dir, zoo_models

FP16_TOLERANCE = 1e-3  # max |fp32 - fp16-weights| on the L2-normalised embeddings of sample inputs


def add_to_zoo(bundle_path: str | Path, name: str, *, description: str, command: str, metrics: dict,
               trained_on: str, folder: Path | None = None) -> dict:
    """Copy a bundle into the zoo as ``name``: float16 weights (checked against the float32 model), no runtime
    copies, its manifest's file hashes updated; record it in ``zoo.json``. Returns the entry."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"cbir models add: name={name!r} must be a plain folder name")
    folder = folder or zoo_dir()
    source = load_bundle(bundle_path)
    difference = _fp16_difference(source)
    half_precision = difference <= FP16_TOLERANCE  # else the weights stay float32 (twice the size)
    with atomic_folder(folder / name) as staging:
        for item in ("model.json", "preprocessing.json", "config.yaml"):
            if (source.path / item).is_file():
                shutil.copy2(source.path / item, staging / item)
        state = source.embedder.state_dict()
        if half_precision:
            state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        torch.save(state, staging / "weights.pt")
        manifest = dict(source.manifest, parity={}, source=f"zoo:{name} ({source.manifest.get('source')})")
        manifest["files"] = {p.name: sha256_file(p) for p in sorted(staging.iterdir()) if p.is_file()}
        atomic_write_json(staging / "manifest.json", manifest, indent=2)
    entry = {"description": description, "backbone": source.manifest.get("backbone"),
             "input_size": source.input_size, "embedding_dim": source.embedding_dim, "trained_on": trained_on,
             "metrics": metrics, "command": command, "weights_sha256": manifest["files"]["weights.pt"],
             "size_mb": round((folder / name / "weights.pt").stat().st_size / 2**20, 2),
             "weights_dtype": "float16" if half_precision else "float32",
             "fp16_max_abs_difference": difference}
    models = zoo_models(folder)
    models[name] = entry
    atomic_write_json(folder / MANIFEST, {"models": dict(sorted(models.items()))}, indent=2)
    return entry


def _fp16_difference(bundle) -> float:
    """Largest change of the L2-normalised embeddings when the weights go through float16 and back."""
    import copy

    images = synthetic_check_images(bundle.preprocessing, count=16)
    rounded = copy.deepcopy(bundle.embedder)
    rounded.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                             for k, v in bundle.embedder.state_dict().items()})
    with torch.inference_mode():
        return float((bundle.embedder.eval()(images) - rounded.eval()(images)).abs().max())
