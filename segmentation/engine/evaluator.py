"""Validation: single-scale, multi-scale (CSAIL sizes), flip and sliding-window prediction,
scored by the ADE20K protocol from a confusion matrix whose counts are summed over ranks, plus
one record per image (``per_image.jsonl``) for image-paired comparisons.

The single- and multi-scale paths are CSAIL's evaluation step for step: each scale's logits are
resized once, from feature resolution, to the label's size, turned into probabilities, divided
by the number of views and summed; the prediction is the arg-max.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..config import Config
from ..data import CLASS_NAMES, IGNORE_INDEX, ValDataset
from ..metrics import ConfusionMatrix
from ..models.common import resize
from ..visualize import save_comparison
from .builders import autocast_dtype, build_val_dataset
from .distributed import DistContext

log = logging.getLogger(__name__)

PER_IMAGE_FILE = "per_image.jsonl"


@dataclass
class EvalResult:
    """Pooled ``summary`` (plus ``per_image_miou``/``per_image_mdice``, the means over images),
    the summed ``matrix``, the per-image records in list order, and how they were produced."""

    summary: dict[str, float]
    matrix: ConfusionMatrix
    images: list[dict] = field(default_factory=list)
    protocol: str = ""


def protocol(cfg: Config) -> str:
    """The evaluation protocol in words (single- or multi-scale, sizes, flip), for reports."""
    v = cfg.VAL
    views = "flipped views added" if v.flip else "no flip"
    if v.mode == "multi":
        sides = ", ".join(str(s) for s in v.imgSizes)
        return f"multi-scale (short sides {sides}; long side <= {v.imgMaxSize}; {views})"
    scale = f"short side {v.single_size}; long side <= {v.imgMaxSize}; {views}"
    if v.mode == "sliding":
        return f"single-scale sliding window {v.crop_size}, stride {v.stride} ({scale})"
    return f"single-scale ({scale})"


def _logits_at(model: nn.Module, img: Tensor, size: tuple[int, int]) -> Tensor:
    """Logits resized once to ``size``: from feature resolution for a SegmentationModel; a
    plain module's output (logits at input size) is resized from there."""
    logits_at = getattr(model, "logits_at", None)
    if logits_at is not None:
        return logits_at(img, size)
    return resize(model(img), size)


def _scale_probs(model: nn.Module, img: Tensor, size: tuple[int, int], cfg: Config) -> Tensor:
    return _logits_at(model, img, size).float().softmax(1)


def _sliding_probs(model: nn.Module, img: Tensor, size: tuple[int, int], cfg: Config) -> Tensor:
    """Softmax scores averaged over overlapping ``crop_size`` windows (zero-padded edges),
    then resized to ``size`` (a bilinear mix of probabilities stays a probability)."""
    crop, stride = cfg.VAL.crop_size, cfg.VAL.stride
    multiple = getattr(model, "size_multiple", 1)
    if crop % multiple or stride < 1:
        raise ValueError(f"VAL.crop_size ({crop}) must be a multiple of {multiple} and "
                         f"VAL.stride ({stride}) >= 1")
    height, width = img.shape[-2:]
    img = F.pad(img, (0, max(crop - width, 0), 0, max(crop - height, 0)))
    padded_h, padded_w = img.shape[-2:]

    def starts(length: int) -> list[int]:
        positions = list(range(0, length - crop + 1, stride))
        if positions[-1] != length - crop:
            positions.append(length - crop)  # the last window touches the far edge
        return positions

    scores = count = None
    for y in starts(padded_h):
        for x in starts(padded_w):
            probs = _scale_probs(model, img[..., y:y + crop, x:x + crop], (crop, crop), cfg)
            if scores is None:
                scores = probs.new_zeros(1, probs.shape[1], padded_h, padded_w)
                count = probs.new_zeros(1, 1, padded_h, padded_w)
            scores[..., y:y + crop, x:x + crop] += probs
            count[..., y:y + crop, x:x + crop] += 1
    probs = (scores / count)[..., :height, :width]
    return probs if tuple(probs.shape[-2:]) == tuple(size) else resize(probs, size)


PROBABILITY_FUNCTIONS: dict[str, Callable[[nn.Module, Tensor, tuple[int, int], Config], Tensor]] = {
    "single": _scale_probs,
    "multi": _scale_probs,
    "sliding": _sliding_probs,
}


def eval_sizes(cfg: Config) -> list[int]:
    """Short sides an image is evaluated at: CSAIL's list for ``multi``, one size otherwise."""
    return list(cfg.VAL.imgSizes) if cfg.VAL.mode == "multi" else [cfg.VAL.single_size]


@torch.no_grad()
def predict_scores(model: nn.Module, imgs: list[Tensor], out_size: tuple[int, int],
                   cfg: Config) -> Tensor:
    """Class probabilities ``(1, C, H, W)`` at ``out_size``, averaged over scales (and flips).

    Each view's probabilities are divided by the number of views and summed, in CSAIL's order
    (the arg-max at near-ties depends on it).
    """
    probs_of = PROBABILITY_FUNCTIONS[cfg.VAL.mode]
    dtype = autocast_dtype(cfg.TRAIN.amp)
    flips = (False, True) if cfg.VAL.flip else (False,)
    views = len(imgs) * len(flips)
    size = (int(out_size[0]), int(out_size[1]))
    total = None
    for img in imgs:
        for flipped in flips:
            view = img.flip(-1) if flipped else img
            with torch.autocast(view.device.type, dtype=dtype, enabled=dtype is not None):
                probs = probs_of(model, view, size, cfg).float()
            if flipped:
                probs = probs.flip(-1)
            total = probs / views if total is None else total + probs / views
    return total


