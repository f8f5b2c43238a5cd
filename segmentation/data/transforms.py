"""Image/label loading and the resize, normalize, pad and downsample steps of the CSAIL recipe.

Every step follows CSAIL's code exactly: scaled sizes are truncated, not rounded (``int()`` of
the scaled float, as CSAIL's ``np.int32`` and ``int()`` do); images are resized with Pillow's
BILINEAR filter and label maps (int64, ``-1`` = ignore) with Pillow's NEAREST filter, whose
choice at exact ties between two source pixels (the lower one) is part of CSAIL's labels.
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
    """Size with the short side at ``short_side`` unless the long side would pass ``max_size``.

    Both sides are truncated, as in CSAIL's training and validation code, so the short side can
    come out one pixel below ``short_side`` (``int(281 * (300 / 281)) == 299``).
    """
    scale = min(short_side / min(height, width), max_size / max(height, width))
    return max(1, int(height * scale)), max(1, int(width * scale))


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
    """Pillow NEAREST resize of a 2-D integer label map to ``size = (height, width)``.

    Pillow itself picks the source pixels (its accumulated float positions decide exact ties),
    so the result is the label CSAIL's loader computes; int32 ("I" mode) keeps -1 and any
    class count.
    """
    height, width = size
    if label.shape == (height, width):
        return label
    image = Image.fromarray(np.ascontiguousarray(label, dtype=np.int32))
    if image.mode != "I":  # pragma: no cover - Pillow maps int32 arrays to "I"
        raise TypeError(f"label map became a {image.mode!r} image, expected 'I'")
    resized = np.asarray(image.resize((width, height), Image.NEAREST), dtype=np.int64)
    return resized.astype(label.dtype, copy=False)


def eval_input_size(height: int, width: int, short_side: int, max_size: int,
                    multiple: int) -> tuple[int, int]:
    """Network input size of an evaluated image: the truncated scaled size rounded up to a
    multiple of ``multiple`` (CSAIL stretches the image to it, it does not pad)."""
    h, w = scaled_size(height, width, short_side, max_size)
    return round_up(h, multiple), round_up(w, multiple)


def eval_inputs(image: Image.Image, short_sides, max_size: int, multiple: int
                ) -> list[torch.Tensor]:
    """The normalized ``(3, H_s, W_s)`` network input of ``image`` at every short side."""
    return [normalize(resize_image(image, eval_input_size(image.height, image.width, side,
                                                          max_size, multiple)))
            for side in short_sides]


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
