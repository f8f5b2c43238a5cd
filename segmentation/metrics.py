"""Segmentation metrics by the ADE20K SceneParsing protocol, from a dataset-wide confusion matrix.

Counts are summed over the whole dataset first, and every metric is derived from the sums:
pixel accuracy = correctly labelled pixels / labelled pixels; IoU of class c = summed
intersection / summed union; mIoU = mean over classes; score = (pixel accuracy + mIoU) / 2.
Under ``torchrun`` each rank accumulates its shard and :meth:`ConfusionMatrix.all_reduce`
sums the *counts* (never the per-rank means).

Classes absent from both ground truth and prediction (empty union) have no defined IoU. The
default ``absent="zero"`` follows the official CSAIL evaluation: such a class counts as 0 and the
mean runs over all ``num_classes`` (on the full ADE20K validation set every class occurs, so
this only matters on subsets). ``absent="ignore"`` averages over defined classes only, as
mmsegmentation's ``nanmean`` does. The same rule applies to class accuracy (undefined when a
class has no ground-truth pixel) and Dice.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

ABSENT_POLICIES = ("zero", "ignore")


class ConfusionMatrix:
    """``counts[t, p]`` = number of pixels with ground truth ``t`` predicted as ``p``.

    Args:
        num_classes: number of classes (150 for ADE20K).
        ignore_index: ground-truth value that is not scored (``-1``, "other").
        device: where the counts live; use the GPU under NCCL.
    """

    def __init__(
        self, num_classes: int = 150, ignore_index: int = -1, device: torch.device | str = "cpu"
    ) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.counts = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def reset(self) -> None:
        self.counts.zero_()

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch: ``pred`` and ``target`` integer label maps of the same shape.

        ``pred`` holds class indices (e.g. ``logits.argmax(1)``) in ``0..num_classes-1``;
        ``target`` additionally may hold ``ignore_index``. Any other value is an error.
        """
        if pred.shape != target.shape:
            raise ValueError(f"pred shape {tuple(pred.shape)} != target {tuple(target.shape)}")
        for name, tensor in (("pred", pred), ("target", target)):
            if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer label tensor, got {tensor.dtype}")
        pred = pred.to(self.counts.device, torch.int64).flatten()
        target = target.to(self.counts.device, torch.int64).flatten()
        keep = target != self.ignore_index
        pred, target = pred[keep], target[keep]
        n = self.num_classes
        if target.numel() and (target.min() < 0 or target.max() >= n):
            bad = target[(target < 0) | (target >= n)][0].item()
            raise ValueError(f"target value {bad} is neither a class 0..{n - 1} nor ignore_index")
        if pred.numel() and (pred.min() < 0 or pred.max() >= n):
            bad = pred[(pred < 0) | (pred >= n)][0].item()
            raise ValueError(f"pred value {bad} outside 0..{n - 1} (at a scored pixel)")
        self.counts += torch.bincount(target * n + pred, minlength=n * n).view(n, n)

    def add_(self, other: ConfusionMatrix) -> ConfusionMatrix:
        """Sum another matrix's counts into this one (same ``num_classes``)."""
        if other.num_classes != self.num_classes:
            raise ValueError(f"num_classes differ: {self.num_classes} vs {other.num_classes}")
        self.counts += other.counts.to(self.counts.device)
        return self

    def all_reduce(self, group=None) -> ConfusionMatrix:
        """Sum the counts over all ranks of ``group`` in place (no-op without a process group).

        The counts must be on a device the backend supports (CUDA for NCCL).
        """
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.counts, op=dist.ReduceOp.SUM, group=group)
        return self

    reduce_ = all_reduce

    # ---- derived quantities (float64, computed from the summed counts) ----

    def _per_class(self) -> dict[str, torch.Tensor]:
        counts = self.counts.double().cpu()
        inter = counts.diagonal()
        gt, predicted = counts.sum(1), counts.sum(0)
        union = gt + predicted - inter
        nan = torch.tensor(float("nan"), dtype=torch.float64)
        return {
            "iou": torch.where(union > 0, inter / union, nan),
            "acc": torch.where(gt > 0, inter / gt, nan),
            "dice": torch.where(gt + predicted > 0, 2 * inter / (gt + predicted), nan),
            "gt_pixels": gt,
            "pred_pixels": predicted,
        }

    @staticmethod
    def _mean(values: torch.Tensor, absent: str) -> float:
        if absent not in ABSENT_POLICIES:
            raise ValueError(f"absent must be one of {ABSENT_POLICIES}, got {absent!r}")
        if absent == "zero":
            return values.nan_to_num(0.0).mean().item()
        defined = values[~values.isnan()]
        return defined.mean().item() if defined.numel() else float("nan")

    def pixel_accuracy(self) -> float:
        """Correct labelled pixels / labelled pixels (NaN before any labelled pixel)."""
        total = self.counts.sum().item()
        return self.counts.diagonal().sum().item() / total if total else float("nan")

    def iou(self) -> torch.Tensor:
        """Per-class IoU, float64; NaN where the class is in neither GT nor prediction."""
        return self._per_class()["iou"]

    def summary(self, absent: str = "zero") -> dict[str, float]:
        """``pixel_acc``, ``miou``, ``score``, ``mean_class_acc``, ``mdice`` and
        ``present_classes`` (classes with ground-truth pixels); see the module doc for
        ``absent``."""
        per = self._per_class()
        pixel_acc = self.pixel_accuracy()
        miou = self._mean(per["iou"], absent)
        return {
            "pixel_acc": pixel_acc,
            "miou": miou,
            "score": (pixel_acc + miou) / 2,
            "mean_class_acc": self._mean(per["acc"], absent),
            "mdice": self._mean(per["dice"], absent),
            "present_classes": int((per["gt_pixels"] > 0).sum().item()),
        }

    def image_record(self) -> dict:
        """The counts' per-image evaluation record (the ``per_image.jsonl`` fields but the
        image's path and index): labelled and correct pixels, pixel accuracy, and IoU and Dice
        of every class present in ground truth or prediction (prediction counted at labelled
        pixels only, as CSAIL's ``intersectionAndUnion`` does), keyed by the class index as a
        string, with their means. Pixel accuracy and the means are None where undefined."""
        per = self._per_class()
        labelled = int(self.counts.sum().item())
        correct = int(self.counts.diagonal().sum().item())
        present = (~per["iou"].isnan()).nonzero().flatten().tolist()
        iou = {str(c): per["iou"][c].item() for c in present}
        dice = {str(c): per["dice"][c].item() for c in present}
        return {
            "labelled_pixels": labelled,
            "correct_pixels": correct,
            "pixel_accuracy": correct / labelled if labelled else None,
            "mean_iou": sum(iou.values()) / len(iou) if iou else None,
            "mean_dice": sum(dice.values()) / len(dice) if dice else None,
            "iou": iou,
            "dice": dice,
        }

    def class_table(self, class_names: Sequence[str] | None = None) -> list[dict]:
        """One row per class: index, name, IoU, accuracy, Dice, GT and predicted pixels."""
        names = list(class_names) if class_names is not None else None
        if names is not None and len(names) != self.num_classes:
            raise ValueError(f"{len(names)} class names for {self.num_classes} classes")
        per = self._per_class()
        return [
            {
                "index": c,
                "name": names[c] if names is not None else str(c),
                "iou": per["iou"][c].item(),
                "acc": per["acc"][c].item(),
                "dice": per["dice"][c].item(),
                "gt_pixels": int(per["gt_pixels"][c].item()),
                "pred_pixels": int(per["pred_pixels"][c].item()),
            }
            for c in range(self.num_classes)
        ]

    def write_class_table(
        self, path: str | Path, class_names: Sequence[str] | None = None, absent: str = "zero",
        title: str = "",
    ) -> Path:
        """Write the per-class table as CSV (``.csv``) or Markdown (``.md``, with a summary
        under ``title``, e.g. the evaluation protocol)."""
        path = Path(path)
        writers = {".csv": _write_csv, ".md": _write_markdown}
        if path.suffix not in writers:
            raise ValueError(f"{path}: class table format must be one of {sorted(writers)}")
        path.parent.mkdir(parents=True, exist_ok=True)
        writers[path.suffix](path, self.class_table(class_names), self.summary(absent), title)
        return path


def _write_csv(path: Path, rows: list[dict], summary: dict, title: str) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def _fmt(value: float) -> str:
    return "n/a" if value != value else f"{100 * value:.2f}"  # NaN -> n/a


def _write_markdown(path: Path, rows: list[dict], summary: dict, title: str) -> None:
    lines = [title, ""] if title else []
    lines += [
        "| metric | value |",
        "|---|---|",
        *(f"| {k} | {_fmt(v)} |" for k, v in summary.items() if k != "present_classes"),
        f"| present_classes | {summary['present_classes']} |",
        "",
        "| # | class | IoU % | Acc % | Dice % | GT pixels | predicted pixels |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['index']} | {r['name']} | {_fmt(r['iou'])} | {_fmt(r['acc'])} | "
        f"{_fmt(r['dice'])} | {r['gt_pixels']} | {r['pred_pixels']} |"
        for r in rows
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
