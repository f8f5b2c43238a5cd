"""SegmentationModel: encoder + decoder, with input checks and eval-mode upsampling."""

from __future__ import annotations

import torch
import torch.fx
from torch import Tensor, nn

from .common import SegmentationOutput, resize

# CSAIL's loss weight for the deep-supervision logits (loss = main + 0.4 * aux).
DEEP_SUPERVISION_WEIGHT = 0.4


def check_images(images: Tensor, size_multiple: int, encoder_name: str) -> Tensor:
    """Reject what the encoder cannot take: not (N, 3, H, W) float, or H, W not multiples."""
    if not isinstance(images, Tensor):
        raise TypeError(f"expected images as a torch.Tensor, got {type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"expected normalized images of shape (N, 3, H, W), got {tuple(images.shape)}"
        )
    if not images.is_floating_point():
        raise TypeError(f"expected floating-point (normalized) images, got {images.dtype}")
    height, width = images.shape[-2:]
    if height % size_multiple or width % size_multiple:
        raise ValueError(
            f"image size {height}x{width} is not a multiple of {size_multiple}, which "
            f"{encoder_name} needs; this model does not pad: pad the images (e.g. with zeros "
            f"at the bottom/right, as CSAIL's loader does) to a multiple of {size_multiple}"
        )
    return images


# A leaf for torch.fx, so that tracing the whole model (e.g. for BN→activation fusion) works.
torch.fx.wrap("check_images")


class SegmentationModel(nn.Module):
    """``encoder`` (image → feature maps) followed by ``decoder`` (feature maps → logits).

    ``model(images)`` takes normalized float images (N, 3, H, W), H and W multiples of
    ``size_multiple``. In training mode it returns ``SegmentationOutput(logits, aux_logits)``
    at feature resolution (``aux_logits`` is None without deep supervision; weight it by
    ``deep_supervision_weight`` in the loss). In eval mode it returns the logits bilinearly
    upsampled to H×W (align_corners=False); :meth:`logits_at` resizes them to any other size
    (a label's) in one step. Never softmax or loss: those live outside.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        encoder_name: str = "encoder",
        decoder_name: str = "decoder",
    ):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.encoder_name = encoder_name
        self.decoder_name = decoder_name
        self.size_multiple = encoder.size_multiple
        deep = getattr(decoder, "deep_supervision", False)
        self.deep_supervision_weight = DEEP_SUPERVISION_WEIGHT if deep else None

    def forward(self, images: Tensor) -> SegmentationOutput | Tensor:
        images = check_images(images, self.size_multiple, self.encoder_name)
        out = self.decoder(self.encoder(images))
        if self.training:
            return out
        return resize(out.logits, images.shape[-2:])

    def logits_at(self, images: Tensor, size: tuple[int, int]) -> Tensor:
        """Main-head logits resized once, from feature resolution, to ``size = (H, W)``.

        What CSAIL's decoders compute for ``segSize``: evaluation scores an image against its
        label, whose size need not be the network input's, and resizing twice (to the input,
        then to the label) changes the scores.
        """
        images = check_images(images, self.size_multiple, self.encoder_name)
        return resize(self.decoder(self.encoder(images)).logits, tuple(size))

    def extra_repr(self) -> str:
        return f"encoder={self.encoder_name!r}, decoder={self.decoder_name!r}"
