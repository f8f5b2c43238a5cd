"""UPerNet decoder: a pyramid-pooling head on the last feature map plus an FPN over all."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..common import SegmentationOutput, conv_bn_relu, resize
from .ppm import POOL_SCALES, PPM_WIDTH


class UPerNet(nn.Module):
    """PPM on the top features → top-down FPN of width ``fpn_dim`` with lateral 1×1 convs →
    every level upsampled to the finest, concatenated, 3×3 fused → 1×1 classifier.

    Unlike the PPM decoder, each pooled map is upsampled *before* its 1×1 conv (as in CSAIL's
    UPerNet, whose weights this must reproduce). Returns raw logits; no deep supervision.
    """

    def __init__(
        self,
        num_class: int,
        in_channels: tuple[int, ...],
        fpn_dim: int = 512,
        pool_scales: tuple[int, ...] = POOL_SCALES,
    ):
        super().__init__()
        fc_dim = in_channels[-1]
        self.deep_supervision = False
        self.ppm_pooling = nn.ModuleList(nn.AdaptiveAvgPool2d(s) for s in pool_scales)
        self.ppm_conv = nn.ModuleList(conv_bn_relu(fc_dim, PPM_WIDTH, 1) for _ in pool_scales)
        self.ppm_last_conv = conv_bn_relu(fc_dim + len(pool_scales) * PPM_WIDTH, fpn_dim)
        # One lateral and one output conv per level below the top (the top is the PPM output).
        self.fpn_in = nn.ModuleList(conv_bn_relu(c, fpn_dim, 1) for c in in_channels[:-1])
        self.fpn_out = nn.ModuleList(
            nn.Sequential(conv_bn_relu(fpn_dim, fpn_dim)) for _ in in_channels[:-1]
        )
        self.conv_last = nn.Sequential(
            conv_bn_relu(len(in_channels) * fpn_dim, fpn_dim),
            nn.Conv2d(fpn_dim, num_class, 1),
        )

    def forward(self, features: list[Tensor]) -> SegmentationOutput:
        top = features[-1]
        size = top.shape[-2:]
        pooled = [
            conv(resize(pool(top), size)) for pool, conv in zip(self.ppm_pooling, self.ppm_conv)
        ]
        f = self.ppm_last_conv(torch.cat([top, *pooled], 1))

        pyramid = [f]
        # len(self.fpn_in), not len(features): features is one Proxy when torch.fx traces this.
        for i in reversed(range(len(self.fpn_in))):
            lateral = self.fpn_in[i](features[i])
            f = lateral + resize(f, lateral.shape[-2:])
            pyramid.append(self.fpn_out[i](f))
        pyramid.reverse()  # finest first

        finest = pyramid[0].shape[-2:]
        fused = torch.cat([pyramid[0]] + [resize(p, finest) for p in pyramid[1:]], 1)
        return SegmentationOutput(self.conv_last(fused), None)
