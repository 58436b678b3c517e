"""WiSE-FT (Wortsman et al., 2022): the exported trunk is ``alpha * fine-tuned + (1 - alpha) * pretrained``,
a weight-space average that keeps much of what the pretrained trunk knew (its accuracy on other domains)
for a small cost in-domain. Only the trunk is averaged: the head was trained from scratch and has no
pretrained counterpart. BatchNorm running statistics are averaged like the weights; integer buffers
(``num_batches_tracked``) are kept from the fine-tuned model."""

from __future__ import annotations

import torch
from torch import nn

from cbir.errors import ConfigError

TRUNK_PREFIX = "backbone."


def interpolate_trunk(fine_tuned: nn.Module, pretrained: nn.Module, alpha: float) -> dict[str, int]:
    """Set ``fine_tuned``'s trunk to ``alpha * fine_tuned + (1 - alpha) * pretrained`` in place (both are
    Embedders of the same architecture); returns how many tensors were averaged and kept."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"export.wise_alpha={alpha}: must lie in [0, 1] (1 = the fine-tuned trunk as trained)")
    mine, theirs = fine_tuned.state_dict(), pretrained.state_dict()
    trunk = [key for key in mine if key.startswith(TRUNK_PREFIX)]
    missing = [key for key in trunk if key not in theirs or theirs[key].shape != mine[key].shape]
    if not trunk or missing:
        raise ConfigError("export.wise_alpha: the pretrained model does not match the fine-tuned trunk "
                          f"({len(missing)} of {len(trunk)} tensors differ, e.g. {missing[:1]})")
    averaged, kept = 0, 0
    with torch.no_grad():
        for key in trunk:
            if mine[key].is_floating_point():
                mine[key].mul_(float(alpha)).add_(theirs[key].to(mine[key].dtype), alpha=1.0 - float(alpha))
                averaged += 1
            else:
                kept += 1
    return {"averaged": averaged, "kept": kept}
