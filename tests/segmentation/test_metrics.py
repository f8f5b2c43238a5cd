"""ConfusionMatrix against hand-computed matrices and a float64 set-based reference; visualize."""

from __future__ import annotations

import csv
import os
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from segmentation.data.classes import CLASS_NAMES, PALETTE
from segmentation.metrics import ConfusionMatrix
from segmentation.visualize import colorize, save_comparison, side_by_side

# 3 classes; -1 = ignored. Hand count (target row, pred col), ignored pixels dropped:
# t=0: p=0,0,1   t=1: p=1,2   t=2: p=2   (t=-1 pixels: preds 0 and 2, not counted)
TARGET = torch.tensor([[0, 0, 0, 1], [1, 2, -1, -1]])
PRED = torch.tensor([[0, 0, 1, 1], [2, 2, 0, 2]])
HAND_COUNTS = [[2, 1, 0], [0, 1, 1], [0, 0, 1]]


def test_counts_match_hand_computed_matrix_with_ignored_pixels():
    cm = ConfusionMatrix(num_classes=3)
    cm.update(PRED, TARGET)
    assert cm.counts.tolist() == HAND_COUNTS


def test_summary_matches_hand_computed_values():
    cm = ConfusionMatrix(num_classes=3)
    cm.update(PRED, TARGET)
    s = cm.summary()
    # 4 correct of 6 labelled; IoU: 2/3, 1/3, 1/2; acc: 2/3, 1/2, 1; dice: 4/5, 2/4, 2/3
    assert s["pixel_acc"] == pytest.approx(4 / 6)
    assert s["miou"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)
    assert s["score"] == pytest.approx((4 / 6 + (2 / 3 + 1 / 3 + 1 / 2) / 3) / 2)
    assert s["mean_class_acc"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert s["mdice"] == pytest.approx((4 / 5 + 2 / 4 + 2 / 3) / 3)
    assert s["present_classes"] == 3


def test_absent_classes_zero_by_default_or_ignored_on_request():
    cm = ConfusionMatrix(num_classes=5)  # classes 3 and 4 never occur anywhere
    cm.update(PRED, TARGET)
    ious = [2 / 3, 1 / 3, 1 / 2]
    assert cm.summary()["miou"] == pytest.approx(sum(ious) / 5)
    assert cm.summary(absent="ignore")["miou"] == pytest.approx(sum(ious) / 3)
    assert torch.isnan(cm.iou()[3:]).all()
    with pytest.raises(ValueError, match="absent"):
        cm.summary(absent="nan")


def test_class_only_predicted_has_zero_iou_and_undefined_accuracy():
    cm = ConfusionMatrix(num_classes=3)
    cm.update(torch.tensor([0, 2]), torch.tensor([0, 0]))
    row = cm.class_table()[2]
    assert row["iou"] == 0.0 and np.isnan(row["acc"]) and row["pred_pixels"] == 1


def test_image_record_by_hand():
    cm = ConfusionMatrix(num_classes=5)  # classes 3 and 4 occur nowhere: not in the record
    cm.update(PRED, TARGET)
    record = cm.image_record()
    assert (record["labelled_pixels"], record["correct_pixels"]) == (6, 4)
    assert record["pixel_accuracy"] == pytest.approx(4 / 6)
    assert record["iou"] == pytest.approx({"0": 2 / 3, "1": 1 / 3, "2": 1 / 2})
    assert record["dice"] == pytest.approx({"0": 4 / 5, "1": 2 / 4, "2": 2 / 3})
    assert record["mean_iou"] == pytest.approx((2 / 3 + 1 / 3 + 1 / 2) / 3)
    assert record["mean_dice"] == pytest.approx((4 / 5 + 2 / 4 + 2 / 3) / 3)
    # A class predicted only at an ignored pixel is not present; one predicted at a labelled
    # pixel is, with IoU and Dice 0.
    cm = ConfusionMatrix(num_classes=5)
    cm.update(torch.tensor([0, 3, 4]), torch.tensor([0, 0, -1]))
    assert cm.image_record()["iou"] == {"0": 0.5, "3": 0.0}
    empty = ConfusionMatrix(num_classes=5)
    empty.update(torch.tensor([1, 2]), torch.tensor([-1, -1]))
    assert empty.image_record() == {"labelled_pixels": 0, "correct_pixels": 0,
                                    "pixel_accuracy": None, "mean_iou": None,
                                    "mean_dice": None, "iou": {}, "dice": {}}


def _reference(pred: np.ndarray, target: np.ndarray, n: int):
    """float64 set-based IoU per class, independent of any confusion matrix."""
    keep = target != -1
    p, t = pred[keep], target[keep]
    inter = np.array([np.sum((p == c) & (t == c)) for c in range(n)], dtype=np.float64)
    union = np.array([np.sum((p == c) | (t == c)) for c in range(n)], dtype=np.float64)
    return np.sum(p == t) / max(len(t), 1), inter, union


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(2, 6),
    shape=st.tuples(st.integers(1, 3), st.integers(1, 7), st.integers(1, 7)),
    seed=st.integers(0, 2**31 - 1),
    splits=st.integers(1, 3),
)
def test_dataset_sums_match_reference_and_split_invariance(n, shape, seed, splits):
    rng = np.random.default_rng(seed)
    target = rng.integers(-1, n, size=shape)
    pred = rng.integers(0, n, size=shape)
    cm = ConfusionMatrix(num_classes=n)
    for chunk_p, chunk_t in zip(np.array_split(pred, splits), np.array_split(target, splits)):
        cm.update(torch.from_numpy(chunk_p), torch.from_numpy(chunk_t))
    acc, inter, union = _reference(pred, target, n)
    assert int(cm.counts.sum()) == int(np.sum(target != -1))
    if np.sum(target != -1):
        assert cm.pixel_accuracy() == pytest.approx(acc)
    expected = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
    assert cm.summary()["miou"] == pytest.approx(expected.mean())


