"""Colour label maps with the ADE20K palette; save image | ground truth | prediction strips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .data.classes import PALETTE
from .data.transforms import denormalize

IGNORE_COLOUR = (0, 0, 0)


def _as_numpy(array) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def colorize(label, palette: np.ndarray = PALETTE, ignore_colour=IGNORE_COLOUR) -> np.ndarray:
    """``(H, W)`` training labels (0..K-1, negative = ignore) -> ``(H, W, 3)`` uint8 RGB."""
    label = _as_numpy(label)
    palette = np.asarray(palette, dtype=np.uint8)
    if label.ndim != 2 or not np.issubdtype(label.dtype, np.integer):
        raise ValueError(f"expected a 2-D integer label map, got {label.dtype} {label.shape}")
    if label.size and label.max() >= len(palette):
        raise ValueError(f"label {label.max()} has no palette colour (palette has {len(palette)})")
    table = np.concatenate([palette, np.array([ignore_colour], dtype=np.uint8)])
    return table[np.where(label < 0, len(palette), label)]


def _as_rgb(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    if isinstance(image, torch.Tensor) and image.is_floating_point():
        return denormalize(image)  # a normalized (3, H, W) tensor from the datasets
    image = _as_numpy(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.dtype} {image.shape}")
    return image


def side_by_side(image, ground_truth, prediction, palette: np.ndarray = PALETTE) -> Image.Image:
    """Image | coloured ground truth | coloured prediction, all at the image's size.

    ``image`` may be a PIL image, an ``(H, W, 3)`` uint8 array or a normalized ``(3, H, W)``
    float tensor; the label maps must have the image's height and width.
    """
    rgb = _as_rgb(image)
    panels = [rgb]
    for name, label in (("ground_truth", ground_truth), ("prediction", prediction)):
        coloured = colorize(label, palette)
        if coloured.shape[:2] != rgb.shape[:2]:
            raise ValueError(
                f"{name} is {coloured.shape[1]}x{coloured.shape[0]}, "
                f"image is {rgb.shape[1]}x{rgb.shape[0]}"
            )
        panels.append(coloured)
    return Image.fromarray(np.concatenate(panels, axis=1))


def save_comparison(path: str | Path, image, ground_truth, prediction, **kwargs) -> Path:
    """Write :func:`side_by_side` as a PNG; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    side_by_side(image, ground_truth, prediction, **kwargs).save(path)
    return path
