"""MobileNetV2 encoder with output stride 8 (CSAIL's ``mobilenetv2dilated``)."""

from __future__ import annotations

from torch import Tensor, nn

from ..common import dilate_
from .resnet import init_encoder_weights

# (expansion t, output channels c, repeats n, first stride s) of MobileNetV2 (width 1.0).
_INVERTED_RESIDUAL_SETTING = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _conv_bn_relu6(
    in_channels: int, out_channels: int, kernel_size: int, stride: int = 1, groups: int = 1
) -> list[nn.Module]:
    conv = nn.Conv2d(
        in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False
    )
    # ReLU6, not ReLU: it is what the ImageNet MobileNetV2 weights were trained with.
    return [conv, nn.BatchNorm2d(out_channels), nn.ReLU6(inplace=True)]


class InvertedResidual(nn.Module):
    """1×1 expand (skipped when t=1) → 3×3 depthwise → linear 1×1 project, residual if shapes
    allow. All layers live in one Sequential ``conv`` so the keys are ``conv.<i>.*``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, expansion: int):
        super().__init__()
        hidden = round(in_channels * expansion)
        # Decided at construction: dilation later removes strides but never adds a residual.
        self.use_residual = stride == 1 and in_channels == out_channels
        layers = [] if expansion == 1 else _conv_bn_relu6(in_channels, hidden, 1)
        layers += _conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden)
        layers += [nn.Conv2d(hidden, out_channels, 1, bias=False), nn.BatchNorm2d(out_channels)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        if self.use_residual:  # a constant per module, so fx tracing is unaffected
            return x + self.conv(x)
        return self.conv(x)


class MobileNetV2Dilated(nn.Module):
    """The 18 feature layers of MobileNetV2 (its final 1×1 to 1280 dropped), output stride 8.

    ``forward`` returns the outputs of features 2, 4, 7, 14 and 17 (24, 32, 64, 160, 320
    channels), as CSAIL's encoder does; the decoders use the last and, for deep supervision,
    the second-to-last.
    """

    imagenet_head_prefixes = ("features.18.", "classifier.")
    _taps = (2, 4, 7, 14, 17)

    def __init__(self):
        super().__init__()
        layers = [nn.Sequential(*_conv_bn_relu6(3, 32, 3, stride=2))]
        in_channels = 32
        for t, c, n, s in _INVERTED_RESIDUAL_SETTING:
            for i in range(n):
                layers.append(InvertedResidual(in_channels, c, s if i == 0 else 1, t))
                in_channels = c
        self.features = nn.Sequential(*layers)
        for i in range(7, 14):  # the 64- and 96-channel groups: stride 16 → dilation 2
            dilate_(self.features[i], 2)
        for i in range(14, 18):  # the 160- and 320-channel groups: stride 32 → dilation 4
            dilate_(self.features[i], 4)
        self.out_channels = tuple(self.features[i].conv[-1].num_features for i in self._taps)
        self.size_multiple = 8
        init_encoder_weights(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        outputs = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self._taps:
                outputs.append(x)
        return outputs


MOBILENET_ENCODERS = {"mobilenetv2dilated": MobileNetV2Dilated}
