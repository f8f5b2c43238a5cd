"""Synthetic scenes: layout, determinism, label ids, and that colour alone does not solve them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from segmentation.data import SampleSpec, TrainDataset, read_odgt
from segmentation.data.synthetic import generate_scene, main, make_synthetic_dataset


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_layout_matches_ade20k(synthetic_root):
    for split, count, stem in (("training", 12, "syn_train"), ("validation", 4, "syn_val")):
        records = read_odgt(synthetic_root / f"{split}.odgt")
        assert len(records) == count
        for i, rec in enumerate(records, start=1):
            assert rec.fpath_img == f"tinyset/images/{split}/{stem}_{i:08d}.jpg"
            assert rec.fpath_segm == f"tinyset/annotations/{split}/{stem}_{i:08d}.png"
            with Image.open(synthetic_root.parent / rec.fpath_img) as img:
                assert img.format == "JPEG" and img.size == (rec.width, rec.height)
            assert min(rec.width, rec.height) == 32
    sizes = [(r.width, r.height) for r in read_odgt(synthetic_root / "training.odgt")]
    assert len(set(sizes)) > 3, "aspect ratios should vary"


def test_labels_are_real_ade20k_ids(synthetic_root):
    seen = set()
    for path in (synthetic_root / "annotations" / "training").glob("*.png"):
        with Image.open(path) as img:
            assert img.mode == "L"
            seen |= set(np.unique(np.asarray(img)).tolist())
    assert seen <= set(range(1, 151)) and 0 not in seen
    assert {3, 13} <= seen  # sky and person (ADE20K ids) occur in a dozen scenes
    ds = TrainDataset(synthetic_root / "training.odgt")
    assert ds[SampleSpec(0, 32, False)]["segm"].min() >= 0


def test_deterministic_for_a_seed(tmp_path):
    make_synthetic_dataset(tmp_path / "a" / "set", train=5, val=2, size=24, seed=11)
    make_synthetic_dataset(tmp_path / "b" / "set", train=5, val=2, size=24, seed=11)
    make_synthetic_dataset(tmp_path / "c" / "set", train=5, val=2, size=24, seed=12)
    a, b, c = (_files(tmp_path / k / "set") for k in "abc")
    assert a == b and len(a) == 2 * 7 + 2
    assert a.keys() == c.keys() and a != c


def _colour_bins_and_labels(root, split):
    colours, labels = [], []
    for path in sorted((root / "images" / split).glob("*.jpg")):
        colours.append(np.asarray(Image.open(path)).reshape(-1, 3).astype(np.int64) // 32)
        seg = root / "annotations" / split / (path.stem + ".png")
        labels.append(np.asarray(Image.open(seg)).ravel())
    colour = np.concatenate(colours)
    return colour[:, 0] * 64 + colour[:, 1] * 8 + colour[:, 2], np.concatenate(labels)


def test_colour_alone_does_not_solve_it(tmp_path):
    """A per-pixel colour classifier (majority class per 8x8x8 colour bin, fitted on the
    training split) must stay far from solving the validation split."""
    make_synthetic_dataset(tmp_path / "set", train=40, val=10, size=32, seed=0)
    bins, labels = _colour_bins_and_labels(tmp_path / "set", "training")
    table = np.zeros((512, 151), np.int64)
    np.add.at(table, (bins, labels), 1)
    val_bins, val_labels = _colour_bins_and_labels(tmp_path / "set", "validation")
    accuracy = (table.argmax(1)[val_bins] == val_labels).mean()
    assert accuracy < 0.5


def test_scene_generator_shapes():
    image, label = generate_scene(np.random.default_rng(0), 20, 30)
    assert image.shape == (20, 30, 3) and image.dtype == np.uint8
    assert label.shape == (20, 30) and label.dtype == np.uint8


def test_cli_writes_dataset(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "d"), "--train", "2", "--val", "1", "--size", "16"]) == 0
    assert len(read_odgt(tmp_path / "d" / "validation.odgt")) == 1
    assert "training.odgt" in capsys.readouterr().out
    with pytest.raises(ValueError, match="at least one"):
        make_synthetic_dataset(tmp_path / "e", train=0)
