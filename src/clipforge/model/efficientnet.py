"""EfficientNet-Lite0 (Tan & Le 2019; the "Lite" variant for mobile): a 3x3 stem, 16 MBConv blocks (inverted
residual bottlenecks with depthwise convolutions, ReLU6, no squeeze-excitation), a 1x1 head to 1280 channels and
global average pooling. Used as a pretrained image tower: images [B, 3, S, S] -> features [B, 1280].

``pool_blocks`` (config ``vision.pool_blocks``) adds the average-pooled outputs of inner blocks to the head's:
each part is L2-normalised and the parts concatenated, so a projection sees mid-level (shape, stroke) features
as well as ImageNet's object features. For drawings this measurably helps (docs/results/recipes.md).

Convolutions pad as TensorFlow's "SAME" does (the weights were trained that way): stride-1 convolutions pad
symmetrically; stride-2 ones pad one pixel more at the bottom/right when the total is odd.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class Stage(NamedTuple):
    repeats: int
    kernel: int
    stride: int  # of the stage's first block
    expand: int  # expansion ratio of the hidden width
    channels_in: int
    channels_out: int


# EfficientNet-Lite0: width and depth multipliers 1.0, so these are the block counts and widths as built.
LITE0_STAGES = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)
STEM_CHANNELS = 32
FEATURE_CHANNELS = 1280
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # TensorFlow's decay 0.99 in PyTorch's convention
DROP_PATH_RATE = 0.2  # stochastic depth of the last block (scaled linearly from 0 for the first)


class SameConv2d(nn.Conv2d):
    """A bias-free convolution padded like TensorFlow's ``padding='SAME'``: output size ceil(input / stride)."""

    def __init__(
        self, channels_in: int, channels_out: int, kernel: int, stride: int = 1, groups: int = 1
    ) -> None:
        symmetric = (kernel - 1) // 2 if stride == 1 else 0  # stride 1, odd kernel: SAME is symmetric
        super().__init__(
            channels_in, channels_out, kernel, stride, padding=symmetric, groups=groups, bias=False
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride[0] > 1:
            x = F.pad(x, _same_padding(x.shape[-2], x.shape[-1], self.kernel_size[0], self.stride[0]))
        return super().forward(x)


def _same_padding(height: int, width: int, kernel: int, stride: int) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding for TensorFlow's SAME: the extra pixel of an odd total goes last."""

    def split(size: int) -> tuple[int, int]:
        total = max((math.ceil(size / stride) - 1) * stride + kernel - size, 0)
        return total // 2, total - total // 2

    return (*split(width), *split(height))


class ConvBN(nn.Module):
    """SAME convolution, BatchNorm, then ReLU6 unless ``activation=False``."""

    def __init__(
        self,
        channels_in: int,
        channels_out: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        activation: bool = True,
    ) -> None:
        super().__init__()
        self.conv = SameConv2d(channels_in, channels_out, kernel, stride, groups)
        self.bn = nn.BatchNorm2d(channels_out, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu6(x) if self.activation else x


class MBConv(nn.Module):
    """Inverted residual: 1x1 expansion (skipped at ratio 1), depthwise kxk, linear 1x1 projection; a residual
    connection (with stochastic depth in training) when the shape is kept."""

    def __init__(
        self, channels_in: int, channels_out: int, kernel: int, stride: int, expand: int, drop_path: float
    ) -> None:
        super().__init__()
        hidden = channels_in * expand
        self.expand = ConvBN(channels_in, hidden, 1) if expand != 1 else None
        self.depthwise = ConvBN(hidden, hidden, kernel, stride, groups=hidden)
        self.project = ConvBN(hidden, channels_out, 1, activation=False)
        self.residual = stride == 1 and channels_in == channels_out
        self.drop_path = drop_path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else self.expand(x)
        out = self.project(self.depthwise(out))
        if not self.residual:
            return out
        if self.training and self.drop_path > 0:
            keep = 1 - self.drop_path
            mask = torch.empty(x.shape[0], 1, 1, 1, dtype=out.dtype, device=out.device).bernoulli_(keep)
            out = out * mask / keep
        return out + x


class EfficientNetLite(nn.Module):
    """Images [B, 3, S, S] (any S; pretrained at 224) -> pooled features [B, 1280]."""

    def __init__(self, stages: tuple[Stage, ...] = LITE0_STAGES, pool_blocks: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.stem = ConvBN(3, STEM_CHANNELS, 3, stride=2)
        count = sum(stage.repeats for stage in stages)
        blocks = []
        for stage in stages:
            for repeat in range(stage.repeats):
                first = repeat == 0
                blocks.append(
                    MBConv(
                        stage.channels_in if first else stage.channels_out,
                        stage.channels_out,
                        stage.kernel,
                        stage.stride if first else 1,
                        stage.expand,
                        drop_path=DROP_PATH_RATE * len(blocks) / count,
                    )
                )
        self.blocks = nn.ModuleList(blocks)
        if any(not 0 <= index < len(blocks) for index in pool_blocks) or len(set(pool_blocks)) != len(
            pool_blocks
        ):
            raise ValueError(f"pool_blocks {pool_blocks}: distinct block indices in 0..{len(blocks) - 1}")
        self.pool_blocks = tuple(sorted(pool_blocks))
        self._pool_widths = [blocks[index].project.conv.out_channels for index in self.pool_blocks]
        self.head = ConvBN(stages[-1].channels_out, FEATURE_CHANNELS, 1)
        self.grad_checkpointing = False
        self.init_weights()

    @property
    def width(self) -> int:
        return FEATURE_CHANNELS + sum(self._pool_widths)

    def init_weights(self) -> None:
        """He-normal convolutions (fan-out), unit BatchNorms; pretrained weights replace it."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def units(self) -> list[nn.Module]:
        """The network's parts from input to output (what ``unlocked_layers`` counts from the top)."""
        return [self.stem, *self.blocks, self.head]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # Default (contiguous) memory format: channels-last was measured 0-16% faster on this CPU but changes the
        # float32 rounding (2e-5 from the reference at 64 px); contiguous matches the reference bit for bit.
        x = self.stem(images)
        pooled = []
        for index, block in enumerate(self.blocks):
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
            if index in self.pool_blocks:
                pooled.append(x.mean(dim=(2, 3)))
        features = self.head(x).mean(dim=(2, 3))
        if not pooled:
            return features
        return torch.cat([F.normalize(part, dim=-1) for part in (features, *pooled)], dim=-1)