def _shard(length: int, ctx: DistContext) -> list[int]:
    # Disjoint strided shards, no padding: each image is scored exactly once over all ranks.
    return list(range(ctx.rank, length, ctx.world_size))


def class_names_for(num_class: int) -> list[str] | None:
    return list(CLASS_NAMES) if num_class == len(CLASS_NAMES) else None


def _gather_records(records: list[dict], ctx: DistContext) -> list[dict]:
    """Every rank's per-image records on every rank, in list order."""
    if ctx.distributed and dist.is_available() and dist.is_initialized():
        parts: list = [None] * ctx.world_size
        dist.all_gather_object(parts, records)
        records = [record for part in parts for record in part]
    return sorted(records, key=lambda record: record["index"])


def per_image_means(records: Sequence[dict]) -> dict[str, float]:
    """Mean over images of each image's mIoU and mDice (images where it is defined)."""
    means = {}
    for key, name in (("mean_iou", "per_image_miou"), ("mean_dice", "per_image_mdice")):
        values = [r[key] for r in records if r[key] is not None]
        means[name] = math.fsum(values) / len(values) if values else float("nan")
    return means


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config, ctx: DistContext, *, out_dir: str | Path | None = None,
             per_image: str | Path | None = None, dataset: ValDataset | None = None,
             progress: bool = False) -> EvalResult:
    """Score ``model`` (unwrapped, any mode) on ``DATASET.list_val``; all ranks get the result.

    With ``out_dir`` (rank 0 writes): ``metrics.json``, ``class_iou.md``/``.csv`` and, with
    ``VAL.visualize``, ``vis/<name>.png`` strips (image | ground truth | prediction). With
    ``per_image``: that JSON-lines file, one record per scored image.
    """
    was_training = model.training
    model.eval()
    dataset = dataset or build_val_dataset(cfg, eval_sizes(cfg))
    count = len(dataset) if cfg.VAL.max_images <= 0 else min(cfg.VAL.max_images, len(dataset))
    indices = _shard(count, ctx)
    loader = DataLoader(Subset(dataset, indices), batch_size=1, collate_fn=dataset.collate_fn,
                        num_workers=cfg.VAL.workers if len(indices) > 1 else 0,
                        generator=torch.Generator().manual_seed(0))
    num_class = cfg.DATASET.num_class
    matrix = ConfusionMatrix(num_class, IGNORE_INDEX, device=ctx.device)
    records = []
    vis_dir = Path(out_dir) / "vis" if out_dir is not None and cfg.VAL.visualize else None
    for number, batch in enumerate(tqdm(loader, total=len(indices), disable=not progress,
                                        desc="eval")):
        if batch is None:  # skipped bad sample (DATASET.skip_bad)
            continue
        segm = batch["segm"].to(ctx.device)
        imgs = [img.to(ctx.device) for img in batch["imgs"]]
        pred = predict_scores(model, imgs, tuple(segm.shape[-2:]), cfg).argmax(1)
        image_matrix = ConfusionMatrix(num_class, IGNORE_INDEX, device=ctx.device)
        image_matrix.update(pred, segm)
        matrix.add_(image_matrix)
        records.append({"image": batch["image"][0], "index": int(batch["index"][0]),
                        **image_matrix.image_record()})
        if vis_dir is not None and number < cfg.VAL.visualize_max:
            image = dataset.load(batch["index"][0])[0]
            save_comparison(vis_dir / f"{batch['name'][0]}.png", image, segm[0].cpu(),
                            pred[0].cpu())
    matrix.all_reduce()
    records = _gather_records(records, ctx)
    summary = {**matrix.summary(cfg.VAL.absent), **per_image_means(records),
               "images": len(records)}
    result = EvalResult(summary, matrix, records, protocol(cfg))
    if ctx.is_main:
        if out_dir is not None:
            write_results(Path(out_dir), result, cfg)
        if per_image is not None:
            write_per_image(Path(per_image), records)
    model.train(was_training)
    return result


def write_per_image(path: Path, records: Sequence[dict]) -> Path:
    """``records`` as JSON lines, written to a temporary file first and renamed over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def write_results(out_dir: Path, result: EvalResult, cfg: Config) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    matrix, summary = result.matrix, result.summary
    names = class_names_for(matrix.num_classes)
    for suffix in (".md", ".csv"):
        matrix.write_class_table(out_dir / f"class_iou{suffix}", names, cfg.VAL.absent,
                                 title=f"Evaluation: {result.protocol}")
    metrics = {"protocol": result.protocol, **summary}
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    log.info("eval, %s: pixel acc %.2f%%, mIoU %.2f%%, score %.2f%% -> %s", result.protocol,
             100 * summary["pixel_acc"], 100 * summary["miou"], 100 * summary["score"], out_dir)


def csail_summary_line(summary: dict) -> str:
    """The numbers in the form of CSAIL's results table (percentages, two decimals)."""
    return (f"Mean IoU: {100 * summary['miou']:.2f}, Pixel Accuracy: "
            f"{100 * summary['pixel_acc']:.2f}%, Overall Score: {100 * summary['score']:.2f}")
