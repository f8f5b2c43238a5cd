"""Image/label loading and the resize, normalize, pad and downsample steps of the CSAIL recipe.

Images are resized bilinearly with Pillow; label maps (int64, ``-1`` = ignore) are resized by
nearest-neighbour sampling at pixel centres, which never invents a class.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .classes import IGNORE_INDEX, NUM_CLASSES
from .errors import DatasetError

# ImageNet statistics, as the CSAIL models expect (RGB, after scaling to [0, 1])
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_LABEL_MODES = ("L", "P", "I", "I;16")


def load_image(path: str | Path) -> Image.Image:
    """Open an RGB image; a missing or undecodable file raises :class:`DatasetError`."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: image file not found")
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so truncated files fail here and not later
            return img.convert("RGB")
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        raise DatasetError(f"{path}: cannot read image ({err})") from None


def load_label(path: str | Path, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Read an annotation PNG (0 = other, 1..num_classes) as int64 with 0 -> -1, k -> k - 1."""
    path = Path(path)
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode not in _LABEL_MODES:
                raise DatasetError(
                    f"{path}: annotation must be a single-channel label map, got mode {img.mode}"
                )
            label = np.asarray(img, dtype=np.int64)
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as err:
        if isinstance(err, DatasetError):
            raise
        raise DatasetError(f"{path}: cannot read annotation ({err})") from None
    top = int(label.max()) if label.size else 0
    if top > num_classes or int(label.min()) < 0:
        raise DatasetError(
            f"{path}: label value {top} out of range 0..{num_classes} (0 = other, ignored)"
        )
    return label - 1  # 0 ("other") becomes IGNORE_INDEX = -1


def scaled_size(height: int, width: int, short_side: int, max_size: int) -> tuple[int, int]:
    """Size with the short side at ``short_side`` unless the long side would pass ``max_size``."""
    scale = min(short_side / min(height, width), max_size / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def round_up(value: int, multiple: int) -> int:
    """Smallest multiple of ``multiple`` that is >= ``value``."""
    return int(math.ceil(value / multiple) * multiple)


def resize_image(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Bilinear resize to ``size = (height, width)``."""
    height, width = size
    if img.size == (width, height):
        return img
    return img.resize((width, height), Image.BILINEAR)


def resize_label(label: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Nearest-neighbour resize of a 2-D label map to ``size = (height, width)``."""
    height, width = size
    src_h, src_w = label.shape
    if (src_h, src_w) == (height, width):
        return label
    rows = np.minimum(((np.arange(height) + 0.5) * src_h / height).astype(np.int64), src_h - 1)
    cols = np.minimum(((np.arange(width) + 0.5) * src_w / width).astype(np.int64), src_w - 1)
    return label[rows[:, None], cols[None, :]]


def downsample_label(label: np.ndarray, rate: int) -> np.ndarray:
    """Pad with ignore to a multiple of ``rate``, then keep the centre pixel of each cell.

    The result has shape ``(ceil(H / rate), ceil(W / rate))`` and lines up with a network
    output of stride ``rate`` over the image padded to a multiple of ``rate``.
    """
    if rate == 1:
        return label
    height, width = label.shape
    padded = np.full((round_up(height, rate), round_up(width, rate)), IGNORE_INDEX, label.dtype)
    padded[:height, :width] = label
    return padded[rate // 2 :: rate, rate // 2 :: rate]


def normalize(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 ``(3, H, W)`` tensor normalized with the ImageNet mean/std."""
    array = np.asarray(img, dtype=np.float32) / 255.0
    tensor = torch.from_numpy(array).permute(2, 0, 1)
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return ((tensor - mean) / std).contiguous()


def denormalize(img: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`normalize`: ``(3, H, W)`` tensor -> ``(H, W, 3)`` uint8 array."""
    if img.ndim != 3 or img.shape[0] != 3:
        raise ValueError(f"expected a (3, H, W) image tensor, got shape {tuple(img.shape)}")
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    rgb = (img.detach().float().cpu() * std + mean).clamp(0, 1) * 255.0
    return rgb.round().to(torch.uint8).permute(1, 2, 0).numpy()
