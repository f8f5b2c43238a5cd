"""C1 decoder: one 3×3 conv-BN-ReLU and a 1×1 classifier on the last feature map."""

from __future__ import annotations

from torch import Tensor, nn

from ..common import SegmentationOutput, conv_bn_relu


class C1(nn.Module):
    """``fc_dim`` → ``fc_dim // 4`` → ``num_class``. With ``deep_supervision``, a second such
    head on the stage-3 features (``in_channels[-2]``) gives ``aux_logits`` in training mode.

    Returns raw logits (CSAIL's version applies (log-)softmax inside; here the loss is outside).
    """

    def __init__(
        self, num_class: int, in_channels: tuple[int, ...], deep_supervision: bool = False
    ):
        super().__init__()
        fc_dim = in_channels[-1]
        self.deep_supervision = deep_supervision
        self.cbr = conv_bn_relu(fc_dim, fc_dim // 4)
        self.conv_last = nn.Conv2d(fc_dim // 4, num_class, 1)
        if deep_supervision:
            self.cbr_deepsup = conv_bn_relu(in_channels[-2], fc_dim // 4)
            self.conv_last_deepsup = nn.Conv2d(fc_dim // 4, num_class, 1)

    def forward(self, features: list[Tensor]) -> SegmentationOutput:
        logits = self.conv_last(self.cbr(features[-1]))
        if not (self.deep_supervision and self.training):
            return SegmentationOutput(logits, None)
        aux = self.conv_last_deepsup(self.cbr_deepsup(features[-2]))
        return SegmentationOutput(logits, aux)
