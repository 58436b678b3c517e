"""LightningModule: a metric-learning loss (+ miner) on Embedder outputs, retrieval metrics on
validation/test. Loss, miner, optimiser and scheduler come in as ready objects/factories, so this class
knows nothing about Hydra."""

from __future__ import annotations

import logging
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from cbir.evaluation.metrics import DEFAULT_KS, all_gather_concat, evaluate_embeddings, unique_by_id
from cbir.models.embedder import Embedder
from cbir.ranks import distributed_world_size as world_size
from cbir.training.consistency import consistency_loss
from cbir.training.distill import SimilarityDistillation
from cbir.training.distributed import TrainingLoss
from cbir.training.warmup import BackboneWarmup

MONITOR = "val/map_at_r"
log = logging.getLogger(__name__)
PAIRWISE_METHODS = ("pairwise", "dba+pairwise")  # rescore() methods that need attach_reranker()


class MetricLearningModule(pl.LightningModule):
    def __init__(
        self,
        embedder: Embedder,
        loss: nn.Module | None = None,
        miner: nn.Module | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., torch.optim.lr_scheduler.LRScheduler] | None = None,
        ks: Sequence[int] = DEFAULT_KS,
        model_config: dict | None = None,
        loss_lr: float | None = None,
        train_classes: Sequence[int] | None = None,
        warmup_epochs: int = 0,
        distill_weight: float = 0.0,
        layer_decay: float | None = None,
        knn_k: int | None = None,
        consistency_weight: float = 0.0,
    ) -> None:
        """``loss_lr``: learning rate of the loss's own parameters (proxies, class weights), which get
        their own optimiser group; ``None`` uses the optimiser's lr. ``train_classes``: the training label
        ids, remapped to 0..C-1 before the loss (proxy losses index their proxies by label).
        ``warmup_epochs``: the backbone stays frozen for that many epochs (:class:`BackboneWarmup`).
        ``distill_weight``: weight of the term that keeps the batch similarity structure of the trunk as it
        was before training (:class:`~cbir.training.distill.SimilarityDistillation`); 0 = off.
        ``layer_decay``: layer-wise learning-rate decay, the head at the optimiser's lr and each trunk layer
        (ViT block, or CNN stage) below it at ``layer_decay`` times the one above; ``None`` = one lr.
        ``consistency_weight``: weight of the term that pulls each augmented view's embedding towards its clean
        image's (:mod:`cbir.training.consistency`; batches then carry ``clean_image``); 0 = off."""
        super().__init__()
        self.embedder = embedder
        self.loss_fn = loss
        self.miner = miner
        self.optimizer_factory = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-4))
        self.loss_lr = loss_lr
        self.scheduler_factory = scheduler
        # not persistent: rebuilt from the data, so checkpoints stay loadable whatever the class ids
        self.register_buffer("label_map", contiguous_label_map(train_classes), persistent=False)
        self.warmup_epochs = int(warmup_epochs)
        if distill_weight < 0:
            raise ValueError(f"train.distill_weight must be >= 0, got {distill_weight}")
        self.distill_weight = float(distill_weight)
        if consistency_weight < 0:
            raise ValueError(f"train.consistency_weight must be >= 0, got {consistency_weight}")
        self.consistency_weight = float(consistency_weight)
        if layer_decay is not None and not 0.0 < float(layer_decay) <= 1.0:
            raise ValueError(f"train.layer_decay must lie in (0, 1], got {layer_decay}")
        self.layer_decay = None if layer_decay is None else float(layer_decay)
        # a frozen copy of the trunk as it comes (pretrained), made before any training step
        self.distill = SimilarityDistillation(embedder.backbone) if self.distill_weight > 0 else None
        self.ks = tuple(ks)
        self.knn_k = int(knn_k) if knn_k else None  # also report k-NN classification (accuracy, macro-F1)
        # enough to rebuild the Embedder from a checkpoint without the training config (eval.py)
        self.save_hyperparameters({"model_config": model_config or {}})
        self._eval_outputs: list[dict[str, torch.Tensor]] = []
        self._epoch_start = self._last_step_end = 0.0
        self._epoch_images = 0
        self.last_eval_metrics: dict[str, float] = {}
        self._val_metrics_step: int | None = None  # the training step whose weights last_eval_metrics scored (val)
        # the last evaluation's gathered outputs (DDP padding included), read by cbir.training.visuals
        self.last_eval_outputs: dict[str, torch.Tensor] = {}
        self.bad_images: set[str] = set()
        self._step_loss: TrainingLoss | None = None
        self._pairwise: tuple | None = None  # (re-ranker, candidates): not a submodule, never in a checkpoint

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedder(images)

    # -- training ----------------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        self._epoch_start, self._epoch_images = time.perf_counter(), 0
        self._last_step_end = self._epoch_start

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor | None:
        if self.loss_fn is None:
            raise RuntimeError("MetricLearningModule was built without a loss; it can only evaluate")
        if not self._note_bad_images(batch):
            return None  # every image of the batch was unreadable (data.on_bad_image=skip)
        embeddings = self.embedder(batch["image"])
        labels = self.training_labels(batch["label"])
        loss, value = self._training_loss()(embeddings, labels)
        if self.distill is not None:
            kept = self.distill(batch["image"], embeddings)
            loss = loss + self.distill_weight * kept
            self.log("train/distill", kept, on_step=True, on_epoch=True, batch_size=len(labels), sync_dist=True)
        if self.consistency_weight > 0:
            agreement = self._consistency(batch, embeddings)
            loss = loss + self.consistency_weight * agreement
            self.log("train/consistency", agreement, on_step=True, on_epoch=True, batch_size=len(labels),
                     sync_dist=True)
        self._epoch_images += len(labels)
        self._last_step_end = time.perf_counter()
        self.log("train/loss", value, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(labels),
                 sync_dist=True)
        return loss

    def _consistency(self, batch: dict, embeddings: torch.Tensor) -> torch.Tensor:
        """The clean/degraded consistency term of this batch: its clean views embedded without gradient."""
        if "clean_image" not in batch:
            raise RuntimeError("train.consistency_weight > 0 needs training batches with clean views "
                               "(RetrievalDataModule(clean_views=True))")
        with torch.no_grad():
            clean = self.embedder(batch["clean_image"])
        return consistency_loss(embeddings, clean)

    def _training_loss(self) -> TrainingLoss:
        """Loss and miner for this run's world size (under DDP: over the global batch, see
        :mod:`cbir.training.distributed`), built once per world size."""
        world = world_size()
        if self._step_loss is None or self._step_loss.world != world:
            self._step_loss = TrainingLoss(self.loss_fn, self.miner, world)
        return self._step_loss

    def on_train_epoch_end(self) -> None:
        # up to the last training step: validation runs before this hook and must not count
        elapsed = self._last_step_end - self._epoch_start
        if elapsed > 0 and self._epoch_images:
            self.log("train/images_per_second", self._epoch_images / elapsed, sync_dist=True, reduce_fx="sum")

    def configure_callbacks(self) -> list[pl.Callback]:
        return [BackboneWarmup(self.warmup_epochs)] if self.warmup_epochs > 0 else []

    # -- checkpoint extras ---------------------------------------------------------------------------
    QUEUE_STATE_KEY = "cross_batch_memory_queues"
    VAL_METRICS_KEY = "cbir_val_metrics"

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Cross-batch memory's rows are buffers (in the state dict), but its write position and
        whether it has wrapped round are plain attributes: without them a resumed run would ignore the
        restored rows until the queue wrapped again. A checkpoint saved right after a validation also keeps
        that validation's metrics: when the test protocol is validation's, train.py reports them instead of
        scoring the same images again (:func:`checkpoint_val_metrics`)."""
        queues = {name: {"queue_idx": int(m.queue_idx), "has_been_filled": bool(m.has_been_filled)}
                  for name, m in self._cross_batch_memories()}
        if queues:
            checkpoint[self.QUEUE_STATE_KEY] = queues
        if self._val_metrics_step is not None and self._val_metrics_step == checkpoint.get("global_step"):
            checkpoint[self.VAL_METRICS_KEY] = dict(self.last_eval_metrics)  # these very weights' metrics

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get(self.QUEUE_STATE_KEY, {})
        for name, memory in self._cross_batch_memories():
            if name in saved:
                memory.queue_idx = int(saved[name]["queue_idx"])
                memory.has_been_filled = bool(saved[name]["has_been_filled"])

    def _cross_batch_memories(self) -> list[tuple[str, nn.Module]]:
        return [(name, m) for name, m in self.named_modules()
                if hasattr(m, "queue_idx") and hasattr(m, "has_been_filled") and hasattr(m, "embedding_memory")]

    def training_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """Batch labels as the loss sees them: 0..C-1 over the training classes when those are known."""
        if self.label_map is None:
            return labels
        mapped = self.label_map[labels.clamp(0, len(self.label_map) - 1)]
        if bool(((labels >= len(self.label_map)) | (mapped < 0)).any()):
            unknown = sorted(set(labels.tolist()) - set(torch.nonzero(self.label_map >= 0).flatten().tolist()))
            raise RuntimeError(f"training batch has labels {unknown[:5]} outside the training classes")
        return mapped

    def embedder_param_groups(self) -> list[dict]:
        """The Embedder's trainable parameters as optimiser groups: one, or with ``layer_decay`` one per trunk
        layer (``lr_scale`` = decay ** its distance below the head) plus the head (scale 1)."""
        trainable = [p for p in self.embedder.parameters() if p.requires_grad]
        if self.layer_decay is None:
            return [{"params": trainable, "name": "embedder"}]
        layers = self.embedder.backbone.block_parameters()
        groups, placed = [], set()
        for depth, params in enumerate(layers):
            params = [p for p in params if p.requires_grad and id(p) not in placed]
            placed.update(id(p) for p in params)
            if params:
                groups.append({"params": params, "name": f"trunk.{depth}",
                               "lr_scale": self.layer_decay ** (len(layers) - depth)})
        rest = [p for p in trainable if id(p) not in placed]  # the head, and anything outside the layers
        return [*groups, {"params": rest, "name": "embedder", "lr_scale": 1.0}]

    def configure_optimizers(self):
        groups = self.embedder_param_groups()
        loss_params = [p for p in self.loss_fn.parameters() if p.requires_grad] if self.loss_fn is not None else []
        if loss_params:  # proxy/classifier losses: their own group, usually with a much higher lr
            group = {"params": loss_params, "name": "loss"}
            if self.loss_lr is not None:
                group["lr"] = self.loss_lr
            groups.append(group)
        optimizer = self.optimizer_factory(groups)
        for group in optimizer.param_groups:  # before the scheduler records each group's initial lr
            group["lr"] *= group.get("lr_scale", 1.0)
        if self.scheduler_factory is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.scheduler_factory(optimizer),
                                                         "interval": "epoch"}}

    # -- evaluation --------------------------------------------------------------------------------
    def _note_bad_images(self, batch: dict) -> bool:
        """Log each skipped image once; whether the batch has any image left."""
        for message in batch.get("bad_images", ()):
            if message not in self.bad_images:
                self.bad_images.add(message)
                log.warning("skipped unreadable image: %s", message)
        return "image" in batch

    def on_fit_end(self) -> None:
        self._report_bad_images()

    def on_test_end(self) -> None:
        self._report_bad_images()

    def _report_bad_images(self) -> None:
        if self.bad_images:
            log.warning("%d unreadable images were skipped (data.on_bad_image=skip); see the warnings above",
                        len(self.bad_images))

    def attach_reranker(self, reranker: nn.Module, candidates: int) -> None:
        """Evaluations from now on also keep each image's pairwise re-ranker tokens (:mod:`cbir.models.pairwise`),
        so :meth:`rescore` can report ``pairwise`` re-ranking of the first ``candidates`` hits."""
        self._pairwise = (reranker.eval(), int(candidates))

    def _collect(self, batch: dict) -> None:
        if not self._note_bad_images(batch):
            return
        images = batch["image"]
        outputs = {"label": batch["label"], "index": batch["index"], "role": batch["role"]}
        if self._pairwise is not None:
            reranker = self._pairwise[0].to(images.device)
            features = self.embedder.backbone(images)
            outputs["rerank_tokens"] = reranker.tokens(features).half()
            if self.embedder.scales == (1.0,):  # one trunk pass serves both
                outputs["embedding"] = F.normalize(self.embedder.head(features), dim=1).float()
        if "embedding" not in outputs:
            outputs["embedding"] = self.embedder(images).float()
        self._eval_outputs.append(outputs)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._collect(batch)

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._collect(batch)

    def on_validation_epoch_end(self) -> None:
        self._log_eval_metrics("val")

    def on_test_epoch_end(self) -> None:
        self._log_eval_metrics("test")

    PROGRESS_METRICS = ("precision_at_1", "map_at_r")  # shown in the progress bar

    def _log_eval_metrics(self, stage: str) -> None:
        """Concatenate this epoch's evaluation outputs, gather them from every process, score them
        (:meth:`_score`) and log the metrics under ``stage/``."""
        if not self._eval_outputs:
            return
        outputs = {key: torch.cat([o[key] for o in self._eval_outputs]) for key in self._eval_outputs[0]}
        self._eval_outputs.clear()
        if self.trainer.sanity_checking:
            return
        self.last_eval_outputs = {key: all_gather_concat(value) for key, value in outputs.items()}
        metrics = self._score(self.last_eval_outputs)
        self.last_eval_metrics = metrics
        self._val_metrics_step = self.trainer.global_step if stage == "val" else None
        for name, value in metrics.items():
            self.log(f"{stage}/{name}", value, prog_bar=name in self.PROGRESS_METRICS, sync_dist=False,
                     rank_zero_only=False)

    def _score(self, gathered: dict[str, torch.Tensor], **rerank) -> dict[str, float]:
        """Retrieval metrics of the gathered embeddings (items padded in by DDP counted once); ``rerank``:
        :func:`cbir.evaluation.metrics.evaluate_embeddings`'s ``rerank``, ``rerank_n``, ``rerank_alpha``."""
        _, embeddings, labels, roles = unique_by_id(gathered["index"], gathered["embedding"],
                                                    gathered["label"], gathered["role"])
        return evaluate_embeddings(embeddings, labels, roles, self.ks, knn_k=self.knn_k, **rerank)

    def rescore(self, method: str, n: int = 5, alpha: float = 3.0, candidates: int = 20) -> dict[str, float]:
        """The last evaluation's metrics again, with query expansion / database augmentation ``method``
        (:mod:`cbir.evaluation.rerank`) on the same embeddings, or ``pairwise`` re-ranking (after
        :meth:`attach_reranker`; ``dba+pairwise``: of a DBA-augmented gallery), or ``ceiling`` (the first
        ``candidates`` hits re-ordered by their labels: what any re-ranker of them can reach): no second
        forward pass."""
        if method == "ceiling":
            return self._score(self.last_eval_outputs, rerank="ceiling", rerank_n=int(candidates))
        if method in PAIRWISE_METHODS:
            if self._pairwise is None or "rerank_tokens" not in self.last_eval_outputs:
                raise ValueError("rescore('pairwise') needs attach_reranker() before the evaluation")
            from cbir.evaluation.pairwise import pairwise_evaluate

            gathered = self.last_eval_outputs
            ids, embeddings, labels, roles, tokens = unique_by_id(gathered["index"], gathered["embedding"],
                                                                  gathered["label"], gathered["role"],
                                                                  gathered["rerank_tokens"])
            reranker, candidates = self._pairwise
            return pairwise_evaluate(embeddings, labels, roles, tokens.float(), reranker.to(tokens.device),
                                     candidates, self.ks, knn_k=self.knn_k,
                                     dba=(n, alpha) if method == "dba+pairwise" else None)
        return self._score(self.last_eval_outputs, rerank=method, rerank_n=n, rerank_alpha=alpha)


