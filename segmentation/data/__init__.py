"""Datasets in the ADEChallengeData2016 layout, index files, batch sampler and class metadata.

The command-line tools live in submodules (not imported here, so ``python -m`` runs cleanly):
``segmentation.data.make_odgt``, ``segmentation.data.synthetic``, ``segmentation.data.download``.
"""

from .classes import (
    CLASS_FULL_NAMES,
    CLASS_NAMES,
    IGNORE_INDEX,
    NUM_CLASSES,
    PALETTE,
    class_id,
)
from .dataset import PadCollate, TrainDataset, ValDataset, default_root, eval_collate
from .errors import DatasetError
from .odgt import Record, official_odgt, read_odgt, write_odgt
from .sampler import AspectRatioBatchSampler, SampleSpec
from .transforms import IMAGENET_MEAN, IMAGENET_STD

__all__ = [
    "CLASS_FULL_NAMES",
    "CLASS_NAMES",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NUM_CLASSES",
    "PALETTE",
    "AspectRatioBatchSampler",
    "DatasetError",
    "PadCollate",
    "Record",
    "SampleSpec",
    "TrainDataset",
    "ValDataset",
    "class_id",
    "default_root",
    "eval_collate",
    "official_odgt",
    "read_odgt",
    "write_odgt",
]
