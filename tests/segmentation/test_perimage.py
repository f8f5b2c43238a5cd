"""Per-image paired comparison on records written in the per_image.jsonl format, and the
same-function probe on the real models."""

from __future__ import annotations

import json

import numpy as np
import pytest

from segmentation.config import load_config
from segmentation.engine.equivalence import same_function_groups
from segmentation.engine.perimage import (
    PerImageError,
    paired_image_difference,
    per_image_comparison,
    read_per_image,
)
from segmentation.engine.report import markdown


def _record(index, miou, acc):
    labelled = 100
    return {"image": f"val/img_{index}.jpg", "index": index, "labelled_pixels": labelled,
            "correct_pixels": None if acc is None else round(acc * labelled),
            "pixel_accuracy": acc, "mean_iou": miou, "mean_dice": miou,
            "iou": {} if miou is None else {"3": miou}, "dice": {} if miou is None else {"3": miou}}


def _write(folder, rows):
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "per_image.jsonl", "w", encoding="utf-8") as handle:
        for i, (miou, acc) in enumerate(rows):
            handle.write(json.dumps(_record(i, miou, acc)) + "\n")
    return folder


def test_paired_differences_average_seeds_then_images(tmp_path):
    base = {0: [(0.5, 0.8), (0.2, 0.6), (0.4, 0.7)], 1: [(0.3, 0.7), (0.1, 0.5), (None, None)]}
    arm = {0: [(0.6, 0.8), (0.2, 0.7), (0.7, 0.9)], 1: [(0.5, 0.9), (0.3, 0.5), (0.9, 0.9)]}
    folders = {}
    for name, table in (("relu", base), ("mish", arm)):
        for seed, rows in table.items():
            folders[name, seed] = _write(tmp_path / name / str(seed), rows)
    folders["mish", 2] = tmp_path / "mish" / "2"  # finished without per-image records
    result = per_image_comparison(folders, ["relu", "mish"], "relu", resamples=500)
    assert result["missing"] == [{"arm": "mish", "seed": 2, "folder": str(tmp_path / "mish" / "2")}]
    miou = result["comparisons"]["mish"]["mean_iou"]
    # image 0: (0.1 + 0.2) / 2, image 1: (0.0 + 0.2) / 2, image 2: seed 0 only (null in seed 1)
    expected = [0.15, 0.1, 0.3]
    assert miou["images"] == 3 and miou["seeds"] == [0, 1]
    assert miou["mean"] == pytest.approx(np.mean(expected))
    assert miou["ci_low"] <= miou["mean"] <= miou["ci_high"]
    acc = result["comparisons"]["mish"]["pixel_accuracy"]
    assert acc["mean"] == pytest.approx(np.mean([0.1, 0.05, 0.2]))


def test_report_names_the_runs_without_records():
    summary = {"per_image": {"comparisons": {}, "missing": [
        {"arm": "relu", "seed": 0, "folder": "x"}, {"arm": "mish", "seed": 1, "folder": "y"}]}}
    from segmentation.engine.report import _per_image_section

    text = "\n".join(_per_image_section(summary))
    assert "2 finished run(s) have no `per_image.jsonl`" in text
    assert "relu seed 0, mish seed 1" in text
    assert "test-set noise" in text and "not training noise" in text
    assert callable(markdown)


def test_bad_records_are_rejected_with_their_line(tmp_path):
    path = tmp_path / "per_image.jsonl"
    path.write_text(json.dumps(_record(0, 0.5, 0.5)) + "\n{broken\n")
    with pytest.raises(PerImageError, match=r"per_image.jsonl:2: not a JSON record"):
        read_per_image(path)
    record = _record(0, 0.5, 0.5)
    del record["mean_iou"]
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(PerImageError, match=r"record 1 lacks \['mean_iou'\]"):
        read_per_image(path)
    path.write_text(json.dumps(_record(0, 0.5, 0.5)) + "\n" + json.dumps(_record(0, 0.4, 0.4))
                    + "\n")
    with pytest.raises(PerImageError, match="appears twice"):
        read_per_image(path)


def test_runs_on_different_images_are_not_paired(tmp_path):
    a = read_per_image(_write(tmp_path / "a", [(0.5, 0.5), (0.5, 0.5)]) / "per_image.jsonl")
    b = read_per_image(_write(tmp_path / "b", [(0.5, 0.5)]) / "per_image.jsonl")
    with pytest.raises(PerImageError, match="different images"):
        paired_image_difference({0: a}, {0: b}, "mean_iou")


def test_same_function_probe_on_the_real_models():
    cfg = load_config(None, ["MODEL.arch_encoder", "mobilenetv2dilated",
                             "MODEL.arch_decoder", "c1_deepsup", "MODEL.fc_dim", "320"])
    arms = [{"name": "relu", "activation": "relu"},
            {"name": "relu-decoder", "activation": "relu", "scope": "decoder"},
            {"name": "relu-reorder", "activation": "relu", "data_seed": 7},
            # mishkit's relu through convert replaces MobileNetV2's ReLU6 as well: another
            # function, although the name says relu
            {"name": "relu-fused", "activation": "relu", "fuse_bn": True},
            {"name": "mish", "activation": "mish"},
            {"name": "mish-fused", "activation": "mish", "fuse_bn": True},
            {"name": "mish-decoder", "activation": "mish", "scope": "decoder"}]
    groups = same_function_groups(cfg, arms)
    assert [g["arms"] for g in groups] == [["relu", "relu-decoder", "relu-reorder"],
                                           ["mish", "mish-fused"]]
    assert all(g["max_relative_difference"] < 1e-12 for g in groups)
