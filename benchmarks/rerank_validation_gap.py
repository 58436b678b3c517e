"""Does validation see what helps re-ranking on the test classes? (issue 17)

Options are chosen on the validation split (held-out classes of the training half), then scored once on test.
That only works if an option that helps on test also helps on validation. This script scores, on both splits
of one trained model and on the same first ``--candidates`` hits of each query:

- **local matching** (training-free): ``cosine + w * chamfer``, where chamfer is the mean best-match cosine of
  one image's pooled trunk cells in the other's, both ways (the re-ranker's cells, 4 x 4 per stage, without its
  learned projection) — for each of the last two stages and both;
- **hand-crafted fusion**: ``cosine + w * hand-crafted cosine`` (the colour / LBP / HOG baseline of
  ``model=handcrafted`` at the model's input size) over the whole gallery;
- the **ceiling**: the first hits in the right order (an upper bound, :func:`cbir.evaluation.metrics.perfect_reorder`).

It prints MAP@R on validation and test for each weight and writes JSON. Where the two splits move in opposite
directions, no choice made on validation can find the test gain.

    python benchmarks/rerank_validation_gap.py --ckpt outputs/train/<run> \\
        --out benchmarks/results/rerank_validation_gap_emoji.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0)


def split_features(ckpt: str, num_workers: int) -> dict[str, dict[str, torch.Tensor | list[torch.Tensor]]]:
    """Per split (val, test): L2-normalised embeddings, pooled cells of the last two trunk stages, labels, and
    the hand-crafted descriptors of the same images."""
    from omegaconf import OmegaConf

    from cbir.models.checkpoint import load_embedder_checkpoint, resolve_checkpoint, run_config
    from cbir.models.handcrafted import build_handcrafted_embedder
    from cbir.models.pairwise import PairwiseReranker, default_stages
    from cbir.training import factory
    from cbir.training.reranker import extract_features

    checkpoint = resolve_checkpoint(ckpt)
    embedder = load_embedder_checkpoint(checkpoint)
    config = run_config(checkpoint)
    if config is None:
        raise SystemExit(f"{checkpoint}: not inside a training run folder (its config.yaml names the data)")
    cfg = OmegaConf.create(config)
    cfg.data.num_workers = num_workers
    channels = embedder.backbone.channels
    pooler = PairwiseReranker({s: channels[s] for s in default_stages(channels)})  # only its fixed pooling is used
    handcrafted = build_handcrafted_embedder(int(cfg.data.image_size))
    catalog = factory.build_catalog(cfg.data)
    modules = {name: factory.build_datamodule(cfg, catalog, model)
               for name, model in (("model", embedder), ("handcrafted", handcrafted))}
    for module in modules.values():
        module.setup("fit")
    out = {}
    for split in ("val", "test"):
        loader = modules["model"].val_dataloader() if split == "val" else modules["model"].test_dataloader()
        features = extract_features(embedder, pooler, loader, f"{split}: embedding")
        hand = modules["handcrafted"]
        loader = hand.val_dataloader() if split == "val" else hand.test_dataloader()
        descriptors, labels = [], []
        with torch.no_grad():
            for batch in loader:
                descriptors.append(handcrafted(batch["image"]))
                labels.append(torch.as_tensor(batch["label"]))
        if not torch.equal(torch.cat(labels), features.labels):
            raise SystemExit(f"{split}: the two passes saw the images in different orders")
        out[split] = {"embeddings": features.embeddings, "labels": features.labels,
                      "cells": [F.normalize(p.float(), dim=-1) for p in features.pooled],
                      "handcrafted": F.normalize(torch.cat(descriptors).float(), dim=1),
                      "stages": list(pooler.stages)}
    return out


def chamfer_reorder(cells: list[torch.Tensor], weight: float, depth: int):
    """A ``reorder`` for :func:`retrieval_metrics`: the first ``depth`` hits by ``cosine + weight * chamfer``."""
    from cbir.evaluation.metrics import sort_first_hits
    from cbir.models.pairwise import mutual_best_match

    def reorder(sims: torch.Tensor, ranked: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        top = ranked[:, :depth]
        cosine = sims.gather(1, top)
        local = torch.zeros_like(cosine)
        for stage in cells:
            local += mutual_best_match(stage[rows], stage[top]) / len(cells)
        score = torch.where(torch.isfinite(cosine), cosine + weight * local, cosine)  # -inf: the query itself
        return sort_first_hits(ranked, score)

    return reorder


def map_at_r(features: dict, *, chamfer: list[int] | None = None, handcrafted: float = 0.0, weight: float = 0.0,
             ceiling: bool = False, depth: int = 20) -> float:
    """All-vs-all MAP@R (%) of one split under one option."""
    from cbir.evaluation.metrics import perfect_reorder, retrieval_metrics

    embeddings, labels = features["embeddings"].float(), features["labels"]
    ids = torch.arange(len(labels))
    if handcrafted:  # inner product of [e, sqrt(w) h] = cosine + w * hand-crafted cosine
        embeddings = torch.cat([embeddings, handcrafted ** 0.5 * features["handcrafted"]], dim=1)
    reorder = None
    if ceiling:
        reorder = perfect_reorder(labels, labels, depth)
    elif chamfer is not None and weight:
        reorder = chamfer_reorder([features["cells"][i] for i in chamfer], weight, depth)
    metrics = retrieval_metrics(embeddings, labels, embeddings, labels, query_ids=ids, gallery_ids=ids,
                                reorder=reorder, min_depth=depth if reorder else 0)
    return 100 * metrics["map_at_r"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="a training checkpoint or run folder (emoji-like data with val)")
    parser.add_argument("--candidates", type=int, default=20, help="first hits re-ordered")
    parser.add_argument("--weights", type=float, nargs="+", default=list(WEIGHTS))
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rerank_validation_gap.json")
    args = parser.parse_args()
    from cbir.evaluation.report import write_json

    features = split_features(args.ckpt, args.num_workers)
    stages = features["val"]["stages"]
    options = {f"local matching, {stages[0]}": [0], f"local matching, {stages[1]}": [1],
               "local matching, both stages": [0, 1]}
    rows: dict[str, dict[str, float]] = {}
    plain = {split: map_at_r(features[split]) for split in ("val", "test")}
    rows["plain k-NN"] = plain
    for name, chosen in options.items():
        for weight in args.weights:
            if weight:
                rows[f"{name}, w={weight:g}"] = {s: map_at_r(features[s], chamfer=chosen, weight=weight,
                                                             depth=args.candidates) for s in ("val", "test")}
    for weight in args.weights:
        if weight:
            rows[f"hand-crafted fusion, w={weight:g}"] = {s: map_at_r(features[s], handcrafted=weight)
                                                          for s in ("val", "test")}
    rows[f"ceiling (first {args.candidates} in the right order)"] = {
        s: map_at_r(features[s], ceiling=True, depth=args.candidates) for s in ("val", "test")}
    print(f"\nMAP@R (%) of {args.ckpt}, all-vs-all, first {args.candidates} hits re-ordered:\n")
    print("| option | val | Δ val | test | Δ test |\n|---|---|---|---|---|")
    for name, row in rows.items():
        print(f"| {name} | {row['val']:.2f} | {row['val'] - plain['val']:+.2f} | {row['test']:.2f} | "
              f"{row['test'] - plain['test']:+.2f} |")
    write_json(args.out, {"benchmark": "rerank_validation_gap", "ckpt": str(args.ckpt),
                          "candidates": args.candidates, "rows": rows, "command": " ".join(sys.argv)})


if __name__ == "__main__":
    main()
