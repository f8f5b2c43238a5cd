"""Validation: single-scale, multi-scale (CSAIL sizes), flip and sliding-window prediction,
scored by the ADE20K protocol from a confusion matrix whose counts are summed over ranks."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from ..config import Config
from ..data import CLASS_NAMES, IGNORE_INDEX, ValDataset
from ..metrics import ConfusionMatrix
from ..visualize import save_comparison
from .builders import autocast_dtype, build_val_dataset
from .distributed import DistContext

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    summary: dict[str, float]
    matrix: ConfusionMatrix


def _forward_logits(model: nn.Module, img: Tensor, cfg: Config) -> Tensor:
    return model(img).float()


def _sliding_logits(model: nn.Module, img: Tensor, cfg: Config) -> Tensor:
    """Average of softmax scores over overlapping ``crop_size`` windows (zero-padded edges)."""
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
            probs = model(img[..., y:y + crop, x:x + crop]).float().softmax(1)
            if scores is None:
                scores = probs.new_zeros(1, probs.shape[1], padded_h, padded_w)
                count = probs.new_zeros(1, 1, padded_h, padded_w)
            scores[..., y:y + crop, x:x + crop] += probs
            count[..., y:y + crop, x:x + crop] += 1
    # Return log-probabilities: softmax of them gives back the averaged probabilities.
    return (scores / count)[..., :height, :width].clamp_min(1e-12).log()


LOGIT_FUNCTIONS: dict[str, Callable[[nn.Module, Tensor, Config], Tensor]] = {
    "single": _forward_logits,
    "multi": _forward_logits,
    "sliding": _sliding_logits,
}


def eval_sizes(cfg: Config) -> list[int]:
    """Short sides an image is evaluated at: CSAIL's list for ``multi``, one size otherwise."""
    return list(cfg.VAL.imgSizes) if cfg.VAL.mode == "multi" else [cfg.VAL.single_size]


@torch.no_grad()
def predict_scores(model: nn.Module, imgs: list[Tensor], out_size: tuple[int, int],
                   cfg: Config) -> Tensor:
    """Class probabilities ``(1, C, H, W)`` averaged over scales (and flips) at ``out_size``.

    Each scale's logits are resized to ``out_size`` before the softmax, as in CSAIL's test.
    """
    logits_of = LOGIT_FUNCTIONS[cfg.VAL.mode]
    dtype = autocast_dtype(cfg.TRAIN.amp)
    total, views = None, 0
    for img in imgs:
        variants = [(img, False), (img.flip(-1), True)] if cfg.VAL.flip else [(img, False)]
        for view, flipped in variants:
            with torch.autocast(view.device.type, dtype=dtype, enabled=dtype is not None):
                logits = logits_of(model, view, cfg)
            if flipped:
                logits = logits.flip(-1)
            logits = F.interpolate(logits.float(), size=out_size, mode="bilinear",
                                   align_corners=False)
            probs = logits.softmax(1)
            total = probs if total is None else total + probs
            views += 1
    return total / views


def _shard(length: int, ctx: DistContext) -> list[int]:
    # Disjoint strided shards, no padding: each image is scored exactly once over all ranks.
    return list(range(ctx.rank, length, ctx.world_size))


def class_names_for(num_class: int) -> list[str] | None:
    return list(CLASS_NAMES) if num_class == len(CLASS_NAMES) else None


@torch.no_grad()
def evaluate(model: nn.Module, cfg: Config, ctx: DistContext, *, out_dir: str | Path | None = None,
             dataset: ValDataset | None = None, progress: bool = False) -> EvalResult:
    """Score ``model`` (unwrapped, any mode) on ``DATASET.list_val``; all ranks get the result.

    With ``out_dir`` (rank 0 writes): ``metrics.json``, ``class_iou.md``/``.csv`` and, with
    ``VAL.visualize``, ``vis/<name>.png`` strips (image | ground truth | prediction).
    """
    was_training = model.training
    model.eval()
    dataset = dataset or build_val_dataset(cfg, eval_sizes(cfg))
    count = len(dataset) if cfg.VAL.max_images <= 0 else min(cfg.VAL.max_images, len(dataset))
    indices = _shard(count, ctx)
    loader = DataLoader(Subset(dataset, indices), batch_size=1, collate_fn=dataset.collate_fn,
                        num_workers=cfg.VAL.workers if len(indices) > 1 else 0,
                        generator=torch.Generator().manual_seed(0))
    matrix = ConfusionMatrix(cfg.DATASET.num_class, IGNORE_INDEX, device=ctx.device)
    vis_dir = Path(out_dir) / "vis" if out_dir is not None and cfg.VAL.visualize else None
    for number, (index, batch) in enumerate(
            tqdm(zip(indices, loader), total=len(indices), disable=not progress, desc="eval")):
        if batch is None:  # skipped bad sample (DATASET.skip_bad)
            continue
        segm = batch["segm"].to(ctx.device)
        imgs = [img.to(ctx.device) for img in batch["imgs"]]
        pred = predict_scores(model, imgs, tuple(segm.shape[-2:]), cfg).argmax(1)
        matrix.update(pred, segm)
        if vis_dir is not None and number < cfg.VAL.visualize_max:
            image = dataset.load(index)[0]
            save_comparison(vis_dir / f"{batch['name'][0]}.png", image, segm[0].cpu(),
                            pred[0].cpu())
    matrix.all_reduce()
    summary = matrix.summary(cfg.VAL.absent)
    if out_dir is not None and ctx.is_main:
        write_results(Path(out_dir), matrix, summary, cfg)
    model.train(was_training)
    return EvalResult(summary, matrix)


def write_results(out_dir: Path, matrix: ConfusionMatrix, summary: dict, cfg: Config) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    names = class_names_for(matrix.num_classes)
    for suffix in (".md", ".csv"):
        matrix.write_class_table(out_dir / f"class_iou{suffix}", names, cfg.VAL.absent)
    (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    log.info("eval: pixel acc %.2f%%, mIoU %.2f%%, score %.2f%% -> %s",
             100 * summary["pixel_acc"], 100 * summary["miou"], 100 * summary["score"], out_dir)