def contiguous_label_map(train_classes: Sequence[int] | None) -> torch.Tensor | None:
    """Lookup table label id → 0..C-1 (in sorted id order), -1 for ids outside ``train_classes``."""
    if train_classes is None:
        return None
    classes = torch.as_tensor(sorted(set(int(c) for c in train_classes)), dtype=torch.long)
    if len(classes) == 0 or int(classes[0]) < 0:
        raise ValueError(f"train_classes must be non-empty non-negative label ids, got {list(train_classes)[:5]}")
    table = torch.full((int(classes[-1]) + 1,), -1, dtype=torch.long)
    table[classes] = torch.arange(len(classes))
    return table


PAIR_MONITOR = "val/pair_roc_auc"


class PairModule(MetricLearningModule):
    """Two-branch Siamese training on explicit pairs (``data=pairs``): one shared Embedder embeds both
    images of each pair, and the loss gets the 2B embeddings of a batch with the pairs spelled out as
    PML's ``indices_tuple`` ``(a1, p, a2, n)`` (no labels, no miner). Validation and test score the
    held-out pairs by cosine similarity: ROC-AUC and the accuracy at the best threshold."""

    SUPPORTED_LOSSES = ("ContrastiveLoss", "MultiSimilarityLoss")  # losses that score each pair on its own

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.loss_fn is None:
            raise RuntimeError("PairModule was built without a loss; it can only evaluate")
        same = batch["same"]
        embeddings = self.embedder(torch.cat([batch["image_a"], batch["image_b"]]))
        loss = self.loss_fn(embeddings, None, pair_indices(same))
        self._epoch_images += 2 * len(same)
        self._last_step_end = time.perf_counter()
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=len(same))
        return loss

    def _collect(self, batch: dict) -> None:
        a, b = self.embedder(batch["image_a"]).float(), self.embedder(batch["image_b"]).float()
        self._eval_outputs.append({"similarity": (a * b).sum(dim=1), "same": batch["same"], "index": batch["index"]})

    PROGRESS_METRICS = ("pair_roc_auc", "pair_accuracy")

    def _score(self, gathered: dict[str, torch.Tensor]) -> dict[str, float]:
        """Verification metrics of the held-out pairs, in place of retrieval metrics."""
        _, similarity, same = unique_by_id(gathered["index"], gathered["similarity"], gathered["same"])
        return pair_verification_metrics(similarity, same)


