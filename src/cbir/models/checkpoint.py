"""Training checkpoints → the Embedder they hold, without the training config, Lightning or Hydra: a
checkpoint stores the plain ``model_config`` that rebuilds the model (:mod:`cbir.models.from_config`)."""

from __future__ import annotations

from pathlib import Path

import torch

from cbir.errors import CheckpointError
from cbir.io import sha256_file
from cbir.models.embedder import Embedder
from cbir.models.from_config import embedder_from_model_config


def load_embedder_checkpoint(ckpt_path: str | Path) -> Embedder:
    """Rebuild the Embedder stored in a training checkpoint (no training config needed)."""
    return load_checkpoint_model(ckpt_path)[0]


def resolve_checkpoint(ckpt_path: str | Path) -> Path:
    """A checkpoint file, or a training run folder → its best checkpoint (newest ``best-*.ckpt`` in
    ``checkpoints/``), else its ``last.ckpt``."""
    path = Path(ckpt_path)
    if not path.is_dir():
        return path
    folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
    best = sorted(folder.glob("best-*.ckpt"), key=lambda p: p.stat().st_mtime)
    if best:
        return best[-1]
    if (folder / "last.ckpt").is_file():
        return folder / "last.ckpt"
    raise CheckpointError(f"ckpt_path: folder {path} holds no best-*.ckpt or last.ckpt "
                          "(give a checkpoint file or a training run folder)")


def load_checkpoint_model(ckpt_path: str | Path) -> tuple[Embedder, dict]:
    """The Embedder stored in a training checkpoint (a file, or a run folder: its best checkpoint) and
    the model config that rebuilds it. LoRA adapters are merged into the trunk's weights."""
    path = resolve_checkpoint(ckpt_path)
    if not path.is_file():
        raise CheckpointError(f"ckpt_path: checkpoint {path} does not exist")
    verify_checkpoint(path)
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - unreadable user file
        raise CheckpointError(f"ckpt_path: cannot read checkpoint {path}: {exc}") from None
    model_cfg = (checkpoint.get("hyper_parameters") or {}).get("model_config")
    if not model_cfg:
        raise CheckpointError(f"ckpt_path: {path} is not a cbir training checkpoint (no model_config)")
    model_cfg = dict(model_cfg)
    lora = model_cfg.pop("lora", None)  # trained with adapters: merged here, the model is plain from now on
    embedder = embedder_from_model_config(model_cfg, pretrained="none")
    state = {k[len("embedder."):]: v for k, v in checkpoint["state_dict"].items() if k.startswith("embedder.")}
    if lora:
        from cbir.models.lora import merge_lora_state

        state = merge_lora_state(state, **lora)
    result = embedder.load_state_dict(state, strict=False)
    if result.missing_keys:
        raise CheckpointError(f"ckpt_path: {path} lacks {len(result.missing_keys)} embedder weights "
                              f"(first: {result.missing_keys[0]})")
    return embedder, model_cfg



def run_config(ckpt_path: str | Path) -> dict | None:
    """The resolved config of the training run a checkpoint came from (``<run>/checkpoints/x.ckpt`` →
    ``<run>/config.yaml``); None for a checkpoint outside a run folder."""
    from omegaconf import OmegaConf

    candidate = Path(ckpt_path).resolve().parent.parent / "config.yaml"
    if not candidate.is_file():
        return None
    return OmegaConf.to_container(OmegaConf.load(candidate), resolve=False)


def hash_state(digest, module: torch.nn.Module) -> None:
    """Feed every tensor of ``module``'s state dict (name and raw bytes) into ``digest``: two models hash alike
    only if their weights are bit-identical (index and re-ranker fingerprints)."""
    for key, tensor in module.state_dict().items():
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())


SIDECAR_SUFFIX = ".sha256"


def sidecar(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def verify_checkpoint(path: str | Path) -> None:
    """CheckpointError when ``path`` no longer matches the checksum written with it. Checkpoints saved
    without one (older runs, other tools) are accepted as they are."""
    path = Path(path)
    recorded = sidecar(path)
    if not recorded.is_file() or not path.is_file():
        return
    fields = recorded.read_text().split()
    expected = fields[0] if fields else ""
    if sha256_file(path) != expected:
        raise CheckpointError(f"checkpoint {path} does not match its checksum ({recorded.name}): the file changed or "
                              "was damaged after it was saved; use another checkpoint (e.g. the run's last.ckpt) or "
                              "train again")
