"""Deep-stem ResNet encoders of the CSAIL scene-parsing models (plain and dilated)."""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from ..common import conv3x3, dilate_


def init_encoder_weights(module: nn.Module) -> None:
    """He-normal (fan-out) convolutions, unit-gain zero-bias BatchNorm, as the ImageNet nets."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def _downsample(in_channels: int, out_channels: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
        nn.BatchNorm2d(out_channels),
    )


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with an identity (or projected) shortcut."""

    expansion = 1

    def __init__(
        self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        # Identity keeps forward free of None checks and adds no state_dict keys.
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.relu2 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu2(out + self.downsample(x))


class Bottleneck(nn.Module):
    """1×1 reduce → 3×3 (carries the stride) → 1×1 expand ×4, with a shortcut."""

    expansion = 4

    def __init__(
        self, in_channels: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample if downsample is not None else nn.Identity()
        self.relu3 = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu3(out + self.downsample(x))


def make_stage(
    block: type[BasicBlock | Bottleneck],
    in_channels: int,
    planes: int,
    num_blocks: int,
    stride: int = 1,
) -> nn.Sequential:
    """``num_blocks`` blocks; the first one changes width/resolution (with a projection)."""
    out_channels = planes * block.expansion
    downsample = None
    if stride != 1 or in_channels != out_channels:
        downsample = _downsample(in_channels, out_channels, stride)
    blocks = [block(in_channels, planes, stride, downsample)]
    blocks += [block(out_channels, planes) for _ in range(num_blocks - 1)]
    return nn.Sequential(*blocks)


class DeepStemResNet(nn.Module):
    """ResNet with a three-convolution stem (3→64/2, 64→64, 64→128) and no classifier.

    ``forward`` returns the four stage outputs [layer1, layer2, layer3, layer4] (strides 4, 8,
    16, 32, or 4, 8, 8, 8 when ``dilated``: layer3 at dilation 2, layer4 at dilation 4).
    """

    # Keys in CSAIL's ImageNet weight files that belong to the dropped classifier.
    imagenet_head_prefixes = ("fc.",)

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        depths: tuple[int, int, int, int],
        dilated: bool = False,
    ):
        super().__init__()
        self.conv1 = conv3x3(3, 64, stride=2)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(64, 64)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv3 = conv3x3(64, 128)
        self.bn3 = nn.BatchNorm2d(128)
        self.relu3 = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        widths = (64, 128, 256, 512)
        in_channels = 128
        stages = []
        for i, (planes, depth) in enumerate(zip(widths, depths)):
            stages.append(make_stage(block, in_channels, planes, depth, stride=1 if i == 0 else 2))
            in_channels = planes * block.expansion
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        if dilated:
            dilate_(self.layer3, 2)
            dilate_(self.layer4, 4)

        self.out_channels = tuple(w * block.expansion for w in widths)
        # CSAIL pads inputs to the total stride (8 dilated, 32 plain) so feature maps align.
        self.size_multiple = 8 if dilated else 32
        init_encoder_weights(self)

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        x = self.maxpool(x)
        c2 = self.layer1(x)
        c3 = self.layer2(c2)
        c4 = self.layer3(c3)
        c5 = self.layer4(c4)
        return [c2, c3, c4, c5]


RESNET_ENCODERS = {
    "resnet18": partial(DeepStemResNet, BasicBlock, (2, 2, 2, 2)),
    "resnet18dilated": partial(DeepStemResNet, BasicBlock, (2, 2, 2, 2), dilated=True),
    "resnet50": partial(DeepStemResNet, Bottleneck, (3, 4, 6, 3)),
    "resnet50dilated": partial(DeepStemResNet, Bottleneck, (3, 4, 6, 3), dilated=True),
    "resnet101": partial(DeepStemResNet, Bottleneck, (3, 4, 23, 3)),
    "resnet101dilated": partial(DeepStemResNet, Bottleneck, (3, 4, 23, 3), dilated=True),
}
