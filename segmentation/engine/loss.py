"""Segmentation loss (outside the model): cross-entropy + weighted deep-supervision term."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

IGNORE_INDEX = -1


def _match_size(logits: Tensor, size: torch.Size) -> Tensor:
    # Decoders output at feature stride; labels come at 1/segm_downsampling_rate. They agree for
    # the CSAIL pairs; otherwise resize the logits (bilinear), never the labels.
    if logits.shape[-2:] == size:
        return logits
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


class SegmentationLoss(nn.Module):
    """``CE(logits, target) + deep_sup_scale * CE(aux_logits, target)``, ignoring ``-1``.

    The loss is computed in float32 whatever the autocast dtype of the logits.
    """

    def __init__(self, deep_sup_scale: float = 0.4, ignore_index: int = IGNORE_INDEX) -> None:
        super().__init__()
        self.deep_sup_scale = float(deep_sup_scale)
        self.ignore_index = int(ignore_index)

    def _ce(self, logits: Tensor, target: Tensor) -> Tensor:
        logits = _match_size(logits, target.shape[-2:]).float()
        if not (target != self.ignore_index).any():
            return logits.sum() * 0.0  # all pixels ignored: zero loss that keeps the graph
        return F.cross_entropy(logits, target, ignore_index=self.ignore_index)

    def forward(self, logits: Tensor, target: Tensor, aux_logits: Tensor | None = None) -> Tensor:
        if target.dtype != torch.long:
            raise TypeError(f"target must be int64 class indices, got {target.dtype}")
        if logits.dim() != 4 or target.dim() != 3 or logits.shape[0] != target.shape[0]:
            raise ValueError(
                f"expected logits (N, C, h, w) and target (N, H, W), got "
                f"{tuple(logits.shape)} and {tuple(target.shape)}"
            )
        loss = self._ce(logits, target)
        if aux_logits is not None and self.deep_sup_scale:
            loss = loss + self.deep_sup_scale * self._ce(aux_logits, target)
        return loss


@torch.no_grad()
def pixel_counts(logits: Tensor, target: Tensor, ignore_index: int = IGNORE_INDEX
                 ) -> tuple[int, int]:
    """``(correct, labelled)`` pixel counts of ``argmax(logits)`` against ``target``."""
    pred = _match_size(logits, target.shape[-2:]).argmax(1)
    valid = target != ignore_index
    return int((pred.eq(target) & valid).sum()), int(valid.sum())
