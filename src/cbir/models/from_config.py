"""Rebuild a model from the plain dict a checkpoint or a bundle stores (``model.json``).

Kept apart from :mod:`cbir.training.factory` so that loading a bundle for search or serving imports neither
Lightning, Hydra nor the training code."""

from __future__ import annotations

from torch import nn

HANDCRAFTED = "handcrafted"  # the model.backbone value of the hand-crafted descriptor baseline


def embedder_from_model_config(model_cfg: dict, pretrained: str | None) -> nn.Module:
    """An :class:`~cbir.models.embedder.Embedder` (or the hand-crafted descriptor) from ``model_cfg``:
    backbone, image_size, head (a Hydra ``_target_`` dict, ``_partial_``), freezing and inference scales."""
    if model_cfg["backbone"] == HANDCRAFTED:  # nothing pretrained: the descriptor is fixed
        from cbir.models.handcrafted import build_handcrafted_embedder

        return build_handcrafted_embedder(model_cfg["image_size"], **(model_cfg.get("descriptor") or {}))
    from cbir.configs import instantiate
    from cbir.models.embedder import build_embedder

    head = instantiate(model_cfg["head"]) if model_cfg.get("head") else None
    return build_embedder(model_cfg["backbone"], pretrained=pretrained, image_size=model_cfg["image_size"],
                          head=head, freeze_stages=model_cfg.get("freeze_stages", 0),
                          bn_frozen=model_cfg.get("bn_frozen", False), pooling=model_cfg.get("pooling", "gem"),
                          scales=model_cfg.get("scales"),
                          scale_power=model_cfg.get("scale_power", 1.0))
