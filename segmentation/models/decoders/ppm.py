"""PPM decoder: pyramid pooling (scales 1, 2, 3, 6) on the last feature map, as in PSPNet."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..common import SegmentationOutput, conv_bn_relu, resize

POOL_SCALES = (1, 2, 3, 6)
PPM_WIDTH = 512
DROPOUT = 0.1


def pooling_branch(scale: int, in_channels: int) -> nn.Sequential:
    """Adaptive average pool to ``scale``×``scale`` → 1×1 conv-BN-ReLU to 512 channels."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(scale), *conv_bn_relu(in_channels, PPM_WIDTH, 1))


class PPM(nn.Module):
    """Pyramid pooling → concat with the input → 3×3 conv-BN-ReLU (512) → dropout → classifier.

    With ``deep_supervision``, a C1-style head (with dropout) on the stage-3 features gives
    ``aux_logits`` in training mode. Returns raw logits; the loss lives outside the model.
    """

    def __init__(
        self,
        num_class: int,
        in_channels: tuple[int, ...],
        deep_supervision: bool = False,
        pool_scales: tuple[int, ...] = POOL_SCALES,
    ):
        super().__init__()
        fc_dim = in_channels[-1]
        self.deep_supervision = deep_supervision
        self.ppm = nn.ModuleList(pooling_branch(s, fc_dim) for s in pool_scales)
        self.conv_last = nn.Sequential(
            *conv_bn_relu(fc_dim + len(pool_scales) * PPM_WIDTH, PPM_WIDTH),
            nn.Dropout2d(DROPOUT),
            nn.Conv2d(PPM_WIDTH, num_class, 1),
        )
        if deep_supervision:
            self.cbr_deepsup = conv_bn_relu(in_channels[-2], fc_dim // 4)
            self.dropout_deepsup = nn.Dropout2d(DROPOUT)
            self.conv_last_deepsup = nn.Conv2d(fc_dim // 4, num_class, 1)

    def forward(self, features: list[Tensor]) -> SegmentationOutput:
        x = features[-1]
        size = x.shape[-2:]
        pyramid = [x] + [resize(branch(x), size) for branch in self.ppm]
        logits = self.conv_last(torch.cat(pyramid, 1))
        if not (self.deep_supervision and self.training):
            return SegmentationOutput(logits, None)
        aux = self.cbr_deepsup(features[-2])
        aux = self.conv_last_deepsup(self.dropout_deepsup(aux))
        return SegmentationOutput(logits, aux)
