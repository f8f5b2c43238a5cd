"""HRNetV2-W48 encoder: four parallel resolutions fused repeatedly, concatenated at stride 4."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..common import resize
from .resnet import BasicBlock, Bottleneck, init_encoder_weights, make_stage

WIDTHS = (48, 96, 192, 384)
# (number of HighResolutionModules, blocks per branch) for stages 2, 3, 4.
STAGES = ((1, 4), (4, 4), (3, 4))


def _conv_bn(
    in_channels: int, out_channels: int, kernel_size: int, stride: int, relu: bool
) -> nn.Sequential:
    layers = [
        nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels),
    ]
    if relu:
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def _fuse_path(source: int, target: int, channels: tuple[int, ...]) -> nn.Module:
    """Module bringing branch ``source`` to branch ``target``'s width (and resolution)."""
    if source == target:
        return nn.Identity()
    if source > target:  # lower resolution: 1×1 projection; upsampled in forward
        return _conv_bn(channels[source], channels[target], 1, 1, relu=False)
    # higher resolution: (target - source) stride-2 3×3 convs, the last one linear
    steps = []
    for k in range(target - source):
        last = k == target - source - 1
        steps.append(
            _conv_bn(
                channels[source],
                channels[target] if last else channels[source],
                3,
                2,
                relu=not last,
            )
        )
    return nn.Sequential(*steps)


class HighResolutionModule(nn.Module):
    """Residual branches per resolution, then every output sums all branches (resampled)."""

    def __init__(self, channels: tuple[int, ...], num_blocks: int):
        super().__init__()
        n = len(channels)
        self.branches = nn.ModuleList(make_stage(BasicBlock, c, c, num_blocks) for c in channels)
        self.fuse_layers = nn.ModuleList(
            nn.ModuleList(_fuse_path(j, i, channels) for j in range(n)) for i in range(n)
        )
        self.fuse_relus = nn.ModuleList(nn.ReLU(inplace=True) for _ in range(n))

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        # Index, don't iterate: xs is a single Proxy when torch.fx traces this module alone.
        xs = [branch(xs[i]) for i, branch in enumerate(self.branches)]
        fused = []
        for i, (paths, relu) in enumerate(zip(self.fuse_layers, self.fuse_relus)):
            size = xs[i].shape[-2:]
            y = paths[0](xs[0])
            for j in range(1, len(xs)):
                z = paths[j](xs[j])
                y = y + (resize(z, size) if j > i else z)
            fused.append(relu(y))
        return fused


def _transition(previous: tuple[int, ...], current: tuple[int, ...]) -> nn.ModuleList:
    """Identity for branches that carry over, a stride-2 conv from the lowest one for a new one.

    (Widths never change between stages in HRNetV2, so carried branches need no conv.)
    """
    layers = []
    for i, width in enumerate(current):
        if i < len(previous):
            layers.append(
                nn.Identity()
                if previous[i] == width
                else _conv_bn(previous[i], width, 3, 1, relu=True)
            )
        else:
            layers.append(nn.Sequential(_conv_bn(previous[-1], width, 3, 2, relu=True)))
    return nn.ModuleList(layers)


class HRNetV2(nn.Module):
    """HRNetV2-W48 (stem to stride 4, a Bottleneck stage, three multi-branch stages).

    ``forward`` returns one feature map: all four branches upsampled to stride 4 and
    concatenated (48 + 96 + 192 + 384 = 720 channels).
    """

    # Keys of ImageNet classification-head modules, absent from the segmentation encoder.
    imagenet_head_prefixes = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(64, 64, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(64)
        self.relu2 = nn.ReLU(inplace=True)
        self.layer1 = make_stage(Bottleneck, 64, 64, 4)

        previous = (64 * Bottleneck.expansion,)
        for index, (num_modules, num_blocks) in enumerate(STAGES, start=2):
            channels = WIDTHS[:index]
            setattr(self, f"transition{index - 1}", _transition(previous, channels))
            setattr(
                self,
                f"stage{index}",
                nn.Sequential(
                    *(HighResolutionModule(channels, num_blocks) for _ in range(num_modules))
                ),
            )
            previous = channels

        self.out_channels = (sum(WIDTHS),)
        self.size_multiple = 32  # the lowest branch runs at stride 32
        init_encoder_weights(self)

    @staticmethod
    def _enter(transition: nn.ModuleList, xs: list[Tensor]) -> list[Tensor]:
        # Carried branches take their own input; the one new branch grows from the lowest.
        # (Counts come from the module, not len(xs): xs may be an fx Proxy.)
        carried = len(transition) - 1
        return [t(xs[i] if i < carried else xs[-1]) for i, t in enumerate(transition)]

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        xs = [self.layer1(x)]
        xs = self.stage2(self._enter(self.transition1, xs))
        xs = self.stage3(self._enter(self.transition2, xs))
        xs = self.stage4(self._enter(self.transition3, xs))
        size = xs[0].shape[-2:]
        upsampled = [xs[0]] + [resize(xs[i], size) for i in range(1, len(WIDTHS))]
        return [torch.cat(upsampled, 1)]


HRNET_ENCODERS = {"hrnetv2": HRNetV2}
