"""The infer CLI on a folder, and the eval CLI's outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from segmentation.config import load_config
from segmentation.data import CLASS_NAMES, PALETTE
from segmentation.engine.builders import build_segmentation_model
from segmentation.engine.distributed import DistContext
from segmentation.infer import main as infer_main

OVERRIDES = ["MODEL.arch_encoder", "mobilenetv2dilated", "MODEL.arch_decoder", "c1_deepsup",
             "VAL.single_size", "32", "VAL.imgMaxSize", "64", "TRAIN.num_threads", "1"]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A model checkpoint (bare state dict) whose decoder strongly prefers a few classes."""
    cfg = load_config(None, OVERRIDES)
    torch.manual_seed(0)
    model = build_segmentation_model(cfg, DistContext())
    path = tmp_path_factory.mktemp("ckpt") / "weights.pth"
    torch.save(model.state_dict(), path)
    return path


def test_infer_cli_on_a_folder(tmp_path, weights, synthetic_root, capsys):
    folder = synthetic_root / "images" / "validation"
    images = sorted(folder.glob("*.jpg"))
    out = tmp_path / "pred"
    code = infer_main(["--cfg", _cfg_file(tmp_path), "--imgs", str(folder), "--out", str(out),
                       "VAL.checkpoint", str(weights), *OVERRIDES])
    assert code == 0
    printed = capsys.readouterr().out
    for image_path in images:
        label = np.asarray(Image.open(out / f"{image_path.stem}.png"))
        colour = np.asarray(Image.open(out / f"{image_path.stem}_color.png").convert("RGB"))
        with Image.open(image_path) as img:
            assert label.shape == (img.height, img.width)
        assert label.min() >= 1 and label.max() <= 150  # the 1..150 submission space
        np.testing.assert_array_equal(colour, PALETTE[label.astype(np.int64) - 1])
        line = next(ln for ln in printed.splitlines() if ln.startswith(image_path.name))
        # Classes by area: the largest predicted class is named first, with its share.
        counts = np.bincount(label.ravel())
        top = int(counts.argmax())
        share = 100 * counts[top] / label.size
        assert line.split(": ", 1)[1].startswith(f"{CLASS_NAMES[top - 1]} {share:.1f}%")


def _cfg_file(tmp_path):
    path = tmp_path / "cfg.yaml"
    path.write_text("TRAIN:\n  device: cpu\n", encoding="utf-8")
    return str(path)


def test_infer_cli_errors(tmp_path, weights, synthetic_root, capsys):
    with pytest.raises(SystemExit) as info:
        infer_main(["--cfg", _cfg_file(tmp_path), "--imgs", str(tmp_path / "nothing"),
                    "--out", str(tmp_path / "o"), "VAL.checkpoint", str(weights), *OVERRIDES])
    assert info.value.code == 1 and "no such image or folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        infer_main(["--cfg", _cfg_file(tmp_path), "--imgs",
                    str(synthetic_root / "images" / "validation"), "--out",
                    str(tmp_path / "o"), "VAL.checkpoint", str(tmp_path / "missing.pth"),
                    *OVERRIDES])
    assert info.value.code == 1 and "missing.pth" in capsys.readouterr().err


def test_eval_cli_writes_metrics_table_and_visuals(tmp_path, weights, synthetic_root):
    from segmentation.eval import main as eval_main

    out = tmp_path / "eval"
    eval_main(["--cfg", _cfg_file(tmp_path), "--out", str(out), "VAL.checkpoint", str(weights),
               "DATASET.root_dataset", "", "DATASET.list_val",
               str(synthetic_root / "validation.odgt"), "VAL.visualize", "true",
               "VAL.mode", "multi", "VAL.imgSizes", "[24, 32]", "VAL.flip", "true", *OVERRIDES])
    summary = json.loads((out / "metrics.json").read_text())
    assert summary["score"] == pytest.approx((summary["pixel_acc"] + summary["miou"]) / 2)
    table = (out / "class_iou.md").read_text()
    assert "| 2 | sky |" in table  # class names in the per-class table
    assert len(list((out / "vis").glob("*.png"))) == 4
