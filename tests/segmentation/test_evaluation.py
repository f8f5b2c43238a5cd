"""Evaluation against CSAIL's steps at label sizes that differ from the network input: scores,
predictions, pooled metrics and the per-image records (PERIMAGE contract), in one process and
over two gloo ranks."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

from segmentation.config import load_config
from segmentation.data.synthetic import generate_scene
from segmentation.engine.distributed import DistContext
from segmentation.engine.evaluator import PER_IMAGE_FILE, evaluate, predict_scores

from .reference import calibrated_model, csail_image_counts, csail_scores, csail_val_inputs

NUM_CLASS = 150
RECORD_KEYS = {"image", "index", "labelled_pixels", "correct_pixels", "pixel_accuracy",
               "mean_iou", "mean_dice", "iou", "dice"}


def model():
    return calibrated_model()


def _scene(seed: int, height: int, width: int):
    image, label = generate_scene(np.random.default_rng(seed), height, width)
    return Image.fromarray(image), label


MODES = {
    "single": ["VAL.mode", "single", "VAL.single_size", "32", "VAL.imgMaxSize", "80"],
    "multi": ["VAL.mode", "multi", "VAL.imgSizes", "[24, 32, 40]", "VAL.imgMaxSize", "80"],
}


@pytest.mark.parametrize("mode", sorted(MODES))
def test_scores_equal_csail_when_the_label_is_not_the_input_size(mode):
    cfg = load_config(None, MODES[mode])
    sizes = [32] if mode == "single" else [24, 32, 40]
    image, _ = _scene(1, 45, 61)  # inputs 32x40, 24x32, 40x48 ...: none is 45x61
    inputs = csail_val_inputs(image, sizes, 80, 8)
    assert all(tuple(x.shape[-2:]) != (45, 61) for x in inputs)
    ours = predict_scores(model(), inputs, (45, 61), cfg)
    expected = csail_scores(model(), inputs, (45, 61))
    assert torch.equal(ours, expected)
    assert len(expected.argmax(1).unique()) > 3  # a prediction that varies over the image
    # Resizing the input-size logits again (what eval did before) gives other scores.
    with torch.no_grad():
        twice = sum(F.interpolate(model()(x), size=(45, 61), mode="bilinear",
                                  align_corners=False).softmax(1) / len(inputs) for x in inputs)
    assert not torch.equal(twice, expected)


def _write_dataset(root, shapes):
    """Scenes labelled with CSAIL's single-scale (32) prediction, an unlabelled corner each:
    single-scale must then score 100% exactly, and one pixel predicted otherwise shows."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    lines = []
    for i, (h, w) in enumerate(shapes):
        image, _ = _scene(10 + i, h, w)
        scores = csail_scores(model(), csail_val_inputs(image, [32], 80, 8), (h, w))
        label = (scores.argmax(1)[0].numpy() + 1).astype(np.uint8)
        label[: h // 5, : w // 5] = 0
        image.save(root / "images" / f"im{i}.png")
        Image.fromarray(label).save(root / "annotations" / f"im{i}.png")
        lines.append(json.dumps({"fpath_img": f"images/im{i}.png",
                                 "fpath_segm": f"annotations/im{i}.png", "width": w,
                                 "height": h}))
    (root / "list.odgt").write_text("\n".join(lines) + "\n")
    return root / "list.odgt"


SHAPES = [(45, 61), (61, 45), (37, 37)]


def _eval_cfg(root, mode="multi", *extra):
    return load_config(None, ["DATASET.root_dataset", str(root), "DATASET.list_val",
                              str(root / "list.odgt"), "VAL.workers", "0", *MODES[mode],
                              *extra])


def _csail_reference(root, sizes):
    """Per-image CSAIL counts and the pooled numbers of CSAIL's eval.py."""
    per_image = []
    for i in range(len(SHAPES)):
        image = Image.open(root / "images" / f"im{i}.png").convert("RGB")
        label = np.asarray(Image.open(root / "annotations" / f"im{i}.png"), np.int64) - 1
        scores = csail_scores(model(), csail_val_inputs(image, sizes, 80, 8), label.shape)
        per_image.append(csail_image_counts(scores.argmax(1)[0].numpy(), label, NUM_CLASS))
    correct = sum(c for c, _, _, _ in per_image)
    labelled = sum(n for _, n, _, _ in per_image)
    inter = sum(i for _, _, i, _ in per_image)
    union = sum(u for _, _, _, u in per_image)
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)  # absent classes count 0
    return per_image, correct / labelled, iou.mean()


