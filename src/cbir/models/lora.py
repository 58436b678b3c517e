"""LoRA (Hu et al., 2021) on a ViT trunk, with PyPI ``peft``: low-rank adapters on every block's attention
(``qkv``, ``proj``) and MLP (``fc1``, ``fc2``) while the pretrained weights stay frozen, so the trunk keeps
what it knew and only ``rank x (in + out)`` numbers per layer learn (``train.tune=lora``).

Only training needs ``peft``: a checkpoint's adapters are merged into plain weights when it is loaded
(:func:`merge_lora_state`, ``W + (alpha / rank) · B A``), so evaluation, export and search rebuild a plain
module and a bundle never holds an adapter.
"""

from __future__ import annotations

import torch
from torch import nn

from cbir.errors import CheckpointError, ConfigError

TARGET_MODULES = ("qkv", "proj", "fc1", "fc2")
ADAPTER = "default"


def add_lora(trunk: nn.Module, rank: int, alpha: float) -> nn.Module:
    """Wrap the ViT's block linears with LoRA adapters in place; every other trunk weight is frozen."""
    if int(rank) < 1 or float(alpha) <= 0:
        raise ConfigError(f"train.lora_rank={rank} / train.lora_alpha={alpha}: rank must be >= 1 and alpha > 0")
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise ConfigError("train.tune=lora needs the peft package: pip install 'cbir[lora]'") from None
    config = LoraConfig(r=int(rank), lora_alpha=float(alpha), lora_dropout=0.0, target_modules=list(TARGET_MODULES))
    return inject_adapter_in_model(config, trunk, adapter_name=ADAPTER)


def merge_lora_state(state: dict[str, torch.Tensor], rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """A state dict with LoRA-wrapped layers (``X.base_layer.weight``, ``X.lora_A.default.weight``,
    ``X.lora_B.default.weight``) as the plain layers' state dict (``X.weight = base + alpha/rank · B @ A``)."""
    scaling = float(alpha) / int(rank)
    merged: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            continue
        if ".base_layer." not in key:
            merged[key] = value
            continue
        layer, _, name = key.partition(".base_layer.")
        if name != "weight":
            merged[f"{layer}.{name}"] = value
            continue
        try:
            down = state[f"{layer}.lora_A.{ADAPTER}.weight"]
            up = state[f"{layer}.lora_B.{ADAPTER}.weight"]
        except KeyError as missing:
            raise CheckpointError(f"LoRA layer {layer} has no adapter weight {missing}") from None
        merged[f"{layer}.weight"] = value + scaling * (up.float() @ down.float()).to(value.dtype)
    return merged
