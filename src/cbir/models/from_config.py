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
    from cbir.zoo import is_zoo_name

    head = instantiate(model_cfg["head"]) if model_cfg.get("head") else None
    embedder = build_embedder(model_cfg["backbone"], pretrained="none" if is_zoo_name(pretrained) else pretrained,
                              image_size=model_cfg["image_size"], head=head,
                              freeze_stages=model_cfg.get("freeze_stages", 0),
                              bn_frozen=model_cfg.get("bn_frozen", False), pooling=model_cfg.get("pooling", "gem"),
                              scales=model_cfg.get("scales"), scale_power=model_cfg.get("scale_power", 1.0))
    if is_zoo_name(pretrained):
        load_zoo_weights(embedder, str(pretrained), model_cfg["backbone"])
    return embedder


def load_zoo_weights(embedder: nn.Module, spec: str, backbone: str) -> None:
    """Start from a zoo model (``model.pretrained=zoo:<name>``): its whole trunk, and its head where this
    config's head has the same parameters (another head or dimension starts fresh: said in the log)."""
    import logging

    from cbir.errors import ConfigError
    from cbir.zoo import zoo_entry, zoo_weights

    entry = zoo_entry(spec)
    if entry.get("backbone") != backbone:
        raise ConfigError(f"model.pretrained={spec} is a {entry.get('backbone')} model; use model={entry.get('backbone')} "
                          f"(this config builds {backbone})")
    state = zoo_weights(spec)
    own = embedder.state_dict()
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    trunk = [k for k in own if k.startswith("backbone.")]
    missing = [k for k in trunk if k not in fitting]
    if missing:
        raise ConfigError(f"model.pretrained={spec}: its trunk does not fit this model ({len(missing)} tensors differ, "
                          f"first {missing[0]})")
    embedder.load_state_dict(fitting, strict=False)
    fresh = [k for k in own if k not in fitting]
    logging.getLogger(__name__).info("model.pretrained=%s: %d tensors loaded%s", spec, len(fitting),
                                     f"; {len(fresh)} head tensors start fresh (another head)" if fresh else "")