def test_update_rejects_bad_inputs():
    cm = ConfusionMatrix(num_classes=3)
    with pytest.raises(ValueError, match="shape"):
        cm.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        cm.update(torch.zeros(4), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="target value 3"):
        cm.update(torch.zeros(2, dtype=torch.long), torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="pred value -2"):
        cm.update(torch.tensor([0, -2]), torch.tensor([0, 1]))
    assert cm.counts.sum() == 0  # nothing half-added


def test_add_and_reset():
    a, b = ConfusionMatrix(3), ConfusionMatrix(3)
    a.update(PRED, TARGET)
    b.update(PRED, TARGET)
    assert a.add_(b).counts.tolist() == (2 * torch.tensor(HAND_COUNTS)).tolist()
    a.reset()
    assert a.counts.sum() == 0
    with pytest.raises(ValueError, match="num_classes"):
        a.add_(ConfusionMatrix(4))


def _reduce_worker(rank: int, world: int, init_file: str, queue) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    cm = ConfusionMatrix(num_classes=3)
    cm.update(PRED[rank], TARGET[rank])  # each rank scores one row
    cm.all_reduce()
    queue.put((rank, cm.counts.tolist()))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_all_reduce_sums_counts_over_ranks():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "init")
        mp.start_processes(
            _reduce_worker, args=(2, init_file, queue), nprocs=2, start_method="spawn"
        )
        results = dict(queue.get(timeout=60) for _ in range(2))
    assert results[0] == results[1] == HAND_COUNTS


def test_all_reduce_without_process_group_is_noop():
    cm = ConfusionMatrix(3)
    cm.update(PRED, TARGET)
    assert cm.all_reduce().counts.tolist() == HAND_COUNTS


def test_class_table_files(tmp_path):
    cm = ConfusionMatrix(num_classes=150)
    cm.update(torch.tensor([2, 2, 0]), torch.tensor([2, 0, 0]))  # sky, wall
    csv_path = cm.write_class_table(tmp_path / "t.csv", CLASS_NAMES)
    rows = list(csv.DictReader(csv_path.open()))
    assert len(rows) == 150 and rows[2]["name"] == "sky"
    assert float(rows[2]["iou"]) == pytest.approx(1 / 2) and float(rows[0]["iou"]) == 0.5
    md = cm.write_class_table(tmp_path / "t.md", CLASS_NAMES).read_text()
    assert "| 2 | sky | 50.00 |" in md and "| 5 | ceiling | n/a |" in md
    with pytest.raises(ValueError, match="format"):
        cm.write_class_table(tmp_path / "t.txt")
    with pytest.raises(ValueError, match="names"):
        cm.class_table(["a", "b"])


# ---- visualize ----


def test_colorize_uses_palette_and_black_for_ignore():
    label = np.array([[0, 2], [-1, 149]])
    out = colorize(label)
    assert out.dtype == np.uint8 and out.shape == (2, 2, 3)
    assert out[0, 0].tolist() == [120, 120, 120]  # ADE20K wall colour (CSAIL color150)
    assert out[0, 1].tolist() == PALETTE[2].tolist()
    assert out[1, 0].tolist() == [0, 0, 0]
    with pytest.raises(ValueError, match="palette"):
        colorize(np.array([[150]]))
    with pytest.raises(ValueError, match="2-D integer"):
        colorize(np.zeros((2, 2), dtype=np.float32))


def test_side_by_side_png(tmp_path):
    image = np.full((4, 5, 3), 7, dtype=np.uint8)
    gt = torch.zeros(4, 5, dtype=torch.long)
    pred = torch.full((4, 5), 2)
    path = save_comparison(tmp_path / "v" / "cmp.png", image, gt, pred)
    out = np.asarray(Image.open(path))
    assert out.shape == (4, 15, 3)
    assert (out[:, :5] == 7).all()
    assert (out[:, 5:10] == PALETTE[0]).all() and (out[:, 10:] == PALETTE[2]).all()
    with pytest.raises(ValueError, match="prediction is 4x4"):
        side_by_side(image, gt, torch.zeros(4, 4, dtype=torch.long))


def test_side_by_side_accepts_normalized_tensor():
    from segmentation.data.transforms import normalize

    rgb = np.random.default_rng(0).integers(0, 256, (3, 4, 3), dtype=np.uint8)
    panel = side_by_side(
        normalize(Image.fromarray(rgb)), np.zeros((3, 4), int), np.zeros((3, 4), int)
    )
    assert np.abs(np.asarray(panel)[:, :4].astype(int) - rgb).max() <= 1
