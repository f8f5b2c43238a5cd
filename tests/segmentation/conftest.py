"""Shared fixtures: a tiny synthetic dataset and a hand-made dataset writer for bad-data cases."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segmentation.data.synthetic import make_synthetic_dataset


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory) -> Path:
    """A 12 + 4 image synthetic dataset (short side 32) in the ADEChallengeData2016 layout."""
    root = tmp_path_factory.mktemp("syn") / "tinyset"
    make_synthetic_dataset(root, train=12, val=4, size=32, seed=3)
    return root


class HandMadeDataset:
    """Writes samples with given pixels into ``base/ds/{images,annotations}/training``."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.root = base / "ds"
        for kind in ("images", "annotations"):
            (self.root / kind / "training").mkdir(parents=True, exist_ok=True)
        self.lines: list[str] = []

    def add(self, name: str, image: np.ndarray, label: np.ndarray, **record) -> None:
        """Save ``image`` (H, W, 3 uint8) as PNG-in-.jpg-free RGB and ``label`` as an L PNG."""
        img_rel = f"ds/images/training/{name}.png"
        seg_rel = f"ds/annotations/training/{name}.png"
        Image.fromarray(image).save(self.base / img_rel)  # lossless, so pixels are exact
        Image.fromarray(label.astype(np.uint8), mode="L").save(self.base / seg_rel)
        entry = {
            "fpath_img": img_rel,
            "fpath_segm": seg_rel,
            "width": image.shape[1],
            "height": image.shape[0],
        }
        entry.update(record)
        self.lines.append(json.dumps(entry))

    def path_of(self, name: str, kind: str) -> Path:
        return self.root / kind / "training" / f"{name}.png"

    def write_index(self) -> Path:
        path = self.root / "training.odgt"
        path.write_text("\n".join(self.lines) + "\n", encoding="utf-8")
        return path


@pytest.fixture
def handmade(tmp_path) -> HandMadeDataset:
    return HandMadeDataset(tmp_path)
