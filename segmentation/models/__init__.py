"""CSAIL scene-parsing models (encoders, decoders) with checkpoint-compatible state dicts."""

from .builder import (
    CSAIL_CONFIGS,
    IMAGENET_WEIGHTS,
    SCOPES,
    build_decoder,
    build_encoder,
    build_model,
    count_parameters,
)
from .common import SegmentationOutput
from .decoders import DECODERS
from .encoders import ENCODERS
from .model import DEEP_SUPERVISION_WEIGHT, SegmentationModel
from .weights import CheckpointMismatchError, load_weights

__all__ = [
    "CSAIL_CONFIGS",
    "DECODERS",
    "DEEP_SUPERVISION_WEIGHT",
    "ENCODERS",
    "IMAGENET_WEIGHTS",
    "SCOPES",
    "CheckpointMismatchError",
    "SegmentationModel",
    "SegmentationOutput",
    "build_decoder",
    "build_encoder",
    "build_model",
    "count_parameters",
    "load_weights",
]