def _check_record(record, index, counts):
    correct, labelled, inter, union = counts
    assert set(record) == RECORD_KEYS
    assert record["image"] == f"images/im{index}.png" and record["index"] == index
    assert (record["labelled_pixels"], record["correct_pixels"]) == (labelled, correct)
    assert record["pixel_accuracy"] == pytest.approx(correct / labelled, abs=1e-15)
    present = [c for c in range(NUM_CLASS) if union[c] > 0]
    assert sorted(record["iou"], key=int) == [str(c) for c in present] == sorted(
        record["dice"], key=int)
    for c in present:
        assert record["iou"][str(c)] == pytest.approx(inter[c] / union[c], abs=1e-15)
        # Dice = 2I / (|gt| + |pred|) and |gt| + |pred| = union + intersection.
        assert record["dice"][str(c)] == pytest.approx(2 * inter[c] / (union[c] + inter[c]),
                                                       abs=1e-15)
    assert record["mean_iou"] == pytest.approx(np.mean([inter[c] / union[c] for c in present]))


@pytest.mark.parametrize("mode", sorted(MODES))
def test_evaluate_equals_csail_metrics_and_writes_per_image_records(tmp_path, mode):
    _write_dataset(tmp_path, SHAPES)
    out = tmp_path / "out"
    result = evaluate(model(), _eval_cfg(tmp_path, mode), DistContext(), out_dir=out,
                      per_image=out / PER_IMAGE_FILE)
    per_image, pixel_acc, miou = _csail_reference(tmp_path, [32] if mode == "single"
                                                   else [24, 32, 40])
    summary = result.summary
    assert summary["pixel_acc"] == pytest.approx(pixel_acc, abs=1e-12)
    assert summary["miou"] == pytest.approx(miou, abs=1e-12)
    if mode == "single":
        assert summary["pixel_acc"] == 1.0
    else:
        assert 0.05 < summary["pixel_acc"] < 0.99
    lines = (out / PER_IMAGE_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert len(records) == len(SHAPES)
    for index, (record, counts) in enumerate(zip(records, per_image, strict=True)):
        _check_record(record, index, counts)
    assert summary["per_image_miou"] == pytest.approx(np.mean([r["mean_iou"] for r in records]))
    assert summary["per_image_mdice"] == pytest.approx(
        np.mean([r["mean_dice"] for r in records]))
    assert summary["images"] == len(SHAPES) and result.images == records
    written = json.loads((out / "metrics.json").read_text())
    assert written["protocol"] == result.protocol
    assert result.protocol.startswith(f"{mode}-scale")
    assert written["miou"] == summary["miou"]
    assert (out / "class_iou.md").read_text().startswith(f"Evaluation: {result.protocol}")


def test_fully_unlabelled_image_has_null_accuracy_and_no_classes(tmp_path):
    _write_dataset(tmp_path, SHAPES[:2])
    Image.fromarray(np.zeros((61, 45), np.uint8)).save(tmp_path / "annotations" / "im1.png")
    result = evaluate(model(), _eval_cfg(tmp_path, "single"), DistContext(),
                      per_image=tmp_path / PER_IMAGE_FILE)
    record = json.loads((tmp_path / PER_IMAGE_FILE).read_text().splitlines()[1])
    assert record["labelled_pixels"] == 0 and record["pixel_accuracy"] is None
    assert record["mean_iou"] is None and record["iou"] == {} == record["dice"]
    assert result.summary["per_image_miou"] == result.images[0]["mean_iou"]


def _distributed_eval_worker(rank: int, root: str, init_file: str, out: str) -> None:
    import torch.distributed as dist

    from segmentation.models import build_model

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        net = build_model("mobilenetv2dilated", "c1_deepsup", num_class=NUM_CLASS)
        net.load_state_dict(torch.load(os.path.join(out, "weights.pth"), weights_only=True))
        result = evaluate(net, _eval_cfg(Path(root), "multi"),
                          DistContext(rank=rank, world_size=2),
                          per_image=os.path.join(out, PER_IMAGE_FILE))
        with open(os.path.join(out, f"summary_{rank}.json"), "w") as handle:
            json.dump(result.summary, handle)
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_two_ranks_give_the_one_process_records_and_summary(tmp_path):
    _write_dataset(tmp_path, SHAPES)
    single = evaluate(model(), _eval_cfg(tmp_path, "multi"), DistContext(),
                      per_image=tmp_path / "single.jsonl")
    torch.save(model().state_dict(), tmp_path / "weights.pth")
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_distributed_eval_worker, nprocs=2, start_method="spawn",
                           args=(str(tmp_path), os.path.join(tmp, "init"), str(tmp_path)))
    assert (tmp_path / PER_IMAGE_FILE).read_text() == (tmp_path / "single.jsonl").read_text()
    for rank in (0, 1):  # every rank gets the whole result
        summary = json.loads((tmp_path / f"summary_{rank}.json").read_text())
        assert summary == pytest.approx(single.summary)
