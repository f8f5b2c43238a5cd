"""Encoder registry: architecture name → constructor (no arguments) of an nn.Module whose
``forward`` returns a list of feature maps and which has ``out_channels`` (one width per map),
``size_multiple`` (input sizes must be multiples of it) and ``imagenet_head_prefixes``."""

from .hrnet import HRNET_ENCODERS, HRNetV2
from .mobilenet import MOBILENET_ENCODERS, MobileNetV2Dilated
from .resnet import RESNET_ENCODERS, DeepStemResNet

ENCODERS = {**MOBILENET_ENCODERS, **RESNET_ENCODERS, **HRNET_ENCODERS}

__all__ = ["ENCODERS", "DeepStemResNet", "HRNetV2", "MobileNetV2Dilated"]
