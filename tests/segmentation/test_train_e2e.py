"""End to end on synthetic data: learning, exact resume, DDP (gloo, SyncBN) = one process."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from segmentation.config import load_config
from segmentation.data.make_odgt import make_odgt
from segmentation.data.synthetic import generate_scene, make_synthetic_dataset
from segmentation.engine.checkpoint import load_checkpoint
from segmentation.engine.distributed import DistContext
from segmentation.engine.evaluator import evaluate
from segmentation.engine.logging import read_metrics
from segmentation.engine.trainer import Trainer

REPO = Path(__file__).resolve().parents[2]


def tiny_cfg(root: Path, out: Path, size: int, *extra: str):
    return load_config(None, [
        "DATASET.root_dataset", "", "DATASET.list_train", str(root / "training.odgt"),
        "DATASET.list_val", str(root / "validation.odgt"), "DATASET.imgSizes", f"[{size}]",
        "DATASET.imgMaxSize", str(2 * size), "MODEL.arch_encoder", "mobilenetv2dilated",
        "MODEL.arch_decoder", "c1_deepsup", "TRAIN.workers", "0", "TRAIN.num_threads", "1",
        "TRAIN.progress", "false", "TRAIN.disp_iter", "5", "TRAIN.eval_every", "0",
        "VAL.single_size", str(size), "VAL.imgMaxSize", str(2 * size), "VAL.workers", "0",
        "VAL.absent", "ignore", "DIR", str(out), *extra])


@pytest.mark.slow
def test_synthetic_training_learns(tmp_path):
    root = tmp_path / "syn"
    make_synthetic_dataset(root, train=24, val=8, size=32, seed=11)
    cfg = tiny_cfg(root, tmp_path / "run", 32, "TRAIN.batch_size_per_gpu", "4",
                   "TRAIN.num_epoch", "1", "TRAIN.epoch_iters", "50", "TRAIN.lr_encoder", "0.05",
                   "TRAIN.lr_decoder", "0.05", "TRAIN.seed", "1")
    trainer = Trainer(cfg, DistContext())
    untrained = evaluate(trainer.model, cfg, DistContext())
    trainer.train()
    trained = evaluate(trainer.model, cfg, DistContext())

    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl", "train")]
    assert losses[-1] < 0.6 * losses[0], losses
    # The best constant prediction (always the most frequent class) is what a pipeline that
    # learned nothing about the images can reach; computed from the ground-truth counts.
    gt = trained.matrix.counts.sum(1).double()
    constant_miou = (gt.max() / gt.sum() / (gt > 0).sum()).item()
    assert trained.summary["miou"] > 2.5 * constant_miou, (trained.summary, constant_miou)
    assert trained.summary["miou"] > untrained.summary["miou"] + 0.03


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(path)["model"]


def _log(run: Path, kind: str, keys: tuple[str, ...]) -> list[tuple]:
    return [(r["step"], *(r[k] for k in keys)) for r in read_metrics(run / "metrics.jsonl", kind)]


def test_resume_is_bit_identical_and_logs_every_step_once(tmp_path, synthetic_root):
    # PPM has dropout, so the restored RNG state matters; stop mid-epoch and mid-pass.
    common = ["TRAIN.batch_size_per_gpu", "2", "TRAIN.num_epoch", "3", "TRAIN.epoch_iters", "2",
              "MODEL.arch_decoder", "ppm_deepsup", "TRAIN.seed", "5", "TRAIN.disp_iter", "1"]
    straight = Trainer(tiny_cfg(synthetic_root, tmp_path / "a", 32, *common), DistContext())
    straight.train()
    interrupted = Trainer(tiny_cfg(synthetic_root, tmp_path / "b", 32, *common), DistContext())
    interrupted.train(stop_at=3)
    interrupted.train(stop_at=5)  # goes on past the checkpoint it is resumed from, then "dies"
    with open(tmp_path / "b" / "metrics.jsonl", "a") as handle:
        handle.write('{"kind": "train", "step": 6, "lo')  # a line cut short by kill -9
    ckpt = tmp_path / "b" / "checkpoints" / "iter_3.pth"
    assert load_checkpoint(ckpt)["iteration"] == 3
    resumed = Trainer(tiny_cfg(synthetic_root, tmp_path / "b", 32, *common,
                               "TRAIN.resume", str(ckpt)), DistContext())
    assert resumed.iteration == 3
    resumed.train()
    a, b = _weights(tmp_path / "a" / "checkpoints" / "epoch_3.pth"), resumed.model.state_dict()
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, different
    for sa, sb in zip(straight.optimizer.state.values(), resumed.optimizer.state.values()):
        assert torch.equal(sa["momentum_buffer"], sb["momentum_buffer"])
    # The log of the resumed run is the uninterrupted run's: each step once, same values.
    train_keys = ("loss", "pixel_acc", "lr_encoder", "epoch")
    assert _log(tmp_path / "b", "train", train_keys) == _log(tmp_path / "a", "train", train_keys)
    assert [r[0] for r in _log(tmp_path / "b", "train", ())] == [1, 2, 3, 4, 5, 6]
    val_keys = ("miou", "pixel_acc", "class_iou")
    assert _log(tmp_path / "b", "val", val_keys) == _log(tmp_path / "a", "val", val_keys)


def test_training_validates_at_the_end_with_per_class_and_per_image_records(
        tmp_path, synthetic_root):
    cfg = tiny_cfg(synthetic_root, tmp_path / "run", 32, "TRAIN.batch_size_per_gpu", "2",
                   "TRAIN.num_epoch", "2", "TRAIN.epoch_iters", "2")  # TRAIN.eval_every 0
    Trainer(cfg, DistContext()).train()
    (val,) = read_metrics(tmp_path / "run" / "metrics.jsonl", "val")
    assert val["step"] == 4 and val["protocol"].startswith("single-scale (short side 32;")
    with open(tmp_path / "run" / "eval" / "class_iou.csv") as handle:
        table = [None if row["iou"] == "nan" else float(row["iou"])
                 for row in csv.DictReader(handle)]
    assert val["class_iou"] == table and len(table) == 150
    assert any(v is None for v in table) and any(v is not None for v in table)
    records = read_metrics(tmp_path / "run" / "per_image.jsonl")
    assert [r["index"] for r in records] == [0, 1, 2, 3]
    assert sum(r["correct_pixels"] for r in records) / sum(
        r["labelled_pixels"] for r in records) == pytest.approx(val["pixel_acc"])
    assert val["per_image_miou"] == pytest.approx(
        sum(r["mean_iou"] for r in records) / len(records))
    # A fresh run in the same folder starts the log afresh: every step once.
    Trainer(cfg, DistContext()).train()
    steps = [(r["kind"], r["step"]) for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert steps == [("train", 4), ("val", 4)]
    # TRAIN.eval_every 1: after every epoch, each record with its per-class IoU.
    cfg = tiny_cfg(synthetic_root, tmp_path / "every", 32, "TRAIN.batch_size_per_gpu", "2",
                   "TRAIN.num_epoch", "2", "TRAIN.epoch_iters", "1", "TRAIN.eval_every", "1")
    Trainer(cfg, DistContext()).train()
    vals = read_metrics(tmp_path / "every" / "metrics.jsonl", "val")
    assert [(v["step"], v["epoch"], len(v["class_iou"])) for v in vals] == [(1, 1, 150),
                                                                           (2, 2, 150)]


def _same_size_dataset(root: Path, count: int, size: int) -> None:
    for split, n in (("training", count), ("validation", 2)):
        (root / "images" / split).mkdir(parents=True)
        (root / "annotations" / split).mkdir(parents=True)
        for i in range(n):
            image, label = generate_scene(np.random.default_rng([7, i, len(split)]), size, size)
            Image.fromarray(image).save(root / "images" / split / f"s{i}.png")
            Image.fromarray(label, mode="L").save(root / "annotations" / split / f"s{i}.png")
    make_odgt(root)


@pytest.mark.distributed
def test_ddp_gloo_syncbn_matches_one_process(tmp_path):
    root = tmp_path / "same"
    _same_size_dataset(root, 8, 32)
    # Dataset order and equal-size images: rank r's batch of 2 is half of the single process's
    # batch of 4, so (Sync)BN statistics and the averaged gradients must agree. (In float64 the
    # two agree to 1e-13, see test_engine; float32 BatchNorm over 4x4 maps amplifies rounding,
    # hence two small steps and a tolerance on the weight *updates*.)
    common = ["TRAIN.num_epoch", "1", "TRAIN.epoch_iters", "2", "TRAIN.shuffle", "false",
              "DATASET.random_flip", "false", "TRAIN.seed", "3", "TRAIN.lr_encoder", "0.001",
              "TRAIN.lr_decoder", "0.001", "TRAIN.disp_iter", "1"]
    ddp_cfg = tiny_cfg(root, tmp_path / "ddp", 32, *common, "TRAIN.batch_size_per_gpu", "2",
                       "TRAIN.sync_bn", "auto")
    cfg_path = tmp_path / "ddp.yaml"
    cfg_path.write_text(ddp_cfg.dump(), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # ~15 s on an idle 2-core box; the limit only guards against a hung rendezvous
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "segmentation.train", "--cfg", str(cfg_path)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp_weights = load_checkpoint(tmp_path / "ddp" / "checkpoints" / "epoch_1.pth")["model"]

    single = Trainer(tiny_cfg(root, tmp_path / "one", 32, *common,
                              "TRAIN.batch_size_per_gpu", "4"), DistContext())
    initial = {k: v.clone() for k, v in single.model.state_dict().items()}
    single.train()
    reference = single.model.state_dict()
    ddp_losses = [r["loss"] for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl", "train")]
    one_losses = [r["loss"] for r in read_metrics(tmp_path / "one" / "metrics.jsonl", "train")]
    assert ddp_losses == pytest.approx(one_losses, rel=5e-3)
    error = change = 0.0
    for key, value in ddp_weights.items():
        if value.is_floating_point():
            update_ddp, update_one = value - initial[key], reference[key] - initial[key]
            error += float(((update_ddp - update_one) ** 2).sum())
            change += float((update_one**2).sum())
    assert change > 0
    assert (error / change) ** 0.5 < 0.02, (error / change) ** 0.5
