"""Vision Transformer trunks (DINOv2 layout) exposing the same stage interface as the CNN backbones.

The transformer is written out here (about sixty lines) rather than taken from timm because its
positional-embedding interpolation must match the reference the weights were exported with (DINOv2 /
Hugging Face: bicubic, ``align_corners=False``, no antialiasing), which timm's resampling does not (it
antialiases); a different interpolation moves every feature at any input size but the training one.

Stages: the blocks are split into four equal groups, ``block3 block6 block9 block12`` on a 12-block ViT,
each returning its patch tokens as a ``C x h x w`` map after the final LayerNorm, so the GeM, fusion and
DOLG heads, ``model.freeze_stages`` and ``train.tune=last:N`` work as on a CNN. ``pooling`` says what the
last stage is: ``gem`` the last block's patch-token map (the head pools it), ``cls`` the CLS token (a
``1 x 1`` map, so every head takes it as a pooled vector), ``both`` the CLS token concatenated with the
mean patch token (DINOv2's linear-probe descriptor, ``2C`` wide).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cbir.errors import ConfigError
from cbir.models.backbones import resolve_frozen_stages

POOLINGS = ("gem", "cls", "both")
POOLED_STAGE = {"cls": "cls", "both": "cls_mean"}


@dataclass(frozen=True)
class ViTSpec:
    """The shape of a ViT: width, depth, heads, patch size and the patch grid its position table covers."""

    dim: int
    depth: int
    heads: int
    patch: int
    grid: int  # the position table holds grid x grid patches (+1 for CLS)
    stages: int = 4  # block groups exposed as stages
    mlp_ratio: float = 4.0


VIT_SPECS: dict[str, ViTSpec] = {
    "dinov2_vits14": ViTSpec(dim=384, depth=12, heads=6, patch=14, grid=37),
}


def vit_spec(name: str) -> ViTSpec | None:
    return VIT_SPECS.get(name)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block with layer scale (DINOv2)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.ls1 = LayerScale(dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
    """DINOv2-style ViT: patch embedding, CLS token, learned positions (interpolated to the input's patch
    grid), pre-norm blocks, final LayerNorm. ``forward_tokens`` returns the normalised tokens after the
    requested blocks."""

    def __init__(self, spec: ViTSpec) -> None:
        super().__init__()
        self.spec = spec
        self.patch_embed = nn.Conv2d(3, spec.dim, spec.patch, stride=spec.patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, spec.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + spec.grid * spec.grid, spec.dim))
        self.blocks = nn.ModuleList(Block(spec.dim, spec.heads, spec.mlp_ratio) for _ in range(spec.depth))
        self.norm = nn.LayerNorm(spec.dim, eps=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    def position_table(self, height: int, width: int) -> torch.Tensor:
        """Positions for a ``height x width`` patch grid: the stored table, resized bicubically (no
        antialiasing, as DINOv2 and its Hugging Face port do) when the grid differs."""
        cls_pos, patch_pos = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        grid = self.spec.grid
        if (height, width) == (grid, grid):
            return self.pos_embed
        table = patch_pos.reshape(1, grid, grid, -1).permute(0, 3, 1, 2).float()
        table = F.interpolate(table, size=(height, width), mode="bicubic", align_corners=False, antialias=False)
        table = table.to(patch_pos.dtype).permute(0, 2, 3, 1).reshape(1, height * width, -1)
        return torch.cat([cls_pos, table], dim=1)

    def forward_tokens(self, images: torch.Tensor, blocks: Sequence[int],
                       normalise: bool = True) -> tuple[list[torch.Tensor], tuple[int, int]]:
        """Tokens (``B x (1 + h*w) x C``, CLS first) after each block index in ``blocks`` (0-based), through
        the final LayerNorm unless ``normalise`` is false (the raw residual stream), and the patch grid ``(h, w)``."""
        patches = self.patch_embed(images)
        height, width = patches.shape[-2:]
        x = patches.flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        x = x + self.position_table(height, width)
        wanted, outputs = set(blocks), []
        for index, block in enumerate(self.blocks):
            x = block(x)
            if index in wanted:
                outputs.append(self.norm(x) if normalise else x)
        return outputs, (int(height), int(width))


class ViTBackbone(nn.Module):
    """A ViT as a trunk: ``{stage: map}`` like :class:`~cbir.models.backbones.Backbone`, with the same
    ``channels``, ``stage_parameters``, ``freeze_stages`` and ``train`` behaviour (``bn_frozen`` has nothing
    to act on: a ViT has no BatchNorm)."""

    def __init__(self, name: str, model: VisionTransformer | None = None, freeze_stages: int | str = 0,
                 bn_frozen: bool = False, pooling: str = "gem") -> None:
        super().__init__()
        spec = model.spec if model is not None else VIT_SPECS[name]
        if pooling not in POOLINGS:
            raise ConfigError(f"model.pooling={pooling!r}: choose one of {', '.join(POOLINGS)}")
        if spec.depth % spec.stages:
            raise ConfigError(f"{name}: {spec.depth} blocks do not split into {spec.stages} stages")
        self.name, self.pooling = name, pooling
        self.body = model if model is not None else VisionTransformer(spec)
        per_stage = spec.depth // spec.stages
        self.stage_blocks = {f"block{(i + 1) * per_stage}": (i + 1) * per_stage - 1 for i in range(spec.stages)}
        self.channels = {stage: spec.dim for stage in self.stage_blocks}
        if pooling != "gem":
            self.channels[POOLED_STAGE[pooling]] = spec.dim * (2 if pooling == "both" else 1)
        self.frozen_stages = resolve_frozen_stages(freeze_stages, list(self.stage_blocks))
        self.bn_frozen = bool(bn_frozen)
        for stage, params in self.stage_parameters().items():
            if stage in self.frozen_stages:
                for p in params:
                    p.requires_grad_(False)

    def stage_parameters(self) -> dict[str, list[nn.Parameter]]:
        """Parameters of each stage: the embeddings join the first stage, the final LayerNorm the last."""
        body, per_stage = self.body, self.body.spec.depth // self.body.spec.stages
        stages = list(self.stage_blocks)
        groups = {stage: [p for block in body.blocks[i * per_stage:(i + 1) * per_stage] for p in block.parameters()]
                  for i, stage in enumerate(stages)}
        groups[stages[0]] = [*body.patch_embed.parameters(), body.cls_token, body.pos_embed, *groups[stages[0]]]
        groups[stages[-1]] += list(body.norm.parameters())
        return groups

    def block_parameters(self) -> list[list[nn.Parameter]]:
        """Parameters by depth, shallow first: embeddings, each block, final norm (for layer-wise lr decay)."""
        body = self.body
        return [[*body.patch_embed.parameters(), body.cls_token, body.pos_embed],
                *[list(block.parameters()) for block in body.blocks], list(body.norm.parameters())]

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        tokens, (height, width) = self.body.forward_tokens(images, list(self.stage_blocks.values()))
        features = {stage: _patch_map(t, height, width) for stage, t in zip(self.stage_blocks, tokens, strict=True)}
        last = tokens[-1]
        if self.pooling == "cls":
            features["cls"] = last[:, 0, :, None, None]
        elif self.pooling == "both":
            features["cls_mean"] = torch.cat([last[:, 0], last[:, 1:].mean(dim=1)], dim=1)[:, :, None, None]
        return features


def _patch_map(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Patch tokens (CLS dropped) as a ``B x C x h x w`` map."""
    return tokens[:, 1:].transpose(1, 2).reshape(tokens.shape[0], tokens.shape[-1], height, width)
