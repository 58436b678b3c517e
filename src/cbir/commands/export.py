"""``export.py``/``cbir export``: checkpoint (or pretrained model) → bundle, and optionally an index of a
collection built with that bundle."""

from __future__ import annotations

import logging
from dataclasses import dataclass
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
    runtimes = list(cfg.runtimes)
    training = training_collection(config)
    samples = export_samples(embedder, cfg.get("int8_calibration") or index_cfg.get("collection") or training,
                             int(cfg.get("precision_check_images", 512)),
                             int(cfg.get("int8_calibration_images", 256)) if "onnx-int8" in runtimes else 0)
    auto = auto_calibration(training or index_cfg.get("collection"))
    out = export_bundle(embedder, cfg.out, model_config=model_config, config=config,
                        query_preprocess=query_preprocess, runtimes=runtimes,
                        tolerance=float(cfg.parity_tolerance), source=source, overwrite=bool(cfg.overwrite),
                        check_images=samples.check, check_source=samples.source, check_labels=samples.labels,
                        calibration_images=samples.calibration, int8_max_drop=float(cfg.get("int8_max_drop", 0.005)),
                        reranker=cfg.get("reranker"), auto_calibration=auto)
    bundle = load_bundle(out)
    print(describe_bundle(bundle))
    if index_cfg.get("collection"):
        from cbir.index.pipeline import build_bundle_index

        options = {k: v for k, v in OmegaConf.to_container(index_cfg, resolve=True).items()
                   if k not in ("collection", "out")}
        index = build_bundle_index(bundle, index_cfg.collection, index_cfg.out, **options)
        print(f"index: {len(index)} images → {index_cfg.out}")
    return out


@dataclass
class ExportSamples:
    """Real pictures for the export's checks, as model inputs: ``check`` (the bf16 and INT8 checks, with
    their ``labels`` when the collection has them) and ``calibration`` (the INT8 copy's scales; never the
    check images)."""

    check: object = None
    labels: list | None = None
    calibration: object = None
    source: str = ""


def export_samples(embedder, collection, count: int, calibration_count: int = 0) -> ExportSamples:
    """Up to ``count`` check images and ``calibration_count`` calibration images of ``collection`` (the
    collection being indexed, else the training data), disjoint; empty without a collection (the export then
    checks on synthetic images and makes no INT8 copy). In a labelled collection the check images come as
    whole groups of a class (every one has a same-class partner, so P@1 among them is a real retrieval
    score) from classes spread over the collection; otherwise both sets are spread evenly over it."""
    if not collection or count < 2:
        return ExportSamples()
    import torch

    from cbir.data.images import load_record
    from cbir.data.transforms import eval_transform
    from cbir.errors import BadImageError
    from cbir.index.collection import Collection, read_collection

    chosen = collection if isinstance(collection, Collection) else read_collection(collection)
    check_positions, calibration_positions = sample_positions([chosen.label(int(i)) for i in chosen.indices],
                                                             count, calibration_count)
    transform = eval_transform(int(embedder.input_size), embedder.mean, embedder.std)

    def load(positions):
        images, labels = [], []
        for position in positions:
            try:
                images.append(transform(image=load_record(chosen.catalog, int(chosen.indices[position])))["image"])
            except BadImageError:
                continue  # the index build reports unreadable images; the checks need only readable ones
            labels.append(chosen.label(int(chosen.indices[position])))
        return images, labels

    check, labels = load(check_positions)
    calibration, _ = load(calibration_positions)
    if len(check) < 2:
        return ExportSamples()
    return ExportSamples(torch.stack(check), labels if all(label is not None for label in labels) else None,
                         torch.stack(calibration) if calibration else None,
                         f"{len(check)} images of {getattr(collection, 'spec', collection)}")