def pair_indices(same: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """PML's ``(a1, p, a2, n)`` for a batch embedded as ``cat([images_a, images_b])``: pair i joins rows
    i and B+i, a positive pair where ``same[i]`` is 1, a negative one otherwise."""
    rows = torch.arange(len(same), device=same.device)
    positive = same.bool()
    return rows[positive], rows[positive] + len(same), rows[~positive], rows[~positive] + len(same)


def pair_verification_metrics(similarity: torch.Tensor, same: torch.Tensor) -> dict[str, float]:
    """ROC-AUC of the similarity as a same/different score, the best accuracy any threshold gives, and
    that threshold (cosine similarity); AUC is undefined (NaN) unless both kinds of pair are present."""
    from torchmetrics.functional.classification import binary_auroc, binary_roc

    target = same.long()
    positives, count = int(target.sum()), len(target)
    metrics = {"num_pairs": float(count)}
    if positives in (0, count):
        warnings.warn("pair evaluation saw only one kind of pair; verification metrics skipped", stacklevel=2)
        return metrics
    similarity = similarity.float()
    fpr, tpr, thresholds = binary_roc(similarity, target, thresholds=None)
    accuracy = (tpr * positives + (1 - fpr) * (count - positives)) / count
    best = int(torch.argmax(accuracy))
    metrics.update({"pair_roc_auc": float(binary_auroc(similarity, target, thresholds=None)),
                    "pair_accuracy": float(accuracy[best]),
                    "pair_threshold": float(thresholds[best].clamp(-1.0, 1.0))})
    return metrics


def checkpoint_val_metrics(path: str | Path) -> dict[str, float] | None:
    """The validation metrics stored in a checkpoint saved right after its validation (``None`` when the
    checkpoint was saved elsewhere, e.g. mid-epoch, or by an older version)."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    metrics = checkpoint.get(MetricLearningModule.VAL_METRICS_KEY)
    return {key: float(value) for key, value in metrics.items()} if metrics else None

