"""``export.py``/``cbir export``: checkpoint (or pretrained model) → bundle, and optionally an index of a
collection built with that bundle."""

from __future__ import annotations

import logging
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from cbir.commands.runner import run_hydra
from cbir.errors import ConfigError
from cbir.export.bundle import check_bundle_target, export_bundle, load_bundle
from cbir.models.checkpoint import load_checkpoint_model, resolve_checkpoint, run_config
from cbir.models.from_config import embedder_from_model_config
from cbir.models.wise import interpolate_trunk
from cbir.ranks import launched_rank
from cbir.training import factory

log = logging.getLogger(__name__)


def export(cfg: DictConfig) -> Path:
    """Write the bundle to ``cfg.out``; with ``cfg.index.collection`` also build its index."""
    _refuse_launched_ranks()
    check_bundle_target(Path(cfg.out), bool(cfg.overwrite))  # before minutes of loading and exporting
    if cfg.get("ckpt_path"):
        ckpt = resolve_checkpoint(cfg.ckpt_path)  # a run folder → its best checkpoint
        embedder, model_config = load_checkpoint_model(ckpt)
        config = run_config(ckpt)
        source = f"checkpoint {ckpt.resolve()}"
        alpha = cfg.get("wise_alpha")
        if alpha is not None and float(alpha) != 1.0:
            pretrained = _pretrained_name(cfg, config)
            counts = interpolate_trunk(embedder, embedder_from_model_config(model_config, pretrained), float(alpha))
            source += f", WiSE-FT: trunk = {float(alpha):g} x fine-tuned + {1 - float(alpha):g} x {pretrained}"
            log.info("WiSE-FT: %d trunk tensors averaged with the %s weights (alpha=%g)", counts["averaged"],
                     pretrained, float(alpha))
    else:
        model_config = factory.model_config(cfg)
        model_config.pop("lora", None)  # untrained: no adapters to merge, the bundle is the plain trunk
        embedder = embedder_from_model_config(model_config, cfg.model.pretrained)
        config = None
        source = f"{cfg.model.backbone} (pretrained={cfg.model.pretrained}, not trained)"
    query_preprocess = OmegaConf.to_container(cfg.preprocess, resolve=True) if cfg.get("preprocess") else None
    index_cfg = cfg.get("index") or {}
    check_images, check_source = precision_check_images(embedder, index_cfg.get("collection"),
                                                        int(cfg.get("precision_check_images", 128)))
    out = export_bundle(embedder, cfg.out, model_config=model_config, config=config,
                        query_preprocess=query_preprocess, runtimes=list(cfg.runtimes),
                        tolerance=float(cfg.parity_tolerance), source=source, overwrite=bool(cfg.overwrite),
                        check_images=check_images, check_source=check_source)
    bundle = load_bundle(out)
    print(describe_bundle(bundle))
    if index_cfg.get("collection"):
        from cbir.index.pipeline import build_bundle_index

        options = {k: v for k, v in OmegaConf.to_container(index_cfg, resolve=True).items()
                   if k not in ("collection", "out")}
        index = build_bundle_index(bundle, index_cfg.collection, index_cfg.out, **options)
        print(f"index: {len(index)} images → {index_cfg.out}")
    return out


def precision_check_images(embedder, collection: str | None, count: int):
    """Up to ``count`` pictures of the collection being indexed (spread evenly over it), as model inputs,
    for the bundle's bf16 check — the images its index will really hold; (None, "") without a collection
    (the export then uses synthetic ones)."""
    if not collection or count < 2:
        return None, ""
    import numpy as np
    import torch

    from cbir.data.images import load_record
    from cbir.data.transforms import eval_transform
    from cbir.errors import BadImageError
    from cbir.index.collection import read_collection

    chosen = read_collection(collection)
    transform = eval_transform(int(embedder.input_size), embedder.mean, embedder.std)
    picks = np.unique(np.linspace(0, len(chosen) - 1, num=min(count, len(chosen))).astype(np.int64))
    images = []
    for position in picks:
        try:
            images.append(transform(image=load_record(chosen.catalog, int(chosen.indices[position])))["image"])
        except BadImageError:
            continue  # the index build reports unreadable images; the check needs only readable ones
    if len(images) < 2:
        return None, ""
    return torch.stack(images), f"{len(images)} images of {collection}"


def _refuse_launched_ranks() -> None:
    """Under ``torchrun`` every rank would write the same bundle folder at once: export runs as one
    process and spawns its own extraction ranks (``index.processes=N``)."""
    launched = launched_rank()
    if launched is not None:
        raise ConfigError(f"export.py runs as one process, not under a launcher (this is rank {launched.rank} of "
                          f"{launched.world}); share the index extraction with index.processes={launched.world}, "
                          f"or build the index with `torchrun ... -m cbir.cli index build ...`")


def describe_bundle(bundle) -> str:
    parity = bundle.manifest.get("parity", {})
    copies = ", ".join(f"{name} (max |diff| {entry['max_abs_difference']:.1e})" if "max_abs_difference" in entry
                       else f"{name}: {entry.get('skipped', 'skipped')}" for name, entry in parity.items())
    text = (f"bundle {bundle.path}: {bundle.manifest.get('backbone')} → {bundle.embedding_dim}-d, "
            f"input {bundle.input_size} px; copies: {copies or 'none'}")
    check = bundle.bf16_parity
    if check:
        speed = check.get("images_per_second") or {}
        where = check.get("source") or f"{check['images']} images"
        text += (f"\nbf16 vs fp32 on {where}: min cosine "
                 f"{check['cosine_min']:.5f}, recall@{check['k']} {check['recall']:.3f} → "
                 + ("passed" if check["passed"] else "failed (precision=auto keeps fp32)")
                 + (f"; here {speed['fp32']:.0f} → {speed['bf16']:.0f} img/s" if speed else "")
                 + (f"; precision=auto on this machine: {'bf16' if bundle.use_bf16() else 'fp32'}"))
    return text


def _pretrained_name(cfg: DictConfig, run_config: dict | None) -> str:
    """The pretrained weights the run started from (its config.yaml), else this export's model.pretrained."""
    name = ((run_config or {}).get("model") or {}).get("pretrained") or cfg.model.get("pretrained")
    if not name or str(name) == "none":
        raise ConfigError("export.wise_alpha: the run started from no pretrained weights (model.pretrained=none); "
                          "WiSE-FT averages with the pretrained trunk: set model.pretrained=<weights> or drop wise_alpha")
    return str(name)


def main(argv=None):
    """``cbir export`` / ``python export.py``: Hydra overrides over conf/export.yaml."""
    return run_hydra("export", export, argv)
