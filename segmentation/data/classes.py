"""ADE20K SceneParsing class names and palette, read from the files shipped in ``resources/``.

Index ``i`` of every sequence here is the *training* label ``i`` (ADE20K class id ``i + 1``):
annotation value 0 ("other") is ignored and values 1..150 become 0..149.
"""

from __future__ import annotations

import csv
import io
from functools import cache
from importlib import resources

import numpy as np

NUM_CLASSES = 150
IGNORE_INDEX = -1


def resource_path(name: str):
    """A traversable for a file in ``segmentation/data/resources`` (use ``.open()`` / ``str()``)."""
    return resources.files("segmentation.data").joinpath("resources", name)


def _read_csv(name: str) -> list[dict[str, str]]:
    text = resource_path(name).read_text(encoding="utf-8")
    return list(csv.DictReader(io.StringIO(text)))


@cache
def _class_table() -> tuple[tuple[str, ...], tuple[str, ...]]:
    rows = _read_csv("object150_info.csv")
    if [int(r["Idx"]) for r in rows] != list(range(1, NUM_CLASSES + 1)):
        raise RuntimeError("object150_info.csv must list class ids 1..150 in order")
    full = tuple(r["Name"] for r in rows)
    short = tuple(name.split(";")[0] for name in full)
    return short, full


@cache
def _palette() -> np.ndarray:
    rows = _read_csv("color150.csv")
    if [int(r["idx"]) for r in rows] != list(range(1, NUM_CLASSES + 1)):
        raise RuntimeError("color150.csv must list class ids 1..150 in order")
    palette = np.array([[int(r["r"]), int(r["g"]), int(r["b"])] for r in rows], dtype=np.uint8)
    palette.setflags(write=False)
    return palette


def class_names() -> tuple[str, ...]:
    """The 150 class names (first synonym), indexed by training label 0..149."""
    return _class_table()[0]


def class_full_names() -> tuple[str, ...]:
    """The 150 full names (``;``-separated synonyms, as in the official list)."""
    return _class_table()[1]


def palette() -> np.ndarray:
    """Read-only ``(150, 3)`` uint8 RGB palette indexed by training label 0..149."""
    return _palette()


def class_id(name: str) -> int:
    """Training label (0..149) of a class given by its first synonym, e.g. ``"sky"`` -> 2."""
    try:
        return class_names().index(name)
    except ValueError:
        raise KeyError(f"unknown ADE20K class name {name!r}") from None


CLASS_NAMES: tuple[str, ...] = class_names()
CLASS_FULL_NAMES: tuple[str, ...] = class_full_names()
PALETTE: np.ndarray = palette()
