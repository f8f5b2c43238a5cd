"""Decoder registry: architecture name → constructor ``(num_class, in_channels)`` where
``in_channels`` lists the encoder's feature widths (the last one is ``fc_dim``)."""

from functools import partial

from .c1 import C1
from .ppm import PPM
from .upernet import UPerNet

DECODERS = {
    "c1": partial(C1, deep_supervision=False),
    "c1_deepsup": partial(C1, deep_supervision=True),
    "ppm": partial(PPM, deep_supervision=False),
    "ppm_deepsup": partial(PPM, deep_supervision=True),
    "upernet": partial(UPerNet, fpn_dim=512),
    "upernet_lite": partial(UPerNet, fpn_dim=256),
}
# Decoders that read the stage-3 features for deep supervision (loss weight: see builder).
DEEP_SUPERVISED = frozenset({"c1_deepsup", "ppm_deepsup"})
# Decoders that read more than the last feature map.
MULTI_SCALE = DEEP_SUPERVISED | {"upernet", "upernet_lite"}

__all__ = ["C1", "DECODERS", "DEEP_SUPERVISED", "MULTI_SCALE", "PPM", "UPerNet"]
