"""ADE20K-layout datasets: training (CSAIL augmentation, batched by a sampler) and validation.

Training::

    ds = TrainDataset("data/ADEChallengeData2016/training.odgt")
    sampler = AspectRatioBatchSampler(ds.sizes, batch_size=2, img_sizes=(300, 375, 450))
    loader = DataLoader(ds, batch_sampler=sampler, collate_fn=ds.collate_fn, num_workers=4)

Validation (one image per batch, every scale of ``img_sizes``)::

    ds = ValDataset(odgt, img_sizes=(300, 400))
    loader = DataLoader(ds, batch_size=1, collate_fn=ds.collate_fn)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from .classes import IGNORE_INDEX, NUM_CLASSES, resource_path
from .errors import DatasetError
from .odgt import Record, read_odgt
from .sampler import SampleSpec
from .transforms import (
    downsample_label,
    eval_inputs,
    load_image,
    load_label,
    normalize,
    resize_image,
    resize_label,
    round_up,
    scaled_size,
)

log = logging.getLogger(__name__)


def default_root(odgt: str | Path) -> Path:
    """Base directory of an index written by ``make_odgt``: the parent of the dataset root."""
    odgt = Path(odgt).resolve()
    if odgt.parent == Path(str(resource_path("SOURCE.md"))).resolve().parent:
        raise ValueError(
            f"{odgt} is a shipped official index: pass root=<folder containing "
            "ADEChallengeData2016>"
        )
    return odgt.parent.parent


class _IndexedDataset(Dataset):
    def __init__(self, odgt, root, num_classes: int, skip_bad: bool) -> None:
        self.odgt = Path(odgt)
        self.root = Path(root) if root is not None else default_root(odgt)
        self.num_classes = int(num_classes)
        self.skip_bad = bool(skip_bad)
        self.records: list[Record] = read_odgt(self.odgt, skip_bad=skip_bad)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """``(height, width)`` per sample, as recorded in the index (no file is opened)."""
        return [(r.height, r.width) for r in self.records]

    def load(self, index: int) -> tuple[Image.Image, np.ndarray, Record]:
        """Image, label map (int64, -1 = ignore) and record of a sample, all checked."""
        rec = self.records[index]
        where = f"(listed at {rec.source})"
        try:
            img = load_image(self.root / rec.fpath_img)
            label = load_label(self.root / rec.fpath_segm, self.num_classes)
        except DatasetError as err:
            raise DatasetError(f"{err} {where}") from None
        if img.size != (label.shape[1], label.shape[0]):
            raise DatasetError(
                f"{self.root / rec.fpath_img}: image is {img.size[0]}x{img.size[1]} but its "
                f"annotation {rec.fpath_segm} is {label.shape[1]}x{label.shape[0]} {where}"
            )
        if img.size != (rec.width, rec.height):
            raise DatasetError(
                f"{self.root / rec.fpath_img}: image is {img.size[0]}x{img.size[1]} but the "
                f"index says {rec.width}x{rec.height} {where}"
            )
        return img, label, rec

    def _guarded(self, build, index: int):
        try:
            return build()
        except DatasetError as err:
            if not self.skip_bad:
                raise
            log.warning("skipping bad sample %s: %s", self.records[index].name, err)
            return None


class PadCollate:
    """Stack training samples, zero-padding images to a multiple of ``padding_constant``.

    Labels are padded with ``-1``. ``None`` samples (skipped with ``skip_bad``) are dropped;
    a batch with no sample left collates to ``None``, which the training loop must skip.
    """

    def __init__(self, padding_constant: int, segm_downsampling_rate: int) -> None:
        self.padding_constant = int(padding_constant)
        self.rate = int(segm_downsampling_rate)

    def __call__(self, samples: Sequence[dict | None]) -> dict | None:
        samples = [s for s in samples if s is not None]
        if not samples:
            return None
        height = round_up(max(s["img"].shape[1] for s in samples), self.padding_constant)
        width = round_up(max(s["img"].shape[2] for s in samples), self.padding_constant)
        img = torch.zeros(len(samples), 3, height, width)
        segm = torch.full(
            (len(samples), height // self.rate, width // self.rate), IGNORE_INDEX, dtype=torch.long
        )
        for i, sample in enumerate(samples):
            _, h, w = sample["img"].shape
            img[i, :, :h, :w] = sample["img"]
            sh, sw = sample["segm"].shape
            segm[i, :sh, :sw] = sample["segm"]
        return {"img": img, "segm": segm, "name": [s["name"] for s in samples]}


class TrainDataset(_IndexedDataset):
    """Training samples resized, flipped and label-downsampled as a :class:`SampleSpec` says.

    Index it with ``SampleSpec(index, short_side, flip)`` (what
    :class:`~segmentation.data.sampler.AspectRatioBatchSampler` yields). Returns
    ``{"img": float32 (3, h, w) normalized, "segm": int64 (ceil(h/r), ceil(w/r)) with -1 =
    ignore, "name": str}`` where ``r = segm_downsampling_rate``; :attr:`collate_fn` pads a batch.

    Args:
        odgt: index file; paths in it are relative to ``root``.
        root: base directory; default: the parent of the folder holding ``odgt``.
        img_max_size: cap on the long side after scaling.
        padding_constant: batch height/width are rounded up to a multiple of this (the
            encoder's output stride); must be a multiple of ``segm_downsampling_rate``.
        segm_downsampling_rate: labels are returned at ``1 / rate`` resolution.
        num_classes: annotation values above it are an error.
        skip_bad: log and skip unusable samples (``None`` from ``__getitem__``) instead of
            raising :class:`DatasetError`.
    """

    def __init__(
        self,
        odgt: str | Path,
        root: str | Path | None = None,
        *,
        img_max_size: int = 1000,
        padding_constant: int = 8,
        segm_downsampling_rate: int = 8,
        num_classes: int = NUM_CLASSES,
        skip_bad: bool = False,
    ) -> None:
        if padding_constant % segm_downsampling_rate:
            raise ValueError(
                f"padding_constant ({padding_constant}) must be a multiple of "
                f"segm_downsampling_rate ({segm_downsampling_rate})"
            )
        super().__init__(odgt, root, num_classes, skip_bad)
        self.img_max_size = int(img_max_size)
        self.segm_downsampling_rate = int(segm_downsampling_rate)
        self.collate_fn = PadCollate(padding_constant, segm_downsampling_rate)

    def __getitem__(self, spec: SampleSpec) -> dict | None:
        if not isinstance(spec, tuple) or len(spec) != 3:
            raise TypeError(
                "TrainDataset is indexed by SampleSpec(index, short_side, flip); "
                "use AspectRatioBatchSampler as the DataLoader's batch_sampler"
            )
        index, short_side, flip = SampleSpec(*spec)
        return self._guarded(lambda: self._build(index, short_side, flip), index)

    def _build(self, index: int, short_side: int, flip: bool) -> dict:
        img, label, rec = self.load(index)
        if flip:  # before resizing, as CSAIL does: NEAREST ties make the two orders differ
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
            label = label[:, ::-1]
        size = scaled_size(img.height, img.width, short_side, self.img_max_size)
        img, label = resize_image(img, size), resize_label(label, size)
        label = downsample_label(label, self.segm_downsampling_rate)
        return {
            "img": normalize(img),
            "segm": torch.from_numpy(np.ascontiguousarray(label)),
            "name": rec.name,
        }


def eval_collate(samples: Sequence[dict | None]) -> dict | None:
    """Batch of one validation sample: adds the batch dimension; ``None`` if it was skipped."""
    if len(samples) != 1:
        raise ValueError(f"validation batches hold one image (sizes differ), got {len(samples)}")
    sample = samples[0]
    if sample is None:
        return None
    return {
        "imgs": [img.unsqueeze(0) for img in sample["imgs"]],
        "segm": sample["segm"].unsqueeze(0),
        "name": [sample["name"]],
        "image": [sample["image"]],
        "index": [sample["index"]],
    }


class ValDataset(_IndexedDataset):
    """Validation samples: the image at every short side of ``img_sizes``, label at full size.

    ``dataset[i]`` returns ``{"imgs": [float32 (3, H_s, W_s) per scale], "segm": int64 (H, W)
    original-size label with -1 = ignore, "name": str, "image": the index's fpath_img, "index":
    i}``. Each truncated scaled size is rounded up to a multiple of ``padding_constant``
    (resized, not padded) as in the CSAIL evaluation; resize the network's feature-resolution
    logits to ``segm``'s size before scoring. Use :attr:`collate_fn` with ``batch_size=1``.
    Arguments as in :class:`TrainDataset`.
    """

    def __init__(
        self,
        odgt: str | Path,
        root: str | Path | None = None,
        *,
        img_sizes: Sequence[int] = (300, 375, 450, 525, 600),
        img_max_size: int = 1000,
        padding_constant: int = 8,
        num_classes: int = NUM_CLASSES,
        skip_bad: bool = False,
    ) -> None:
        if not img_sizes:
            raise ValueError("img_sizes must name at least one scale")
        super().__init__(odgt, root, num_classes, skip_bad)
        self.img_sizes = tuple(int(s) for s in img_sizes)
        self.img_max_size = int(img_max_size)
        self.padding_constant = int(padding_constant)
        self.collate_fn = eval_collate

    def __getitem__(self, index: int) -> dict | None:
        return self._guarded(lambda: self._build(int(index)), int(index))

    def _build(self, index: int) -> dict:
        img, label, rec = self.load(index)
        imgs = eval_inputs(img, self.img_sizes, self.img_max_size, self.padding_constant)
        return {"imgs": imgs, "segm": torch.from_numpy(label), "name": rec.name,
                "image": rec.fpath_img, "index": index}