def auto_calibration(collection, count: int | None = None) -> dict | None:
    """``auto`` query clean-up's thresholds fitted (:func:`cbir.preprocess.calibrate.fit_auto`) to up to
    ``count`` images spread over ``collection`` — the model's training images, else the collection indexed —, with
    where they came from; None (the shipped thresholds) without a collection or with too few readable images."""
    if not collection:
        return None
    import numpy as np

    from cbir.data.images import load_record
    from cbir.errors import BadImageError
    from cbir.index.collection import Collection, read_collection
    from cbir.preprocess.calibrate import CALIBRATION_IMAGES, MIN_IMAGES, fit_auto

    chosen = collection if isinstance(collection, Collection) else read_collection(collection)
    count = CALIBRATION_IMAGES if count is None else count
    picks = np.unique(np.linspace(0, len(chosen.indices) - 1, num=min(count, len(chosen.indices))).astype(np.int64))
    images = []
    for position in picks:
        try:
            images.append(load_record(chosen.catalog, int(chosen.indices[position])))
        except BadImageError:
            continue  # the index build reports unreadable images; the thresholds need only readable ones
    name = chosen.spec
    if len(images) < MIN_IMAGES:
        log.info("export: %d readable images of %s are too few to fit `auto`'s thresholds; the shipped ones apply",
                 len(images), name)
        return None
    fitted = fit_auto(images)
    fitted["source"] = f"{len(images)} images of {name}"
    log.info("export: `auto` query clean-up thresholds fitted to %s: %s", fitted["source"], fitted["params"])
    return fitted


def sample_positions(labels: list, count: int, calibration_count: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Positions of the check images and of the (disjoint) calibration images among a collection's ``labels``
    (see :func:`export_samples`)."""
    import numpy as np

    total = len(labels)
    if all(label is not None for label in labels) and len(set(labels)) > 1:
        by_class: dict = {}
        for position, label in enumerate(labels):
            by_class.setdefault(label, []).append(position)
        groups = [members for members in by_class.values() if len(members) > 1]
        per_class = max(2, -(-count // max(1, len(groups))))
        check: list[int] = []
        for g in np.random.default_rng(seed).permutation(len(groups)):
            members = groups[int(g)]
            take = min(per_class, len(members), count - len(check))
            if take < 2:
                break
            check += [members[int(i)] for i in np.linspace(0, len(members) - 1, num=take).astype(np.int64)]
        if len(check) >= 2:
            used = set(check)
            rest = [p for p in range(total) if p not in used]
            picks = np.linspace(0, len(rest) - 1, num=min(calibration_count, len(rest))).astype(np.int64)
            return check, sorted({rest[int(i)] for i in picks}) if calibration_count and rest else []
    picks = np.unique(np.linspace(0, total - 1, num=min(count + calibration_count, total)).astype(np.int64))
    calibrate = np.zeros(len(picks), bool)
    spare = max(0, len(picks) - count)
    if spare:  # spread the calibration picks among the check picks
        calibrate[np.linspace(0, len(picks) - 1, num=spare).astype(np.int64)] = True
    return [int(p) for p in picks[~calibrate]], [int(p) for p in picks[calibrate]]


def training_collection(run_config: dict | None):
    """The training run's own training images (its data config as it ran: a user's folder, a CSV or a shipped
    dataset, the ``train_split`` with its validation classes still in it) as a Collection, for the export's
    checks and the INT8 calibration; None without a run config or when its data cannot be read here."""
    data = (run_config or {}).get("data") or {}
    if not data.get("reader"):
        return None
    from cbir.data.readers import catalog_from_config
    from cbir.errors import CbirError
    from cbir.index.collection import Collection

    split = str(data.get("train_split", "train"))
    try:
        catalog = catalog_from_config(data, validation=False)
        indices = catalog.select(split)
    except (CbirError, OSError) as exc:
        log.info("export: the training data is not readable here (%s); checking on synthetic images", exc)
        return None
    if len(indices) == 0:
        return None
    return Collection(f"{data.get('name', 'training data')}:{split}", catalog, indices)


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
    copies = ", ".join(_describe_copy(name, entry) for name, entry in parity.items())
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
    fitted = bundle.preprocessing.auto
    if fitted:
        text += f"\n`auto` query clean-up thresholds fitted to {fitted.get('source', 'its training images')}"
    if bundle.has_reranker:
        text += "\npairwise re-ranker: reranker.pt (search with rerank.method=pairwise)"
    return text


def _describe_copy(name: str, entry: dict) -> str:
    if "max_abs_difference" in entry:
        return f"{name} (max |diff| {entry['max_abs_difference']:.1e})"
    if "drop" in entry:  # the INT8 copy's retrieval check
        k = entry["k"]
        measured = (f"P@1 {100 * entry['int8']['p_at_1']:.1f} vs fp32 {100 * entry['fp32']['p_at_1']:.1f}, "
                    f"R@{k} {100 * entry['int8'][f'r_at_{k}']:.1f} vs {100 * entry['fp32'][f'r_at_{k}']:.1f} "
                    f"on {entry['images']} images, by {entry['basis']}")
        return f"{name} ({measured})" if entry.get("passed") else f"{name}: dropped ({measured})"
    return f"{name}: {entry.get('skipped', 'skipped')}"


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
