"""Building blocks shared by the encoders and decoders, and the name registries' lookup."""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple, TypeVar

import torch
from torch import Tensor, nn

T = TypeVar("T")


class SegmentationOutput(NamedTuple):
    """What a decoder returns, and what a SegmentationModel returns in training mode.

    ``logits``: raw class scores (N, num_class, h, w) at feature resolution (no softmax: the
    loss lives outside the model). ``aux_logits``: deep-supervision scores from the stage-3
    features, same shape, or None for decoders without deep supervision (and in eval mode).
    """

    logits: Tensor
    aux_logits: Tensor | None = None


def lookup(registry: Mapping[str, T], name: str, kind: str) -> T:
    """``registry[name.lower()]``, or a ValueError listing the valid names."""
    if not isinstance(name, str) or name.lower() not in registry:
        valid = ", ".join(sorted(registry))
        raise ValueError(f"unknown {kind} architecture {name!r}; valid names: {valid}")
    return registry[name.lower()]


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Sequential:
    """Conv (no bias) → BatchNorm → ReLU as a Sequential, so the keys are ``0.*`` and ``1.*``."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    )


def dilate_(module: nn.Module, dilation: int) -> nn.Module:
    """Trade a stage's stride 2 for dilation, in place (output stride stays the stage input's).

    The convolution that used to downsample keeps half the dilation (it saw the denser grid
    before); every other 3×3 convolution gets the full ``dilation``. This is how the CSAIL
    ``*dilated`` encoders are derived from their ImageNet networks, so pretrained weights apply.
    """
    for conv in module.modules():
        if not isinstance(conv, nn.Conv2d):
            continue
        is_3x3 = conv.kernel_size == (3, 3)
        if conv.stride == (2, 2):
            conv.stride = (1, 1)
            if is_3x3:
                conv.dilation = conv.padding = (dilation // 2, dilation // 2)
        elif is_3x3:
            conv.dilation = conv.padding = (dilation, dilation)
    return module


def resize(x: Tensor, size) -> Tensor:
    """Bilinear resize with align_corners=False, as every CSAIL model does."""
    return nn.functional.interpolate(x, size=size, mode="bilinear", align_corners=False)


def init_decoder_weights(module: nn.Module) -> None:
    """CSAIL's decoder initialisation: Kaiming-normal convolutions, BN weight 1 and bias 1e-4."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            with torch.no_grad():
                m.weight.fill_(1.0)
                m.bias.fill_(1e-4)
