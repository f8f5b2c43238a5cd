"""The infer and eval CLIs: outputs, CSAIL-layout weights (files and URLs), CSAIL's predictions."""

from __future__ import annotations

import functools
import http.server
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segmentation.config import load_config
from segmentation.data import CLASS_NAMES, PALETTE
from segmentation.data.synthetic import generate_scene
from segmentation.engine.builders import build_segmentation_model
from segmentation.engine.distributed import DistContext
from segmentation.infer import main as infer_main

from .reference import calibrated_model, csail_scores, csail_style, csail_val_inputs

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


# ---- CSAIL's released-checkpoint layout, CSAIL's test-time predictions ----


@pytest.fixture(scope="module")
def csail_files(tmp_path_factory):
    """A model as CSAIL's training saves it (encoder_epoch_20.pth / decoder_epoch_20.pth with
    SyncBN buffers) and as our merged checkpoint, with the same weights."""
    folder = tmp_path_factory.mktemp("csail") / "ade20k-mobilenetv2dilated-c1_deepsup"
    folder.mkdir()
    model = calibrated_model()
    torch.save(csail_style(model.encoder.state_dict()), folder / "encoder_epoch_20.pth")
    torch.save(csail_style(model.decoder.state_dict()), folder / "decoder_epoch_20.pth")
    torch.save(model.state_dict(), folder / "merged.pth")
    return folder


def _csail_weights(folder, prefix=None):
    base = prefix or str(folder)
    return ["MODEL.weights_encoder", f"{base}/encoder_epoch_20.pth",
            "MODEL.weights_decoder", f"{base}/decoder_epoch_20.pth"]


def _eval(tmp_path, synthetic_root, out, *weights):
    from segmentation.eval import main as eval_main

    return eval_main(["--cfg", _cfg_file(tmp_path), "--out", str(out), "DATASET.root_dataset", "",
                      "DATASET.list_val", str(synthetic_root / "validation.odgt"), *OVERRIDES,
                      "VAL.mode", "multi", "VAL.imgSizes", "[24, 40]", *weights])


def test_eval_cli_scores_csail_files_like_the_same_weights_as_our_checkpoint(
        tmp_path, synthetic_root, csail_files, capsys):
    assert _eval(tmp_path, synthetic_root, tmp_path / "ours",
                 "VAL.checkpoint", str(csail_files / "merged.pth")) == 0
    capsys.readouterr()
    assert _eval(tmp_path, synthetic_root, tmp_path / "csail", *_csail_weights(csail_files)) == 0
    printed = capsys.readouterr().out
    for name in ("metrics.json", "per_image.jsonl", "class_iou.csv"):
        assert (tmp_path / "ours" / name).read_text() == (tmp_path / "csail" / name).read_text()
    summary = json.loads((tmp_path / "csail" / "metrics.json").read_text())
    assert summary["protocol"].startswith("multi-scale (short sides 24, 40;")
    # The last lines: the protocol, then the numbers in the form of CSAIL's results table.
    header, numbers = printed.strip().splitlines()[-2:]
    assert header == f"[Eval Summary] 4 images, {summary['protocol']}:"
    assert numbers == (f"Mean IoU: {100 * summary['miou']:.2f}, Pixel Accuracy: "
                       f"{100 * summary['pixel_acc']:.2f}%, Overall Score: "
                       f"{100 * summary['score']:.2f}")


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def test_eval_cli_downloads_csail_files_from_a_url(tmp_path, synthetic_root, csail_files,
                                                  monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    for name in ("no_proxy", "NO_PROXY"):
        monkeypatch.setenv(name, "127.0.0.1")
    handler = functools.partial(_QuietHandler, directory=str(csail_files.parent))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/{csail_files.name}"
        assert _eval(tmp_path, synthetic_root, tmp_path / "url",
                     *_csail_weights(csail_files, url)) == 0
    finally:
        server.shutdown()
        thread.join()
    _eval(tmp_path, synthetic_root, tmp_path / "local", *_csail_weights(csail_files))
    assert (tmp_path / "url" / "per_image.jsonl").read_text() == (
        tmp_path / "local" / "per_image.jsonl").read_text()
    cached = sorted(p.name for p in (tmp_path / "torch_home" / "hub" / "checkpoints").iterdir())
    assert cached == [f"{csail_files.name}-decoder_epoch_20.pth",
                      f"{csail_files.name}-encoder_epoch_20.pth"]


def test_eval_cli_csail_weight_errors(tmp_path, synthetic_root, csail_files, capsys):
    decoder = str(csail_files / "decoder_epoch_20.pth")
    cases = [
        (["MODEL.weights_encoder", "imagenet", "MODEL.weights_decoder", decoder],
         "MODEL.weights_encoder is 'imagenet'"),
        (["MODEL.weights_encoder", str(csail_files / "encoder_epoch_20.pth"),
          "MODEL.weights_decoder", str(tmp_path / "decoder_epoch_9.pth")],
         "decoder_epoch_9.pth"),
        ([*_csail_weights(csail_files), "MODEL.arch_decoder", "c1"],
         "unexpected keys"),  # deep-supervision head in a c1 decoder's file
    ]
    for weights, message in cases:
        with pytest.raises(SystemExit) as info:
            _eval(tmp_path, synthetic_root, tmp_path / "bad", *weights)
        assert info.value.code == 1
        assert message in capsys.readouterr().err


def test_infer_walks_folders_and_predicts_what_csail_test_predicts(tmp_path, csail_files,
                                                                   capsys):
    images = tmp_path / "photos"
    layout = {"a.png": (45, 61), "sub/a.png": (61, 45), "sub/deeper/b.jpg": (50, 38)}
    for number, (relative, (h, w)) in enumerate(layout.items()):
        (images / relative).parent.mkdir(parents=True, exist_ok=True)
        scene = generate_scene(np.random.default_rng(number), h, w)[0]
        Image.fromarray(scene).save(images / relative, quality=95)
    out = tmp_path / "pred"
    assert infer_main(["--cfg", _cfg_file(tmp_path), "--imgs", str(images), "--out", str(out),
                       *OVERRIDES, *_csail_weights(csail_files)]) == 0
    printed = capsys.readouterr().out
    for relative in layout:
        image = Image.open(images / relative).convert("RGB")
        scores = csail_scores(calibrated_model(), csail_val_inputs(image, [32], 64, 8),
                              (image.height, image.width))
        written = np.asarray(Image.open(out / Path(relative).with_suffix(".png")))
        np.testing.assert_array_equal(written, scores.argmax(1)[0].numpy() + 1)
        assert (out / f"{Path(relative).with_suffix('')}_color.png").is_file()
        assert f"\n{relative}: " in f"\n{printed}"
    Image.open(images / "a.png").save(images / "a.jpg")  # same output name as a.png
    with pytest.raises(SystemExit) as info:
        infer_main(["--cfg", _cfg_file(tmp_path), "--imgs", str(images), "--out", str(out),
                    *OVERRIDES, *_csail_weights(csail_files)])
    assert info.value.code == 1 and "would both write" in capsys.readouterr().err
